"""Building footprints of an OSM extract (``.osm.pbf``), by the footprint rule of :mod:`.osm`. No database here.

pyosmium (libosmium: https://osmcode.org/pyosmium/) reads the file twice, decoding its blocks on its own threads:

1. relations: the ``type=multipolygon`` relations tagged ``building`` (not ``building=no``), and their member ways;
2. nodes and ways, with every node's location kept in an index (``node_cache``: a sparse array in a temporary file by
   default, 16 bytes per node, so memory stays flat on a national extract). Nodes stay in C++ (they are never
   footprints); each way tagged ``building`` goes through :func:`.osm.way_ring` and :func:`.osm.way_footprints`, and
   each member way keeps its coordinates for :func:`.osm.relation_geometry`, which assembles the relations at the end,
   a batch at a time.

The rule is the one the Overpass path applies to its answers (same functions, same drop reasons): holes and several
outers kept, invalid rings repaired with ``shapely.make_valid``, unclosed ways and dangling members dropped and
counted; a member way tagged ``building`` is a footprint of its own as well, as Overpass returns it too.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import osmium
import shapely

from ..errors import InputFileError
from .osm import Coords, Footprint, relation_geometry, skip_reason, way_footprints, way_ring

log = logging.getLogger(__name__)

BATCH = 20_000  # footprints per batch handed to the database
#: The tags stored with a way's footprint. Reading every tag of every way costs pyosmium ~10 us a way (a third of
#: the import); these are the ones a data set uses. Relations (few) keep all their tags, as Overpass gives them.
WAY_TAGS = ("building", "building:levels", "height")
_RULE_RELATION_TAGS = ("building", "type")  # the tags :func:`.osm.skip_reason` reads
_MORE_WAY_TAGS = WAY_TAGS[1:]  # "building" is read first, to decide whether the way is a footprint


class ExtractHeader(NamedTuple):
    """What the file's header says about its data: the replication state it was cut at, when present."""

    replication_timestamp: dt.datetime | None
    replication_sequence: int | None


def _file(path: Path) -> osmium.io.File:
    return osmium.io.File(str(path), "pbf")  # by content, whatever the file is called


def read_header(path: Path) -> ExtractHeader:
    """The header of ``path``; :class:`InputFileError` when it is missing or not an OSM PBF file."""
    if not path.is_file():
        raise InputFileError(f"{path}: no such file (download an extract, e.g. "
                             "https://download.geofabrik.de/europe/france-latest.osm.pbf)")
    try:
        reader = osmium.io.Reader(_file(path), osmium.osm.NOTHING)
        try:
            header = reader.header()
        finally:
            reader.close()
    except RuntimeError as exc:
        raise unreadable(path, exc) from None
    stamp = header.get("osmosis_replication_timestamp") or header.get("timestamp")
    sequence = header.get("osmosis_replication_sequence_number")
    try:
        when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None
    except ValueError:
        when = None
    return ExtractHeader(when, int(sequence) if sequence and sequence.isdigit() else None)


def unreadable(path: Path, exc: BaseException) -> InputFileError:
    return InputFileError(f"{path}: not a readable .osm.pbf file ({str(exc).strip()[:200] or type(exc).__name__}); "
                          "the previous import is unchanged")


@contextmanager
def node_index(node_cache: str | None, workdir: Path | None = None) -> Iterator[str]:
    """A pyosmium location storage string: ``node_cache`` as given, or a sparse array in a temporary file."""
    if node_cache:
        yield node_cache
        return
    fd, name = tempfile.mkstemp(prefix="tilesmith-nodes-", suffix=".idx", dir=workdir)
    os.close(fd)
    try:
        yield f"sparse_file_array,{name}"
    finally:
        os.unlink(name)


def footprint_batches(path: Path, tally: Counter[str], *, node_cache: str | None = None,
                      batch: int = BATCH) -> Iterator[list[Footprint]]:
    """Every footprint of the extract, in batches; what was dropped is counted into ``tally`` by reason.

    Footprints repaired with ``make_valid`` are kept, and counted under :data:`.osm.REPAIRED`. Raises
    :class:`InputFileError` when the file turns out truncated or corrupt while it is read.
    """
    try:
        relations, wanted = _building_relations(path, tally)
        members: dict[int, str | None] = {}  # hex WKB of each member way
        with node_index(node_cache) as storage:
            pending: list[tuple[int, dict[str, str], str | None]] = []
            processor = osmium.FileProcessor(_file(path), osmium.osm.NODE | osmium.osm.WAY) \
                .with_locations(storage).with_filter(osmium.filter.EntityFilter(osmium.osm.WAY))
            factory = osmium.geom.WKBFactory()
            for way in processor:
                way_id, way_tags = way.id, way.tags
                building = way_tags.get("building")
                if way_id in wanted:
                    members[way_id] = _linestring(factory, way)
                if building is None:
                    continue
                tags = {"building": building}
                reason = skip_reason("way", tags)
                if reason is not None:
                    tally[reason] += 1
                    continue
                for key in _MORE_WAY_TAGS:
                    if (value := way_tags.get(key)) is not None:
                        tags[key] = value
                pending.append((way_id, tags, _linestring(factory, way)))
                if len(pending) >= batch:
                    yield _ways(pending, tally)
                    pending = []
            if pending:
                yield _ways(pending, tally)
    except RuntimeError as exc:  # what libosmium raises on a truncated or corrupt block
        raise unreadable(path, exc) from None
    # Assembled and handed on a batch at a time (a member way may serve several relations: all are kept until the end).
    for start in range(0, len(relations), batch):
        chunk = relations[start:start + batch]
        refs = {ref for _, _, members_of in chunk for _, ref in members_of}
        coords = dict(zip(refs, _coords([members.get(ref) for ref in refs])))
        footprints = []
        for osm_id, tags, members_of in chunk:
            geometry = relation_geometry([(role, coords.get(ref)) for role, ref in members_of], tally)
            if geometry is not None:
                footprints.append(Footprint("relation", osm_id, geometry, tags))
        if footprints:
            yield footprints


def _building_relations(path: Path, tally: Counter[str]
                        ) -> tuple[list[tuple[int, dict[str, str], list[tuple[str, int]]]], set[int]]:
    """First pass: building multipolygons as (id, tags, [(role, way id)]) and the ids of all their member ways."""
    relations, wanted = [], set()
    processor = osmium.FileProcessor(_file(path), osmium.osm.RELATION).with_filter(osmium.filter.KeyFilter("building"))
    for relation in processor:
        # The rule's two tags first: all the tags (a Python object each) only of the relations kept.
        reason = skip_reason("relation", {key: value for key in _RULE_RELATION_TAGS
                                          if (value := relation.tags.get(key)) is not None})
        if reason is not None:
            tally[reason] += 1
            continue
        tags = {tag.k: tag.v for tag in relation.tags}
        refs = [(m.role, m.ref) for m in relation.members if m.type == "w"]  # nodes and sub-relations: not rings
        wanted.update(ref for _, ref in refs)
        relations.append((relation.id, tags, refs))
    return relations, wanted


def _linestring(factory: osmium.geom.WKBFactory, way: osmium.osm.Way) -> str | None:
    """The way's nodes as hex WKB (every node, repeats included, as Overpass prints them); None when a node's
    location is unknown (outside the extract) or the way has fewer than two nodes."""
    try:
        return factory.create_linestring(way, osmium.geom.use_nodes.ALL)
    except (osmium.InvalidLocationError, RuntimeError):
        return None


def _coords(hexes: list[str | None]) -> list[Coords | None]:
    """(n, 2) lon/lat arrays of hex WKB linestrings; None stays None.

    The points are read straight from the bytes after the 9-byte header (byte order, type, point count) of a
    little-endian 2D linestring, which is what libosmium writes on this hardware; anything else goes through shapely.
    """
    out: list[Coords | None] = []
    for h in hexes:
        if h is None:
            out.append(None)
        elif h.startswith("0102000000"):
            out.append(np.frombuffer(bytes.fromhex(h), dtype="<f8", offset=9).reshape(-1, 2))
        else:
            out.append(shapely.get_coordinates(shapely.from_wkb(h)))
    return out


def _ways(pending: list[tuple[int, dict[str, str], str | None]], tally: Counter[str]) -> list[Footprint]:
    rings = []
    for (osm_id, tags, _), coords in zip(pending, _coords([h for _, _, h in pending])):
        ring = way_ring(coords, tally)
        if ring is not None:
            rings.append((osm_id, tags, ring))
    return way_footprints(rings, tally)
