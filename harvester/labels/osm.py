"""Building footprints from Overpass: the query, and its JSON answer turned into polygons. No I/O here.

Footprint rule (SPEC.md): OSM ways tagged ``building`` (not ``building=no``) and ``type=multipolygon`` relations
tagged ``building``, with outer and inner rings, rings joined from several ways; ``building:part`` is not a footprint.

References: Overpass QL, https://wiki.openstreetmap.org/wiki/Overpass_API/Overpass_QL (settings ``[timeout:]``,
``[maxsize:]``, bbox order south,west,north,east, ``out geom``); multipolygon relations,
https://wiki.openstreetmap.org/wiki/Relation:multipolygon (ring assembly, roles, one hole per inner ring).

The rule itself (:func:`skip_reason`, :func:`way_ring`, :func:`way_footprints`, :func:`relation_geometry`) works on
plain (role, coordinates) inputs, so the extract import (:mod:`.pbf`) applies exactly the same rule to a ``.osm.pbf``.

The answer is untrusted input: any field may be missing or of the wrong type. An unusable top level (not an object,
no ``elements`` list, a ``runtime error`` remark) raises :class:`OverpassError`; a bad element or member is dropped
and counted under a reason in :attr:`ParsedBuildings.dropped`, and the rest is kept.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

from ..errors import OverpassError

log = logging.getLogger(__name__)

REPAIRED = "(repaired)"  # tallied with the drop reasons while parsing, but logged, not reported as dropped

Coords = np.ndarray  # float64 (n, 2) of (lon, lat) degrees
_LIMITS = np.array([180.0, 90.0])


class Footprint(NamedTuple):
    """One building: its OSM element, its geometry (valid, lon/lat EPSG:4326) and its tags."""

    osm_type: Literal["way", "relation"]
    osm_id: int
    geometry: Polygon | MultiPolygon
    tags: dict[str, str]


class ParsedBuildings(NamedTuple):
    """The footprints of one Overpass answer, and the count of what was dropped, by reason."""

    footprints: list[Footprint]
    dropped: dict[str, int]


def building_query(bounds: Sequence[float], timeout_s: int, maxsize_bytes: int) -> str:
    """Overpass QL for the building footprints that intersect ``bounds`` = (west, south, east, north) degrees.

    Output is ``out geom;`` (full geometry of every way and member way), never ``out geom(bbox)``, which cuts the
    rings of buildings that cross the box. The box is rounded outwards to 1e-7 degrees (OSM's precision).
    """
    west, south, east, north = (float(v) for v in bounds)
    if not (-180.0 <= west < east <= 180.0 and -90.0 <= south < north <= 90.0):
        raise ValueError(f"bounds must be (west, south, east, north) degrees with west < east, south < north; "
                         f"got {tuple(bounds)}")
    if int(timeout_s) <= 0 or int(maxsize_bytes) <= 0:
        raise ValueError(f"timeout ({timeout_s}) and maxsize ({maxsize_bytes}) must be positive")
    west, south, east, north = bounds_outwards((west, south, east, north))
    bbox = ",".join(f"{v:.7f}" for v in (south, west, north, east))
    return (
        f"[out:json][timeout:{int(timeout_s)}][maxsize:{int(maxsize_bytes)}];\n"
        "(\n"
        f'  way["building"]["building"!="no"]({bbox});\n'
        f'  relation["type"="multipolygon"]["building"]["building"!="no"]({bbox});\n'
        ");\n"
        "out geom;\n"
    )


def bounds_outwards(bounds: Sequence[float]) -> tuple[float, float, float, float]:
    """(west, south, east, north) rounded outwards to OSM's 1e-7 degree grid: the box both label sources search.

    The 1e-6 step slack keeps 48.852 (48.85199999... as a float) at 48.8520000.
    """
    west, south, east, north = (float(v) for v in bounds)
    return (math.floor(west * 1e7 + 1e-6) / 1e7, math.floor(south * 1e7 + 1e-6) / 1e7,
            math.ceil(east * 1e7 - 1e-6) / 1e7, math.ceil(north * 1e7 - 1e-6) / 1e7)


def skip_reason(kind: str, tags: Mapping[str, str]) -> str | None:
    """Why an OSM way or relation with these tags is not a footprint (a drop reason), or None when it is one."""
    building = tags.get("building")
    if building is None:
        return "not_building"
    if building == "no":
        return "building_no"
    if kind == "relation" and tags.get("type") != "multipolygon":
        return "relation_not_multipolygon"
    return None


def parse_buildings(payload: object) -> ParsedBuildings:
    """Turn an Overpass ``out geom`` JSON answer (already decoded) into footprints; see the module docstring."""
    if not isinstance(payload, dict):
        raise OverpassError(f"Overpass answer is not a JSON object but {type(payload).__name__}")
    remark = payload.get("remark")
    if isinstance(remark, str) and remark.strip().lower().startswith("runtime error"):
        raise OverpassError(f"Overpass runtime error: {remark.strip()[:300]}")
    elements = payload.get("elements")
    if not isinstance(elements, list):
        raise OverpassError(f"Overpass answer has no 'elements' list (keys: {sorted(map(str, payload))[:10]})")
    if remark:
        log.warning("overpass remark: %s", str(remark)[:300])

    tally: Counter[str] = Counter()
    ways: list[tuple[int, dict[str, str], Coords]] = []
    relations: list[Footprint] = []
    for element in elements:
        parsed = _parse_element(element, tally)
        if isinstance(parsed, Footprint):
            relations.append(parsed)
        elif parsed is not None:
            ways.append(parsed)
    footprints = way_footprints(ways, tally) + relations
    repaired = tally.pop(REPAIRED, 0)
    # INFO only when something was dropped or repaired: one line per clean answer is noise at harvest rates.
    log.log(logging.INFO if tally or repaired else logging.DEBUG,
            "overpass answer: %d elements, %d footprints (%d repaired with make_valid), dropped %s",
            len(elements), len(footprints), repaired, dict(tally) or "none")
    return ParsedBuildings(footprints, dict(tally))


def _parse_element(element: object, dropped: Counter[str]
                   ) -> Footprint | tuple[int, dict[str, str], Coords] | None:
    """A relation's footprint, a way's (id, tags, closed ring) to be made into a polygon in bulk, or None."""
    if not isinstance(element, dict):
        dropped["element_not_object"] += 1
        return None
    kind, osm_id = element.get("type"), element.get("id")
    if kind not in ("way", "relation"):
        dropped["element_not_way_or_relation"] += 1
        return None
    if not isinstance(osm_id, int) or isinstance(osm_id, bool) or osm_id <= 0:
        dropped["element_bad_id"] += 1
        return None
    raw_tags = element.get("tags")
    tags = {k: v for k, v in raw_tags.items() if isinstance(k, str) and isinstance(v, str)} \
        if isinstance(raw_tags, dict) else {}
    reason = skip_reason(kind, tags)
    if reason is not None:
        dropped[reason] += 1
        return None
    if kind == "way":
        ring = way_ring(_coords(element.get("geometry")), dropped)
        return None if ring is None else (osm_id, tags, ring)
    members = element.get("members")
    if not isinstance(members, list):
        dropped["relation_no_members"] += 1
        return None
    geometry = relation_geometry(_member_lines(members), dropped)
    return None if geometry is None else Footprint("relation", osm_id, geometry, tags)


def way_footprints(ways: list[tuple[int, dict[str, str], Coords]], dropped: Counter[str]) -> list[Footprint]:
    """Polygons of all closed ways at once (shapely's array functions), each invalid one repaired on its own."""
    if not ways:
        return []
    rings = [ring for _, _, ring in ways]
    polygons = shapely.polygons(shapely.linearrings(np.concatenate(rings),
                                                    indices=np.repeat(np.arange(len(rings)), [len(r) for r in rings])))
    valid = shapely.is_valid(polygons)
    footprints = []
    for (osm_id, tags, _), polygon, is_valid in zip(ways, polygons, valid):
        geometry = polygon if is_valid else _valid_polygonal(polygon, dropped, "way")
        if geometry is not None:
            footprints.append(Footprint("way", osm_id, geometry, tags))
    return footprints


def _coords(geometry: object) -> Coords | None:
    """A list of {lat, lon} objects as an (n, 2) lon/lat array; None when any point is missing or out of range."""
    if not isinstance(geometry, list) or not geometry:
        return None
    try:
        coords = np.array([(p["lon"], p["lat"]) for p in geometry], dtype=np.float64)
    except (TypeError, KeyError, ValueError):
        return None  # a null point (data Overpass could not give), a non-object, a missing or non-numeric lon/lat
    if coords.ndim != 2 or not (np.abs(coords) <= _LIMITS).all():  # also False for NaN
        return None
    return coords


def _is_closed(coords: Coords) -> bool:
    return len(coords) >= 2 and coords[0, 0] == coords[-1, 0] and coords[0, 1] == coords[-1, 1]


def way_ring(coords: Coords | None, dropped: Counter[str]) -> Coords | None:
    """A building way's closed ring, or None (counted) when its geometry is missing, unclosed or degenerate."""
    if coords is None:
        dropped["way_missing_or_bad_geometry"] += 1
        return None
    if not _is_closed(coords):
        dropped["way_unclosed"] += 1
        return None
    if len(coords) < 4:
        dropped["way_degenerate"] += 1
        return None
    return coords


def _member_lines(members: list) -> list[tuple[object, Coords | None]]:
    """(role, coords or None) of an Overpass relation's way members; nodes and sub-relations are not rings."""
    return [(m.get("role"), _coords(m.get("geometry"))) for m in members
            if isinstance(m, dict) and m.get("type") == "way"]


def relation_geometry(members: Sequence[tuple[object, Coords | None]], dropped: Counter[str]
                      ) -> Polygon | MultiPolygon | None:
    """A multipolygon relation's geometry from its way members' (role, coords or None when missing), or None."""
    lines: dict[str, list[Coords]] = {"outer": [], "inner": []}
    for role, coords in members:
        role = "outer" if role == "" else role  # an empty role is an old-style outer (the wiki's advice)
        if role not in lines:
            dropped["relation_member_other_role"] += 1
            continue
        if coords is None:
            dropped["relation_member_missing_geometry"] += 1
            continue
        lines[role].append(coords)

    outers = _assemble_rings(lines["outer"], dropped)
    inners = _assemble_rings(lines["inner"], dropped)
    if not outers:
        dropped["relation_no_outer_ring"] += 1
        return None
    polygons = [Polygon(ring) for ring in outers]
    if inners:
        holes: list[list[Coords]] = [[] for _ in outers]
        areas = shapely.area(polygons)
        for ring in inners:
            owner = _owner_of_inner(ring, polygons, areas)
            if owner is None:
                dropped["relation_inner_outside_outers"] += 1
            else:
                holes[owner].append(ring)
        # An outer without holes is the polygon already built for the owner test.
        polygons = [Polygon(ring, rings) if rings else polygon for ring, rings, polygon in zip(outers, holes, polygons)]
    geometry = polygons[0] if len(polygons) == 1 else MultiPolygon(polygons)
    return _valid_polygonal(geometry, dropped, "relation")


def _owner_of_inner(ring: Coords, outers: list[Polygon], areas: np.ndarray) -> int | None:
    """The index of the outer ring an inner ring is a hole of: the smallest outer that holds all its vertices.

    Smallest, because outers nest (a building on an island in another's courtyard). Point tests stay robust on
    invalid rings. Sloppy data (an inner crossing its outer a little) falls back to the smallest outer holding a
    point of the inner's interior; ``make_valid`` then cuts the hole to the outer.
    """
    holding = [i for i, outer in enumerate(outers) if shapely.intersects_xy(outer, ring[:, 0], ring[:, 1]).all()]
    if not holding:
        probe = shapely.point_on_surface(Polygon(ring))
        holding = [i for i, outer in enumerate(outers) if outer.intersects(probe)]
    return min(holding, key=lambda i: areas[i]) if holding else None


def _assemble_rings(lines: list[Coords], dropped: Counter[str]) -> list[Coords]:
    """Join way geometries into closed rings by matching end points, reversing ways as needed.

    A ring closes as soon as its end meets its start. What cannot be closed (a dangling chain) is dropped and its
    ways counted; a ring of fewer than 4 points is counted as degenerate.
    """
    rings: list[Coords] = []
    open_lines: list[Coords] = []
    for c in lines:
        (rings if _is_closed(c) else open_lines).append(c)
    if not open_lines:  # every member a closed ring already (the common case): nothing to join
        return _not_degenerate(rings, dropped)
    by_end: dict[tuple[float, float], list[int]] = {}
    for i, c in enumerate(open_lines):
        for end in (tuple(c[0]), tuple(c[-1])):
            by_end.setdefault(end, []).append(i)
    used = [False] * len(open_lines)
    for start in range(len(open_lines)):
        if used[start]:
            continue
        used[start] = True
        chain, members = [open_lines[start]], 1
        head, tail = tuple(open_lines[start][0]), tuple(open_lines[start][-1])
        while tail != head:
            nxt = next((j for j in by_end.get(tail, ()) if not used[j]), None)
            if nxt is None:
                break
            used[nxt] = True
            members += 1
            segment = open_lines[nxt] if tuple(open_lines[nxt][0]) == tail else open_lines[nxt][::-1]
            chain.append(segment[1:])
            tail = tuple(segment[-1])
        if tail == head:
            rings.append(np.concatenate(chain))
        else:
            dropped["relation_member_dangling"] += members
    return _not_degenerate(rings, dropped)


def _not_degenerate(rings: list[Coords], dropped: Counter[str]) -> list[Coords]:
    """The rings of 4 points or more; the others counted."""
    kept = [r for r in rings if len(r) >= 4]
    if len(kept) < len(rings):
        dropped["relation_ring_degenerate"] += len(rings) - len(kept)
    return kept


def _valid_polygonal(geometry: Polygon | MultiPolygon, dropped: Counter[str], kind: str
                     ) -> Polygon | MultiPolygon | None:
    """The geometry itself when valid, else its ``make_valid`` repair reduced to its polygonal parts."""
    if shapely.is_valid(geometry):
        return geometry
    repaired = shapely.make_valid(geometry, method="structure", keep_collapsed=False)
    parts = [g for g in shapely.get_parts(repaired) if isinstance(g, (Polygon, MultiPolygon)) and not g.is_empty]
    polygons = [p for g in parts for p in (g.geoms if isinstance(g, MultiPolygon) else [g])]
    if not polygons:
        dropped[f"{kind}_invalid_empty"] += 1
        return None
    dropped[REPAIRED] += 1
    return polygons[0] if len(polygons) == 1 else MultiPolygon(polygons)
