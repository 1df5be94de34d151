"""The fake world as an OSM extract: a ``.osm.pbf`` written with pyosmium's writer from the world's own objects.

What the fake Overpass serves, as OSM models it: building ways (node ids shared by a way's first and last node),
multipolygon relations with courtyards and rings split over several untagged member ways (sharing node ids where
they meet, one reversed), ``building=no`` and ``building:part`` ways. Plus what a real extract holds besides and the
Overpass query never returns: nodes tagged ``building`` (points of interest, never footprints), open and closed
roads, and relations tagged ``building`` that are not multipolygons (``type=building``). The header carries a
replication timestamp and sequence number, as Geofabrik's extracts do.

    counts = write_extract(World(seed=7), (2.30, 48.84, 2.37, 48.88), "paris.osm.pbf")
"""

from __future__ import annotations

import itertools
from pathlib import Path

import osmium
from osmium.osm import mutable

from .osm import Bounds, OsmObject, cells_covering
from .world import World

EXTRA_ID_BASE = 1 << 55  # ids of the extra nodes, roads and decoy relations: above every generated id
REPLICATION_TIMESTAMP = "2026-01-01T00:00:00Z"
REPLICATION_SEQUENCE = 4321


def objects_in(world: World, bounds: Bounds | list[Bounds]) -> list[OsmObject]:
    """Every object of the zoom-17 cells meeting ``bounds`` (one box or several; whole, once each), sorted by type
    and id."""
    cells = set()
    for box in [bounds] if isinstance(bounds, tuple) else bounds:
        cols, rows = cells_covering(box)
        cells.update((cx, cy) for cx in cols for cy in rows)
    found: dict[tuple[str, int], OsmObject] = {}
    for cx, cy in cells:
        for obj in world.cell(cx, cy):
            found[(obj.type, obj.id)] = obj
    return [found[key] for key in sorted(found)]


def write_extract(world: World, bounds: Bounds | list[Bounds], path: str | Path, *, extras: bool = True,
                  replication: tuple[str, int] | None = (REPLICATION_TIMESTAMP, REPLICATION_SEQUENCE)
                  ) -> dict[str, int]:
    """Write the world's objects meeting ``bounds`` (and, with ``extras``, the non-building objects above) to
    ``path``; return counts: ``footprints`` (what a harvester must keep), ``objects``, ``nodes``, ``ways``,
    ``relations``."""
    objects = objects_in(world, bounds)
    nodes: dict[int, tuple[float, float]] = {}
    tagged_nodes: list[tuple[int, tuple[float, float], dict[str, str]]] = []
    ways: dict[int, tuple[tuple[int, ...], dict[str, str]]] = {}
    relations: list[tuple[int, list[tuple[str, int, str]], dict[str, str]]] = []
    for obj in objects:
        for member in obj.members:
            way = member.way
            nodes.update(zip(way.nodes, way.coords))
            ways[way.id] = (way.nodes, dict(way.tags))
        if obj.type == "relation":
            relations.append((obj.id, [("w", m.way.id, m.role) for m in obj.members], dict(obj.tags)))
    if extras:
        _add_extras(objects, nodes, tagged_nodes, ways, relations)

    header = osmium.io.Header()
    header.set("generator", "tilesmith tests.fakes.pbf")
    if replication is not None:
        header.set("osmosis_replication_timestamp", replication[0])
        header.set("osmosis_replication_sequence_number", str(replication[1]))
    writer = osmium.SimpleWriter(str(path), header=header, overwrite=True)
    try:
        tags_of = {node_id: tags for node_id, _, tags in tagged_nodes}
        nodes.update((node_id, where) for node_id, where, _ in tagged_nodes)
        for node_id in sorted(nodes):
            writer.add_node(mutable.Node(id=node_id, location=nodes[node_id], tags=tags_of.get(node_id, {})))
        for way_id in sorted(ways):
            refs, tags = ways[way_id]
            writer.add_way(mutable.Way(id=way_id, nodes=list(refs), tags=tags))
        for rel_id, members, tags in sorted(relations, key=lambda r: r[0]):
            writer.add_relation(mutable.Relation(id=rel_id, members=members, tags=tags))
    finally:
        writer.close()
    return {"footprints": sum(1 for o in objects if o.is_footprint), "objects": len(objects), "nodes": len(nodes),
            "ways": len(ways), "relations": len(relations)}


def _add_extras(objects, nodes, tagged_nodes, ways, relations) -> None:
    """Per building object: every third a point tagged building at its centre; every fifth a road past it (open),
    every tenth a roundabout around it (closed, tagged highway) and a ``type=building`` relation naming it."""
    ids = itertools.count(EXTRA_ID_BASE)
    for i, obj in enumerate(o for o in objects if o.is_footprint):
        west, south, east, north = obj.bounds
        centre = (round((west + east) / 2, 7), round((south + north) / 2, 7))
        if i % 3 == 0:
            tagged_nodes.append((next(ids), centre, {"building": "yes", "name": f"poi {i}"}))
        if i % 5 == 0:
            road = [next(ids) for _ in range(3)]
            nodes.update(zip(road, [(west, south - 1e-4), centre, (east, north + 1e-4)]))
            ways[next(ids)] = (tuple(road), {"highway": "residential"})
        if i % 10 == 0:
            ring = [next(ids) for _ in range(4)]
            pad = 2e-4
            nodes.update(zip(ring, [(west - pad, south - pad), (east + pad, south - pad), (east + pad, north + pad),
                                    (west - pad, north + pad)]))
            ways[next(ids)] = (tuple(ring + ring[:1]), {"highway": "residential", "junction": "roundabout"})
            outline = obj.members[0].way.id
            relations.append((next(ids), [("w", outline, "outline")], {"type": "building", "building": "yes"}))
