"""Building masks: footprints burnt onto a tile's pixel grid, and the mask's PNG encoding. No I/O here.

Mask rule (SPEC.md): a pixel is building when its centre lies inside a building footprint (holes excluded), on the
tile's Web Mercator (EPSG:3857) pixel grid. The footprints are projected with :func:`harvester.tiles.to_mercator` and
burnt by GDAL's polygon rasterizer (``rasterio.features.rasterize``, ``all_touched=False``), whose rule is exactly
that one: a pixel is burnt when its centre is inside the polygon, by an even-odd scan line through the pixel centres,
so holes stay empty (https://gdal.org/en/stable/programs/gdal_rasterize.html, ``-at`` off). A centre exactly on an
edge is decided by the scan line's half-open intervals; real footprints put no centre exactly on an edge (the unit
tests compare every pixel with ``shapely.contains_xy`` on real buildings).

Footprints must be valid polygons (as :func:`harvester.osm.parse_buildings` returns them): on a self-intersecting
ring the even-odd scan line and the OGC "inside" disagree.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import rasterio.features
import shapely
from PIL import Image

from .tiles import Tile, lonlat_bounds, mercator_bounds, pixel_transform, to_mercator

#: zlib level of the mask PNGs. Measured on the 147 Kampala masks (mean size, encode time): level 1 1.37 kB 0.50 ms,
#: 3 1.26 kB 0.46 ms, 6 0.98 kB 0.83 ms, 9 0.74 kB 4.8 ms. Level 6: a fifth smaller than 1-3 for well under 1 ms.
PNG_COMPRESS_LEVEL = 6

_POLYGON, _MULTIPOLYGON, _COLLECTION = 3, 6, 7  # shapely.get_type_id


def rasterize(footprints: Sequence[shapely.Geometry], tile: Tile, size: int = 256) -> np.ndarray:
    """The (size, size) uint8 mask of ``tile``: 1 where a pixel centre is inside a footprint (lon/lat degrees), else 0.

    Row 0 is the tile's north edge, column 0 its west edge. Footprints that miss the tile cost little: they are
    dropped before burning.
    """
    mask = np.zeros((size, size), dtype=np.uint8)
    geometries = _polygonal(np.asarray(footprints, dtype=object).reshape(-1))
    # A cheap first cut in degrees, with a margin that dwarfs the difference between straight edges in degrees and
    # in metres; the exact cut is made on the projected shapes.
    west, south, east, north = lonlat_bounds(tile)
    pad_x, pad_y = (east - west) / 100, (north - south) / 100
    geometries = geometries[shapely.intersects(geometries, shapely.box(west - pad_x, south - pad_y,
                                                                       east + pad_x, north + pad_y))]
    if geometries.size == 0:
        return mask
    projected = shapely.transform(geometries, to_mercator, interleaved=False)
    left, bottom, right, top = mercator_bounds(tile)
    on_tile = shapely.intersects(projected, shapely.box(left, bottom, right, top))
    shapes = [(geometry, 1) for geometry in projected[on_tile]]
    if shapes:
        rasterio.features.rasterize(shapes, out=mask, transform=pixel_transform(tile, size), all_touched=False,
                                    default_value=1)
    return mask


def _polygonal(geometries: np.ndarray) -> np.ndarray:
    """Only the polygons: GDAL would burn every pixel a line or point touches, which no footprint rule wants."""
    types = shapely.get_type_id(geometries)
    keep = geometries[(types == _POLYGON) | (types == _MULTIPOLYGON)]
    collections = geometries[types == _COLLECTION]
    if collections.size:
        parts = shapely.get_parts(collections)
        parts = parts[np.isin(shapely.get_type_id(parts), (_POLYGON, _MULTIPOLYGON))]
        keep = np.concatenate([keep, parts])
    return keep


def encode_mask_png(mask: np.ndarray) -> bytes:
    """An 8-bit, one-channel (greyscale) PNG of a 2-D mask; nonzero pixels are written as 1."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask is 2-D, got shape {mask.shape}")
    out = io.BytesIO()
    Image.fromarray((mask != 0).astype(np.uint8)).save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


def decode_mask_png(data: bytes) -> np.ndarray:
    """The uint8 mask of a one-channel PNG, as 0/1 (nonzero = building, SPEC.md)."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.mode not in ("L", "1", "P", "I", "I;16"):
                raise ValueError(f"a mask PNG has one channel, this one is {image.mode}")
            pixels = np.asarray(image)
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"not a readable mask PNG ({len(data)} bytes): {exc}") from exc
    return (pixels != 0).astype(np.uint8)
