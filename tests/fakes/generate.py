"""Deterministic synthetic buildings, generated per zoom-17 cell from (seed, cell).

Shapes mirror what OSM holds and what a harvester must get right: rectangles (some rotated), L-shapes, courtyard
multipolygons (outer + inner), multipolygons whose outer ring is split over 2-3 member ways (one reversed),
``building=no`` and ``building:part`` objects that are not footprints. Cells of one zoom-13 "district" share a
density, and a fraction of districts is empty, so some tiles hold nothing.

Reading a cell must not require generating its neighbours (the benchmark touches a new place per sample), so a
cell's interior objects keep ``BAND_M`` away from its edges, and each cell edge has its own set of smaller buildings
straddling it, seeded by the edge: buildings cross tile edges at every zoom, and a cell is its interior plus the
straddlers of its four edges.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import random

from .osm import GEN_ZOOM, Member, OsmObject, Way, metres_per_degree, tile_bounds

DEFAULT_MIX = {
    "rect": 0.36,  # axis-aligned rectangle way
    "rotated": 0.2,  # rectangle way at any angle
    "lshape": 0.15,  # L-shaped way
    "courtyard": 0.07,  # multipolygon relation: outer + inner way
    "split": 0.08,  # multipolygon relation: outer ring split over 2-3 ways (maybe a hole)
    "no": 0.07,  # way tagged building=no: not a footprint, not drawn
    "part": 0.07,  # a building way plus a building:part way inside it
}
BUILDING_VALUES = ("yes",) * 5 + ("house",) * 3 + ("residential", "apartments", "garage", "commercial", "industrial")
STRADDLER_RADIUS_M = 13.0  # straddling buildings are small (no courtyards)
STRADDLE_OFFSET_M = 2.5  # a straddler's centre lies this close to its edge, so it always crosses it
BAND_M = STRADDLER_RADIUS_M + STRADDLE_OFFSET_M + 2  # interior objects keep this far from the cell's edges
MIN_SLOT_M = 16.0  # the smallest site of one building (dense districts)
EAST_BASE, SOUTH_BASE, INDEX_LIMIT = 3400, 3750, 4096  # object index ranges in a cell (node ids < 2**53)


def poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 50:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _rect(w, h, x0=0.0, y0=0.0):
    return [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)]


def _centred(pts, cx, cy):
    return [(x - cx, y - cy) for x, y in pts]


def _subdivide(pts):
    """Insert each edge's midpoint (more nodes to split a ring over several ways)."""
    out = []
    for i, p in enumerate(pts):
        q = pts[(i + 1) % len(pts)]
        out += [p, ((p[0] + q[0]) / 2, (p[1] + q[1]) / 2)]
    return out


def _shape(kind: str, rng: random.Random, small: bool):
    """(outer, holes) in metres around (0, 0); rings open. ``small`` keeps the radius within STRADDLER_RADIUS_M."""
    big = 0.65 if small else 1.0
    if kind in ("rect", "rotated", "no", "part") or (small and kind == "courtyard"):
        w, h = rng.uniform(7, 22 * big + 4), rng.uniform(6, 16 * big + 3)
        return _centred(_rect(w, h), w / 2, h / 2), []
    if kind == "lshape" or (kind == "split" and (small or rng.random() < 0.5)):
        w, h = rng.uniform(12, 28 * big), rng.uniform(12, 28 * big)
        a, b = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)
        pts = [(0, 0), (w, 0), (w, b * h), (a * w, b * h), (a * w, h), (0, h)]
        return _centred(pts, w / 2, h / 2), []
    w, h = rng.uniform(24, 44), rng.uniform(24, 44)
    if kind == "split" and rng.random() < 0.5:
        return _centred(_rect(w, h), w / 2, h / 2), []
    m = rng.uniform(6, 10)
    return _centred(_rect(w, h), w / 2, h / 2), [_centred(_rect(w - 2 * m, h - 2 * m, m, m), w / 2, h / 2)]


class _Cell:
    """Metric frame of one zoom-17 cell (x east, y north, from its south-west corner) and the objects made in it."""

    def __init__(self, cx: int, cy: int, first_index: int):
        self.west, self.south, east, north = tile_bounds(GEN_ZOOM, cx, cy)
        self.mx, self.my = metres_per_degree((self.south + north) / 2)
        self.width_m, self.height_m = (east - self.west) * self.mx, (north - self.south) * self.my
        self.base = ((cx << GEN_ZOOM) | cy) << 12
        self.index = first_index
        self.objects: list[OsmObject] = []

    def to_lonlat(self, pts, x: float, y: float, angle: float):
        c, s = math.cos(angle), math.sin(angle)
        west, south, mx, my = self.west, self.south, self.mx, self.my
        return [
            (round(west + (x + px * c - py * s) / mx, 7), round(south + (y + px * s + py * c) / my, 7))
            for px, py in pts
        ]

    def _next_id(self) -> int:
        self.index += 1
        return self.base + self.index - 1

    def add_way(self, tags, ring) -> None:
        obj_id = self._next_id()
        nodes = tuple(range(obj_id * 64, obj_id * 64 + len(ring))) + (obj_id * 64,)
        closed = tuple(ring) + (ring[0],)
        way = Way(obj_id * 8, tags, nodes, closed)
        lons, lats = [p[0] for p in ring], [p[1] for p in ring]
        bounds = (min(lons), min(lats), max(lons), max(lats))
        self.objects.append(OsmObject("way", way.id, tags, (Member("", way),), ((closed, ()),), bounds))

    def add_relation(self, tags, outer, holes, rng: random.Random, split: bool) -> None:
        obj_id = self._next_id()
        members: list[Member] = []
        for r, (role, ring) in enumerate([("outer", outer)] + [("inner", h) for h in holes]):
            ids = [obj_id * 64 + r * 32 + i for i in range(len(ring))]
            cuts = [0, len(ring)]
            if split and role == "outer":
                cuts = sorted({0, *rng.sample(range(2, len(ring) - 1), rng.choice((1, 2))), len(ring)})
            for j in range(len(cuts) - 1):
                idx = [i % len(ring) for i in range(cuts[j], cuts[j + 1] + 1)]
                node_ids, coords = tuple(ids[i] for i in idx), tuple(ring[i] for i in idx)
                if j == 1:  # member ways of one ring need not share a direction
                    node_ids, coords = node_ids[::-1], coords[::-1]
                members.append(Member(role, Way(obj_id * 8 + 1 + r * 4 + j, {}, node_ids, coords)))
        polygons = ((tuple(outer) + (outer[0],), tuple(tuple(h) + (h[0],) for h in holes)),)
        lons, lats = [p[0] for p in outer], [p[1] for p in outer]
        bounds = (min(lons), min(lats), max(lons), max(lats))
        self.objects.append(
            OsmObject("relation", obj_id, {"type": "multipolygon", **tags}, tuple(members), polygons, bounds)
        )

    def add(self, kind: str, rng: random.Random, outer, holes, x: float, y: float, angle: float) -> None:
        tags = {"building": BUILDING_VALUES[int(rng.random() * len(BUILDING_VALUES))]}
        if rng.random() < 0.3:
            tags["building:levels"] = str(1 + int(rng.random() * 6))
        ring = self.to_lonlat(outer, x, y, angle)
        if kind == "no":
            self.add_way({"building": "no", "amenity": "parking"}, ring)
        elif kind in ("courtyard", "split") and (holes or kind == "split"):
            hole_rings = [self.to_lonlat(h, x, y, angle) for h in holes]
            if kind == "split" and len(ring) < 6:
                ring = self.to_lonlat(_subdivide(outer), x, y, angle)
            self.add_relation(tags, ring, hole_rings, rng, split=kind == "split")
        else:
            self.add_way(tags, ring)
            if kind == "part":  # a part covering one end of the building: inside the footprint, never counted
                xs, ys = [p[0] for p in outer], [p[1] for p in outer]
                x_cut = min(xs) + rng.uniform(0.3, 0.7) * (max(xs) - min(xs))
                part = [(min(xs), min(ys)), (x_cut, min(ys)), (x_cut, max(ys)), (min(xs), max(ys))]
                part_tags = {"building:part": "yes", "building:levels": str(1 + int(rng.random() * 9))}
                self.add_way(part_tags, self.to_lonlat(part, x, y, angle))


@functools.lru_cache(maxsize=65536)
def _district(seed: int, dx: int, dy: int) -> tuple[float, float]:
    district = random.Random(f"tilesmith-district:{seed}:{dx}:{dy}")
    return district.random(), district.uniform(0.3, 1.7)


class _Sampler:
    def __init__(self, seed: int, density: float, empty_fraction: float, mix: dict[str, float]):
        self.seed, self.density, self.empty_fraction = seed, density, empty_fraction
        self.kinds, self.cumulative = list(mix), list(itertools.accumulate(mix.values()))

    def multiplier(self, cx: int, cy: int) -> float:
        """Density factor of the zoom-13 district holding the cell: 0 (empty) or 0.3-1.7."""
        draw, factor = _district(self.seed, cx >> 4, cy >> 4)
        return 0.0 if draw < self.empty_fraction else factor

    def kind(self, rng: random.Random) -> str:
        return self.kinds[min(len(self.kinds) - 1, bisect.bisect(self.cumulative, rng.random() * self.cumulative[-1]))]


def _slots(length: float, slot: float) -> tuple[int, float]:
    """Split ``length`` into sites no longer than ``slot``: (count, site length)."""
    count = max(1, math.ceil(length / slot))
    return count, length / count


def _angle(kind: str, rng: random.Random) -> float:
    """Rotation in radians: "rotated" rectangles always, 30% of the other shapes, the rest axis-aligned."""
    return rng.uniform(0, math.pi / 2) if rng.random() < 0.3 or kind == "rotated" else 0.0


def _scaled(outer, holes, limit: float):
    """The shape shrunk, when needed, to a radius of at most ``limit`` metres; and that radius."""
    r = max(math.hypot(px, py) for px, py in outer)
    k = min(1.0, limit / r)
    if k < 1.0:
        outer = [(px * k, py * k) for px, py in outer]
        holes = [[(px * k, py * k) for px, py in h] for h in holes]
    return outer, holes, r * k


def generate_interior(sampler: _Sampler, cx: int, cy: int) -> list[OsmObject]:
    """Objects wholly inside cell (cx, cy), at least BAND_M from its edges, none overlapping another.

    A jittered grid: one candidate site per square slot sized for the density, each shape shrunk to fit its slot,
    so dense districts get small houses and no overlap test is needed.
    """
    rng = random.Random(f"tilesmith-cell:{sampler.seed}:{cx}:{cy}")
    cell = _Cell(cx, cy, 0)
    density = sampler.density * sampler.multiplier(cx, cy)
    if density <= 0:
        return []
    slot = max(MIN_SLOT_M, math.sqrt(1e6 / density))
    (nx, sw), (ny, sh) = _slots(cell.width_m - 2 * BAND_M, slot), _slots(cell.height_m - 2 * BAND_M, slot)
    occupancy = min(1.0, density * sw * sh / 1e6)
    for i in range(nx):
        for j in range(ny):
            if rng.random() >= occupancy or cell.index >= EAST_BASE - 2:
                continue
            kind = sampler.kind(rng)
            outer, holes, r = _scaled(*_shape(kind, rng, small=False), min(sw, sh) / 2 - 1.5)
            x = BAND_M + i * sw + rng.uniform(r + 0.5, sw - r - 0.5)
            y = BAND_M + j * sh + rng.uniform(r + 0.5, sh - r - 0.5)
            cell.add(kind, rng, outer, holes, x, y, _angle(kind, rng))
    return cell.objects


def generate_edge(sampler: _Sampler, cx: int, cy: int, side: str) -> list[OsmObject]:
    """Buildings straddling the east (side "E") or south ("S") edge of cell (cx, cy), seeded by that edge."""
    rng = random.Random(f"tilesmith-edge:{sampler.seed}:{cx}:{cy}:{side}")
    cell = _Cell(cx, cy, EAST_BASE if side == "E" else SOUTH_BASE)
    density = sampler.density * sampler.multiplier(cx, cy)
    if density <= 0:
        return []
    length = (cell.height_m if side == "E" else cell.width_m) - 2 * (BAND_M + STRADDLER_RADIUS_M)
    n, sw = _slots(length, max(MIN_SLOT_M, math.sqrt(1e6 / density)))
    occupancy = min(1.0, density * sw * 2 * (BAND_M - 2) / 1e6)
    for i in range(n):
        if rng.random() >= occupancy or cell.index >= (SOUTH_BASE if side == "E" else INDEX_LIMIT) - 2:
            continue
        kind = sampler.kind(rng)
        outer, holes, r = _scaled(*_shape(kind, rng, small=True), min(STRADDLER_RADIUS_M, sw / 2 - 1.5))
        t = BAND_M + STRADDLER_RADIUS_M + i * sw + rng.uniform(r + 0.5, sw - r - 0.5)
        offset = rng.uniform(-STRADDLE_OFFSET_M, STRADDLE_OFFSET_M)
        x, y = (cell.width_m + offset, t) if side == "E" else (t, offset)
        cell.add(kind, rng, outer, holes, x, y, _angle(kind, rng))
    return cell.objects


def generate_cell(
    seed: int, cx: int, cy: int, *, density: float, empty_fraction: float, mix: dict[str, float]
) -> list[OsmObject]:
    """Every object meeting zoom-17 cell (cx, cy): its interior and the straddlers of its four edges."""
    sampler = _Sampler(seed, density, empty_fraction, mix)
    objects = generate_interior(sampler, cx, cy)
    for ex, ey, side in ((cx, cy, "E"), (cx, cy, "S"), (cx - 1, cy, "E"), (cx, cy - 1, "S")):
        if ex >= 0 and ey >= 0:
            objects += generate_edge(sampler, ex, ey, side)
    return objects
