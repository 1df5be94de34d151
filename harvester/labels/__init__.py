"""Where building footprints come from (``HARVESTER_LABELS``): one small interface, two sources.

- ``overpass``: the public Overpass API, one query per area (:mod:`.overpass` client, :mod:`.osm` parser);
- ``extract``: an OSM extract imported into the database by ``harvester import-osm`` (:mod:`.extract`), one indexed
  query per area and no request to Overpass at all.

Both apply the footprint rule of :mod:`.osm` (SPEC.md) and give footprints whole, never cut at the area's bounds. The
worker sees only :class:`LabelSource`; the source's ``name`` is stored with the buildings (``buildings.source``).
"""

from __future__ import annotations

from typing import Protocol

import aiohttp

from .osm import Footprint, ParsedBuildings
from .overpass import OverpassClient

LABEL_SOURCES = ("overpass", "extract")

__all__ = ["LABEL_SOURCES", "Footprint", "LabelSource", "OverpassLabels", "ParsedBuildings"]


class LabelSource(Protocol):
    name: str  # stored with each building: where it came from

    async def footprints(self, bounds: tuple[float, float, float, float]) -> ParsedBuildings:
        """The footprints intersecting ``bounds`` (west, south, east, north degrees), whole, and what was dropped."""
        ...


class OverpassLabels:
    """``HARVESTER_LABELS=overpass``: one Overpass query per area."""

    name = "overpass"

    def __init__(self, client: OverpassClient, session: aiohttp.ClientSession):
        self.client, self.session = client, session

    async def footprints(self, bounds: tuple[float, float, float, float]) -> ParsedBuildings:
        return await self.client.fetch_buildings(self.session, bounds)
