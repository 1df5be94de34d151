"""The OSM data model of the fake world, and Web Mercator helpers.

Objects follow the OSM data model (https://wiki.openstreetmap.org/wiki/Elements): a building is a closed way, or a
``type=multipolygon`` relation whose member ways (untagged, as in current OSM practice) carry ``outer``/``inner``
roles and may each hold only part of a ring. ``polygons`` keeps the true rings so tests need not re-join them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

Ring = tuple[tuple[float, float], ...]  # closed, (lon, lat) in degrees
Bounds = tuple[float, float, float, float]  # west, south, east, north in degrees

GEN_ZOOM = 17  # objects are generated and indexed per zoom-17 cell
MERCATOR_MAX_LAT = 85.0511287798066


@dataclass(eq=False, slots=True)
class Way:
    id: int
    tags: Mapping[str, str]
    nodes: tuple[int, ...]
    coords: Ring  # one (lon, lat) per node; a closed way repeats its first node
    json: str | None = None  # its Overpass element, once serialized


@dataclass(eq=False, slots=True)
class Member:
    role: str  # "outer" | "inner" for multipolygon members, "" for the way of a plain way object
    way: Way


@dataclass(eq=False, slots=True)
class OsmObject:
    """A top-level tagged object: a way (one member, itself) or a relation with its member ways."""

    type: str  # "way" | "relation"
    id: int
    tags: Mapping[str, str]
    members: tuple[Member, ...]
    polygons: tuple[tuple[Ring, tuple[Ring, ...]], ...]  # (outer, holes) as they should be joined
    bounds: Bounds
    _cache: dict = field(default_factory=dict, repr=False)  # derived data: shapely shape, mercator rings

    @property
    def is_footprint(self) -> bool:
        """A building footprint per SPEC's mask rule (``building`` but not ``building=no``; parts excluded)."""
        building = self.tags.get("building")
        if building is None or building == "no":
            return False
        return self.type == "way" or self.tags.get("type") == "multipolygon"

    def shape(self):
        """The footprint as a shapely (Multi)Polygon in lon/lat."""
        if "shape" not in self._cache:
            from shapely.geometry import MultiPolygon, Polygon

            polys = [Polygon(outer, list(holes)) for outer, holes in self.polygons]
            self._cache["shape"] = polys[0] if len(polys) == 1 else MultiPolygon(polys)
        return self._cache["shape"]

    def ways(self) -> list[Way]:
        return [m.way for m in self.members]


def bounds_of(rings) -> Bounds:
    lons = [p[0] for ring in rings for p in ring]
    lats = [p[1] for ring in rings for p in ring]
    return (min(lons), min(lats), max(lons), max(lats))


def lonlat_to_unit(lon: float, lat: float) -> tuple[float, float]:
    """Web Mercator in tile units of zoom 0: x east from -180 degrees, y south from the north edge, both in [0, 1]."""
    lat = max(-MERCATOR_MAX_LAT, min(MERCATOR_MAX_LAT, lat))
    s = math.sin(math.radians(lat))
    return (lon + 180.0) / 360.0, 0.5 - math.log((1 + s) / (1 - s)) / (4 * math.pi)


def unit_to_lonlat(ux: float, uy: float) -> tuple[float, float]:
    return ux * 360.0 - 180.0, math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * uy))))


def tile_bounds(z: int, x: int, y: int) -> Bounds:
    n = 1 << z
    west, north = unit_to_lonlat(x / n, y / n)
    east, south = unit_to_lonlat((x + 1) / n, (y + 1) / n)
    return (west, south, east, north)


def cells_covering(bounds: Bounds, zoom: int = GEN_ZOOM) -> tuple[range, range]:
    """Cell columns and rows at ``zoom`` whose area meets ``bounds``."""
    west, south, east, north = bounds
    n = 1 << zoom
    x0, y0 = lonlat_to_unit(west, north)
    x1, y1 = lonlat_to_unit(east, south)
    eps = 1e-9  # a bbox ending on a cell edge (a tile's bounds) does not reach into the next cell
    c0, r0 = max(0, math.floor(x0 * n + eps)), max(0, math.floor(y0 * n + eps))
    c1, r1 = min(n, math.ceil(x1 * n - eps)), min(n, math.ceil(y1 * n - eps))
    return range(c0, max(c0 + 1, c1)), range(r0, max(r0 + 1, r1))


def metres_per_degree(lat: float) -> tuple[float, float]:
    """(metres per degree of longitude, of latitude) near ``lat``."""
    return 111_320.0 * max(math.cos(math.radians(lat)), 1e-6), 110_574.0


def segment_hits_box(a, b, box: Bounds) -> bool:
    """Does segment a-b meet the box (Liang-Barsky clipping)?"""
    west, south, east, north = box
    x0, y0 = a
    dx, dy = b[0] - x0, b[1] - y0
    t0, t1 = 0.0, 1.0
    for p, q in ((-dx, x0 - west), (dx, east - x0), (-dy, y0 - south), (dy, north - y0)):
        if p == 0:
            if q < 0:
                return False
        else:
            t = q / p
            if p < 0:
                t0 = max(t0, t)
            else:
                t1 = min(t1, t)
            if t0 > t1:
                return False
    return True


def way_in_box(way: Way, box: Bounds) -> bool:
    """Overpass ``(bbox)`` semantics for a way: a node inside the box, or a segment crossing it."""
    west, south, east, north = box
    pts = way.coords
    if any(west <= lon <= east and south <= lat <= north for lon, lat in pts):
        return True
    return any(segment_hits_box(pts[i], pts[i + 1], box) for i in range(len(pts) - 1))


def object_in_box(obj: OsmObject, box: Bounds) -> bool:
    """Overpass semantics: a relation is found when one of its member ways is."""
    w, s, e, n = obj.bounds
    if w > box[2] or e < box[0] or s > box[3] or n < box[1]:
        return False
    if w >= box[0] and e <= box[2] and s >= box[1] and n <= box[3]:
        return True
    return any(way_in_box(m.way, box) for m in obj.members)
