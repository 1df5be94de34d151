"""A deterministic synthetic world: OSM building objects anywhere on earth, and imagery drawn from the same footprints.

``World(seed)`` generates buildings lazily per zoom-17 cell (see ``generate``); ``World.from_geojson`` serves a given
set of polygons instead (e.g. the Kampala labels). Queries follow the Overpass bbox rule: an object is found when one
of its ways has a node inside the box or a segment crossing it; objects come whole, never cut.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import shapely

from .generate import DEFAULT_MIX, generate_cell
from .osm import (
    GEN_ZOOM,
    Bounds,
    Member,
    OsmObject,
    Way,
    bounds_of,
    cells_covering,
    lonlat_to_unit,
    metres_per_degree,
    object_in_box,
    tile_bounds,
)
from .render import encode, renderer

MAX_QUERY_CELLS = 4096  # a bbox needing more zoom-17 cells is refused (Overpass would run out of memory)
STATIC_ID_BASE = 100_000_000_000  # ids given to GeoJSON features without an osm_id, and to their nodes and ways


class AreaTooLarge(ValueError):
    """The bbox covers more cells than MAX_QUERY_CELLS."""


class World:
    def __init__(
        self,
        seed: int = 0,
        *,
        buildings_per_km2: float = 400.0,  # mean density; each zoom-13 district scales it by 0.3-1.7
        empty_fraction: float = 0.1,  # share of zoom-13 districts without any object
        mix: dict[str, float] | None = None,  # relative weights of shape kinds, see generate.DEFAULT_MIX
        cell_cache: int = 16384,  # zoom-17 cells kept generated
        tile_cache: int = 8192,  # encoded tiles kept
        render_min_zoom: int = 14,  # below it tiles show ground only (buildings would be sub-pixel anyway)
        imagery: list[bytes] | None = None,  # real encoded tiles served instead of rendered ones (picked per tile)
    ):
        unknown = set(mix or {}) - set(DEFAULT_MIX)
        if unknown:
            raise ValueError(f"unknown shape kinds {sorted(unknown)}; known: {sorted(DEFAULT_MIX)}")
        self.seed = seed
        self.buildings_per_km2 = buildings_per_km2
        self.empty_fraction = empty_fraction
        self.mix = dict(mix or DEFAULT_MIX)
        self.render_min_zoom = render_min_zoom
        self.imagery = list(imagery or ())
        self._static: dict[tuple[int, int], list[OsmObject]] | None = None
        self._margin_m = 0.0  # generated objects never leave their cell; GeoJSON ones may
        self._cells: OrderedDict = OrderedDict()
        self._cell_cache = cell_cache
        self._tiles: OrderedDict = OrderedDict()
        self._tile_cache = tile_cache
        self._lock = threading.Lock()
        self._renderer = renderer(seed)

    @classmethod
    def from_geojson(cls, path: str | Path, *, seed: int = 0, **kwargs) -> World:
        """Serve the (Multi)Polygons of a GeoJSON FeatureCollection as buildings (``building=yes``).

        A feature's ``osm_id`` property becomes its id; polygons with holes and multipolygons become relations.
        """
        world = cls(seed, buildings_per_km2=0.0, **kwargs)
        world._static = {}
        features = json.loads(Path(path).read_text())["features"]
        margin = 0.0
        counter = itertools.count(STATIC_ID_BASE * 10)
        for index, feature in enumerate(features):
            geom = feature["geometry"]
            parts = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
            osm_id = (feature.get("properties") or {}).get("osm_id")
            obj = _static_object(osm_id if osm_id is not None else STATIC_ID_BASE + index, parts, counter)
            w, s, e, n = obj.bounds
            mx, my = metres_per_degree((s + n) / 2)
            margin = max(margin, (e - w) * mx, (n - s) * my)
            cols, rows = cells_covering(((w + e) / 2, (s + n) / 2, (w + e) / 2, (s + n) / 2))
            world._static.setdefault((cols[0], rows[0]), []).append(obj)
        world._margin_m = margin + 1.0
        return world

    def reserve(self, *, cells: int, tiles: int) -> None:
        """Grow the caches by room for this many more cells and encoded tiles (so a prewarm is not evicted)."""
        self._cell_cache += cells
        self._tile_cache += tiles

    # -- objects ---------------------------------------------------------------------------------------------------

    def cell(self, cx: int, cy: int) -> list[OsmObject]:
        """The objects meeting zoom-17 cell (cx, cy): generated inside it, or straddling one of its edges."""
        if self._static is not None:
            return self._static.get((cx, cy), [])
        with self._lock:
            hit = self._cells.get((cx, cy))
            if hit is not None:
                self._cells.move_to_end((cx, cy))
                return hit
        objects = generate_cell(
            self.seed, cx, cy, density=self.buildings_per_km2, empty_fraction=self.empty_fraction, mix=self.mix
        )
        with self._lock:
            self._cells[(cx, cy)] = objects
            while len(self._cells) > self._cell_cache:
                self._cells.popitem(last=False)
        return objects

    def candidates(self, bounds: Bounds) -> list[OsmObject]:
        """Objects whose bounds meet ``bounds`` (a superset of every query's answer)."""
        west, south, east, north = bounds
        mx, my = metres_per_degree(max(abs(south), abs(north)))
        grown = (
            west - self._margin_m / mx,
            south - self._margin_m / my,
            east + self._margin_m / mx,
            north + self._margin_m / my,
        )
        cols, rows = cells_covering(grown)
        if len(cols) * len(rows) > MAX_QUERY_CELLS:
            raise AreaTooLarge(f"bbox {bounds} spans {len(cols) * len(rows)} cells (max {MAX_QUERY_CELLS})")
        found = {}  # by id: a straddler of a cell edge belongs to both cells
        for cx in cols:
            for cy in rows:
                for obj in self.cell(cx, cy):
                    w, s, e, n = obj.bounds
                    if w <= east and e >= west and s <= north and n >= south:
                        found[(obj.type, obj.id)] = obj
        return list(found.values())

    def buildings_in(self, west: float, south: float, east: float, north: float) -> list[OsmObject]:
        """Every tagged object an Overpass bbox query finds here (decoys included), ordered as Overpass orders them."""
        box = (west, south, east, north)
        found = [obj for obj in self.candidates(box) if object_in_box(obj, box)]
        return sorted(found, key=lambda o: (o.type != "way", o.id))

    def footprints_in(self, west: float, south: float, east: float, north: float) -> list:
        """Shapely (Multi)Polygons (lon/lat) of the footprints among ``buildings_in``: what a harvester should count."""
        return [o.shape() for o in self.buildings_in(west, south, east, north) if o.is_footprint]

    def building_count(self, z: int, x: int, y: int) -> int:
        """Footprints whose area meets the tile (SPEC's ``building_count``)."""
        tile = shapely.box(*tile_bounds(z, x, y))
        return sum(1 for o in self.candidates(tile.bounds) if o.is_footprint and o.shape().intersects(tile))

    def expected_mask(self, z: int, x: int, y: int, size: int = 256) -> np.ndarray:
        """uint8 0/1 mask by SPEC's rule: pixel centre inside a footprint (holes excluded), on the EPSG:3857 grid."""
        mask = np.zeros((size, size), np.uint8)
        n = 1 << z
        for obj in self.candidates(tile_bounds(z, x, y)):
            if not obj.is_footprint:
                continue
            geom = shapely.transform(obj.shape(), lambda c: _to_pixels(c, n, x, y, size))
            x0, y0, x1, y1 = geom.bounds
            c0, c1 = max(0, math.floor(x0)), min(size, math.ceil(x1) + 1)
            r0, r1 = max(0, math.floor(y0)), min(size, math.ceil(y1) + 1)
            if c0 >= c1 or r0 >= r1:
                continue
            xx, yy = np.meshgrid(np.arange(c0, c1) + 0.5, np.arange(r0, r1) + 0.5)
            mask[r0:r1, c0:c1] |= shapely.contains_xy(geom, xx, yy).astype(np.uint8)
        return mask

    # -- imagery ---------------------------------------------------------------------------------------------------

    def render_tile(self, z: int, x: int, y: int, size: int = 256) -> np.ndarray:
        """uint8 RGB [size, size, 3]: ground texture, roofs filled from the footprints, short shadows."""
        return np.array(self._image(z, x, y, size).convert("RGB"))

    def _image(self, z: int, x: int, y: int, size: int):
        objects = self.candidates(tile_bounds(z, x, y)) if z >= self.render_min_zoom else []
        return self._renderer.render(z, x, y, size, objects)

    def tile_bytes(self, z: int, x: int, y: int, *, size: int = 256, fmt: str = "jpeg", quality: int = 85) -> bytes:
        """The encoded tile (jpeg or png), from an LRU cache; with ``imagery``, one of those bodies as it is (a
        stable pick per tile; ``fmt`` is then what the bytes are, whatever was asked)."""
        if self.imagery:
            return self.imagery[(x * 7919 + y * 104729 + z) % len(self.imagery)]
        key = (z, x, y, size, fmt, quality)
        with self._lock:
            hit = self._tiles.get(key)
            if hit is not None:
                self._tiles.move_to_end(key)
                return hit
        data = encode(self._image(z, x, y, size), fmt, quality)
        with self._lock:
            self._tiles[key] = data
            while len(self._tiles) > self._tile_cache:
                self._tiles.popitem(last=False)
        return data


def _to_pixels(coords: np.ndarray, n: int, x: int, y: int, size: int) -> np.ndarray:
    lon, lat = coords[:, 0], np.clip(coords[:, 1], -85.0511287798066, 85.0511287798066)
    ux = (lon + 180.0) / 360.0
    s = np.sin(np.radians(lat))
    uy = 0.5 - np.log((1 + s) / (1 - s)) / (4 * math.pi)
    return np.column_stack(((ux * n - x) * size, (uy * n - y) * size))


def _static_object(obj_id: int, parts, counter) -> OsmObject:
    """A way for a simple polygon; a multipolygon relation (one way per ring) for holes or several parts."""
    polygons = tuple((_ring(p[0]), tuple(_ring(h) for h in p[1:])) for p in parts)
    bounds = bounds_of([outer for outer, _ in polygons])
    tags = {"building": "yes"}
    if len(polygons) == 1 and not polygons[0][1]:
        ring = polygons[0][0]
        nodes = tuple(next(counter) for _ in ring[1:])
        way = Way(obj_id, tags, nodes + nodes[:1], ring)
        return OsmObject("way", obj_id, tags, (Member("", way),), polygons, bounds)
    members = []
    for outer, holes in polygons:
        for role, ring in [("outer", outer)] + [("inner", h) for h in holes]:
            nodes = tuple(next(counter) for _ in ring[1:])
            members.append(Member(role, Way(next(counter), {}, nodes + nodes[:1], ring)))
    rel_tags = {"type": "multipolygon", **tags}
    return OsmObject("relation", obj_id, rel_tags, tuple(members), polygons, bounds)


def _ring(coords) -> tuple[tuple[float, float], ...]:
    ring = tuple((float(c[0]), float(c[1])) for c in coords)
    return ring if ring[0] == ring[-1] else ring + ring[:1]


def tile_for(lon: float, lat: float, z: int) -> tuple[int, int]:
    """The (x, y) of the zoom-z tile holding (lon, lat)."""
    ux, uy = lonlat_to_unit(lon, lat)
    n = 1 << z
    return min(n - 1, int(ux * n)), min(n - 1, int(uy * n))


__all__ = ["World", "AreaTooLarge", "GEN_ZOOM", "tile_for"]
