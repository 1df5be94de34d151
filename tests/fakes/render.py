"""Synthetic aerial imagery: precomputed ground textures with roofs drawn from the footprints.

Roofs are filled on the tile's Web Mercator pixel grid (slippy-map tiles, y from the north), so the buildings a
harvester rasterizes from Overpass sit exactly on the roofs. Ground textures are computed once per seed and sliced
per tile, which keeps a tile at about a millisecond including JPEG encoding.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
from PIL import Image, ImageDraw

from .osm import OsmObject

TEXTURES = 4
TEXTURE_PX = 1024
GROUND = np.array([(88, 110, 60), (122, 126, 82), (141, 130, 96), (70, 92, 56), (108, 118, 88)], np.float32)
ROOFS = np.array(
    [
        (178, 80, 60),
        (160, 70, 50),
        (196, 112, 82),
        (122, 122, 128),
        (92, 94, 100),
        (150, 150, 152),
        (212, 206, 198),
        (226, 220, 210),
        (64, 64, 72),
        (82, 92, 112),
        (124, 84, 62),
        (188, 96, 70),
    ],
    np.uint8,
)
SHADOW_M = 2.0  # shadow length to the south-east in metres


def _texture(rng: np.random.Generator) -> np.ndarray:
    base = GROUND[rng.integers(len(GROUND))]
    out = np.empty((TEXTURE_PX, TEXTURE_PX, 3), np.float32)
    out[:] = base
    for cells, amplitude in ((6, 28.0), (48, 12.0)):
        noise = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        smooth = np.asarray(noise.resize((TEXTURE_PX, TEXTURE_PX), Image.BICUBIC), np.float32) / 255 - 0.5
        out += smooth[..., None] * amplitude
    out += rng.normal(0, 2.5, (TEXTURE_PX, TEXTURE_PX, 1)).astype(np.float32)
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):  # roads and paths: grey strokes that are not buildings
        a, b = rng.integers(0, TEXTURE_PX, 2), rng.integers(0, TEXTURE_PX, 2)
        grey = int(rng.integers(95, 150))
        draw.line([tuple(a), tuple(b)], fill=(grey, grey, grey - 4), width=int(rng.integers(5, 14)))
    return np.asarray(img)


def _rgbx(rgb: np.ndarray) -> np.ndarray:
    """[h, w, 3] uint8 -> [h, w] uint32 holding RGBX bytes (one gather or copy per pixel instead of three)."""
    return np.ascontiguousarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).view(np.uint32)[..., 0]


@functools.lru_cache(maxsize=4)
def renderer(seed: int) -> Renderer:
    """One renderer per seed (its textures take a moment to compute)."""
    return Renderer(seed)


class Renderer:
    def __init__(self, seed: int):
        rng = np.random.default_rng([seed, 0x7115])
        self.seed = seed
        textures = [_texture(rng) for _ in range(TEXTURES)]
        self.ground = [_rgbx(t) for t in textures]
        self.shaded = [_rgbx(t // 2 + 8) for t in textures]
        palette = np.zeros((256, 3), np.uint8)
        palette[1 : len(ROOFS) + 1] = ROOFS
        self.palette = _rgbx(palette[None])[0]

    def _window(self, z: int, x: int, y: int, size: int) -> tuple[int, slice, slice]:
        """Texture and window of a tile: neighbouring tiles continue each other within a texture-sized block."""
        if TEXTURE_PX % size:
            raise ValueError(f"tile size {size} does not divide {TEXTURE_PX}")
        per = TEXTURE_PX // size
        h = ((x // per) * 73856093) ^ ((y // per) * 19349663) ^ (z * 83492791) ^ (self.seed * 2654435761)
        oy, ox = (y % per) * size, (x % per) * size
        return h % TEXTURES, slice(oy, oy + size), slice(ox, ox + size)

    def render(self, z: int, x: int, y: int, size: int, objects: list[OsmObject]) -> Image.Image:
        """The tile (an RGBX image): ground, roofs exactly on the footprints' pixels, shadows to the south-east."""
        texture, rows, cols = self._window(z, x, y, size)
        out = self.ground[texture][rows, cols].copy()
        label = roof_labels(z, x, y, size, objects)
        if label is not None:
            inside = label > 0
            metres_per_px = 40_075_016.7 * math.cos(math.radians(_tile_lat(z, y))) / ((1 << z) * size)
            d = max(1, min(12, round(SHADOW_M / max(metres_per_px, 1e-3))))
            shadow = np.zeros_like(inside)
            shadow[d:, d:] = inside[:-d, :-d]
            shadow &= ~inside
            np.copyto(out, self.shaded[texture][rows, cols], where=shadow)
            np.copyto(out, self.palette[label], where=inside)
        return Image.frombuffer("RGBX", (size, size), out, "raw", "RGBX", 0, 1)


def tile_edges(objects: list[OsmObject]) -> np.ndarray | None:
    """[k, 5] float: every footprint ring edge in zoom-0 mercator units (x0, y0, x1, y1), and its weight.

    The weight is the building's roof colour, signed so that the winding sum is +colour inside the footprint and 0
    outside or in a hole, whatever the direction the rings were drawn in. One vectorised pass for all objects.
    """
    points: list[tuple[float, float]] = []
    lengths: list[int] = []
    weights: list[int] = []
    for obj in objects:
        if not obj.is_footprint:
            continue
        colour = 1 + (obj.id * 2654435761 >> 7) % len(ROOFS)
        for outer, holes in obj.polygons:
            for ring, weight in [(outer, colour)] + [(h, -colour) for h in holes]:
                points.extend(ring)
                lengths.append(len(ring))
                weights.append(weight)
    if not points:
        return None
    lonlat = np.array(points)
    ux = (lonlat[:, 0] + 180.0) / 360.0
    s = np.sin(np.radians(np.clip(lonlat[:, 1], -85.0511287798066, 85.0511287798066)))
    uy = 0.5 - np.log((1 + s) / (1 - s)) / (4 * math.pi)
    size = np.array(lengths)
    first = np.ones(len(points), bool)
    first[np.cumsum(size) - 1] = False  # the closing point of a ring starts no edge
    start = np.nonzero(first)[0]
    ring = np.repeat(np.arange(len(size)), size - 1)
    cross = ux[start] * uy[start + 1] - ux[start + 1] * uy[start]
    area = np.bincount(ring, weights=cross, minlength=len(size))
    weight = np.where(area > 0, -1, 1) * np.array(weights)
    return np.column_stack((ux[start], uy[start], ux[start + 1], uy[start + 1], weight[ring]))


def roof_labels(z: int, x: int, y: int, size: int, objects: list[OsmObject]) -> np.ndarray | None:
    """uint8 [size, size]: 0 for ground, else a roof colour in 1..len(ROOFS); None when no roof shows.

    A pixel is roof when its centre lies inside a footprint (holes excluded), SPEC's mask rule: each edge adds its
    signed weight at the first pixel centre right of where it crosses a row of centres, then a running sum along
    the row gives the winding number times the roof colour.
    """
    e = tile_edges(objects)
    if e is None:
        return None
    n = 1 << z
    x0, x1 = (e[:, 0] * n - x) * size, (e[:, 2] * n - x) * size
    y0, y1 = (e[:, 1] * n - y) * size, (e[:, 3] * n - y) * size
    r0 = np.clip(np.ceil(np.minimum(y0, y1) - 0.5), 0, size).astype(np.int64)
    r1 = np.clip(np.ceil(np.maximum(y0, y1) - 0.5), 0, size).astype(np.int64)
    counts = r1 - r0
    total = int(counts.sum())
    if total == 0:
        return None
    edge = np.repeat(np.arange(len(counts)), counts)
    rows = np.arange(total) - np.repeat(np.cumsum(counts) - counts - r0, counts)
    t = (rows + 0.5 - y0[edge]) / (y1[edge] - y0[edge])
    cols = np.clip(np.floor(x0[edge] + t * (x1[edge] - x0[edge]) - 0.5) + 1, 0, size).astype(np.int64)
    value = e[edge, 4].astype(np.int64) * np.where(y1[edge] > y0[edge], 1, -1)
    # Sorted by (row, col), the running sum of the crossings' values is the winding sum times the colour on the
    # span up to the next crossing; every row sums to zero, so the sum needs no reset between rows.
    order = np.lexsort((cols, rows))
    rows, cols, running = rows[order], cols[order], np.cumsum(value[order])
    span = (rows[:-1] == rows[1:]) & (running[:-1] != 0) & (cols[1:] > cols[:-1])
    start, length, colour = rows[:-1][span] * size + cols[:-1][span], (cols[1:] - cols[:-1])[span], running[:-1][span]
    if not len(length):
        return None
    if colour.max() > len(ROOFS) or colour.min() < 0:  # overlapping footprints (GeoJSON data): any roof colour
        colour = np.where(colour > 0, (colour - 1) % len(ROOFS) + 1, 0)
    label = np.zeros(size * size, np.uint8)
    offsets = np.cumsum(length) - length
    label[np.repeat(start - offsets, length) + np.arange(int(length.sum()))] = np.repeat(colour, length)
    return label.reshape(size, size)


def _tile_lat(z: int, y: int) -> float:
    return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * (y + 0.5) / (1 << z)))))


def encode(img: Image.Image | np.ndarray, fmt: str = "jpeg", quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    if img.mode != "RGB" and fmt != "jpeg":
        img = img.convert("RGB")
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=quality)
    elif fmt == "png":
        img.save(buf, "PNG", compress_level=1)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality)
    else:
        raise ValueError(f"unknown image format {fmt!r}: jpeg, png or webp")
    return buf.getvalue()


def blank(size: int, colour: tuple[int, int, int], fmt: str = "jpeg") -> bytes:
    return encode(np.full((size, size, 3), colour, np.uint8), fmt)
