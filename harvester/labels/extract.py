"""Footprints from an OSM extract in PostGIS: the import (``harvester import-osm``) and the lookup per area
(``HARVESTER_LABELS=extract``). Queries in ``sql/extract.sql``; tables in ``migrations/0003_osm_extract.sql``.

Import: the file's header is read first (a missing or non-PBF file stops here), then, in ONE transaction, a new table
is filled by binary ``COPY`` (EWKB geometries) from the reader of :mod:`.pbf` running in a thread, indexed (GiST),
swapped in for ``osm_buildings`` by renaming, and recorded in ``osm_extracts``. A file found truncated or corrupt
halfway rolls the transaction back: the previous import stays as it was, and a harvest reading meanwhile sees the old
footprints or the new ones, never half.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import json
import logging
import queue
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import asyncpg
import numpy as np
import shapely

from .. import db
from ..errors import ConfigError, InputFileError
from ..sql import queries
from .osm import REPAIRED, Footprint, ParsedBuildings, bounds_outwards
from .pbf import footprint_batches, read_header

log = logging.getLogger(__name__)

_COLUMNS = ("osm_type", "osm_id", "geom", "tags")
_POLYGON = 3  # shapely type id
# EWKB header of a little-endian MultiPolygon with SRID 4326 and one part: a Polygon's WKB after it makes the
# MultiPolygon the column holds, with no geometry built for it (a third of the cost of the rows, built by shapely).
_ONE_PART_MULTIPOLYGON = b"\x01\x06\x00\x00\x20\xe6\x10\x00\x00\x01\x00\x00\x00"


@dataclass(frozen=True)
class ImportResult:
    extract_id: int
    file_name: str
    kept: int
    dropped: dict[str, int]
    repaired: int
    seconds: float


class ExtractLabels:
    """``HARVESTER_LABELS=extract``: one indexed query per area on the imported footprints; no Overpass request."""

    name = "extract"

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def footprints(self, bounds: tuple[float, float, float, float]) -> ParsedBuildings:
        # The box Overpass would search (rounded outwards to OSM's 1e-7 grid), so both sources find the same ids.
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(queries("extract")["lookup"], *bounds_outwards(bounds))
        geoms = shapely.from_wkb([r["wkb"] for r in rows]) if rows else []
        return ParsedBuildings([Footprint(r["osm_type"], r["osm_id"], g, json.loads(r["tags"]))
                                for r, g in zip(rows, geoms)], {})


async def active_extract(conn: asyncpg.Connection) -> dict[str, object] | None:
    """The active import (file, replication state, counts, when), or None when nothing was imported."""
    if await conn.fetchval("SELECT to_regclass('osm_extracts')") is None:
        return None  # migration 0003 not applied: nothing can have been imported
    row = await conn.fetchrow(queries("extract")["active"])
    if row is None:
        return None
    out = dict(row)
    out["dropped_by_reason"] = json.loads(out["dropped_by_reason"])
    for key in ("replication_timestamp", "started_at", "imported_at"):
        out[key] = out[key].isoformat() if out[key] else None
    return out


async def require_extract(conn: asyncpg.Connection) -> None:
    """Stop a run with ``HARVESTER_LABELS=extract`` before it queues anything when no extract was imported."""
    if await active_extract(conn) is None:
        raise ConfigError("HARVESTER_LABELS=extract: no OSM extract is imported in this database; run "
                          "`harvester import-osm FILE.osm.pbf` first (or set HARVESTER_LABELS=overpass)")


async def import_extract(dsn: str, path: Path, *, node_cache: str | None = None) -> ImportResult:
    """Import the building footprints of ``path`` and make them the active extract (see the module docstring)."""
    header = read_header(path)  # InputFileError (exit 2) before anything touches the database
    started, clock = dt.datetime.now(dt.timezone.utc), time.monotonic()
    sql = queries("extract")
    conn = await db.connect(dsn)
    try:
        if await conn.fetchval("SELECT to_regclass('osm_buildings')") is None:
            raise db.DatabaseError("the database has no osm_buildings table: run `harvester migrate` first")
        await conn.set_type_codec("geometry", schema="public", encoder=bytes, decoder=bytes, format="binary")
        tally: Counter[str] = Counter()
        kept = 0
        async with conn.transaction():
            await conn.execute(sql["lock"])
            await conn.execute(sql["create_next"])
            with _collector_paused():
                async for records in _in_thread(_records(footprint_batches(path, tally, node_cache=node_cache))):
                    await conn.copy_records_to_table("osm_buildings_next", records=records, columns=_COLUMNS)
                    kept += len(records)
                    log.debug("import: %d footprints copied", kept)
            if kept == 0:  # rolls back: an extract without buildings must not replace one with them
                raise InputFileError(f"{path}: no building footprints in this extract; the previous import is "
                                     "unchanged")
            log.info("import: %d footprints read in %.0f s; indexing", kept, time.monotonic() - clock)
            await conn.execute(sql["index_next"])
            await conn.execute(sql["analyze_next"])
            repaired = tally.pop(REPAIRED, 0)
            await conn.execute(sql["swap"])
            extract_id = await conn.fetchval(
                sql["record"], path.name, header.replication_timestamp, header.replication_sequence, kept,
                sum(tally.values()), json.dumps(dict(tally)), repaired, started)
    finally:
        await conn.close()
    return ImportResult(extract_id, path.name, kept, dict(tally), repaired, time.monotonic() - clock)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """CPython's cyclic garbage collector off while the file is read and copied.

    The reading keeps millions of container objects alive (the relations and their members, each batch's tags and
    footprints), and every full collection walks all of them: on a million footprints the collections took 14 s of
    a 38 s import and found 10 objects in cycles (none of the reading's objects form cycles; reference counting
    frees them), so memory stays what it was. Collected once at the end.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.collect()


def _records(batches: Iterator[list[Footprint]]) -> Iterator[list[tuple]]:
    """COPY rows (osm_type, osm_id, EWKB MultiPolygon with SRID 4326, tags JSON) of each batch, vectorized."""
    for batch in batches:
        geoms = np.empty(len(batch), dtype=object)
        geoms[:] = [f.geometry for f in batch]
        single = shapely.get_type_id(geoms) == _POLYGON
        ewkb = np.empty(len(batch), dtype=object)
        ewkb[single] = [_ONE_PART_MULTIPOLYGON + w for w in shapely.to_wkb(geoms[single], byte_order=1)]
        ewkb[~single] = shapely.to_wkb(shapely.set_srid(geoms[~single], 4326), byte_order=1, include_srid=True,
                                       flavor="extended")
        texts: dict[tuple, str] = {}  # JSON of each set of tags met in the batch: ways repeat a few, e.g. building=yes
        rows = []
        for f, g in zip(batch, ewkb):
            key = tuple(f.tags.items())
            text = texts.get(key)
            if text is None:
                text = texts[key] = json.dumps(f.tags)
            rows.append((f.osm_type, f.osm_id, g, text))
        yield rows


async def _in_thread(items: Iterator[list[tuple]], depth: int = 2):
    """Iterate ``items`` in a thread of its own (reading and geometry overlap the COPY); its errors re-raised here."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)

    thread = threading.Thread(target=produce, name="import-osm-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = await asyncio.to_thread(handoff.get)
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
