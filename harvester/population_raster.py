"""Population-weighted points from a GeoTIFF of population counts (``HARVESTER_POPULATION_RASTER``, e.g. GHSL).

A pixel is drawn with probability proportional to its value (band 1), then a uniform point inside the pixel, kept only
when it falls inside the region's outline, so a pixel on the region's edge counts for the part of it inside. Negative,
non-finite and nodata values count as no population. The raster may be in any CRS with a declared reference system;
points come back in lon/lat (EPSG:4326). :class:`harvester.sampling.PopulationSampler` uses it.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
import rasterio.features
import rasterio.warp
import rasterio.windows
import shapely
from rasterio.transform import Affine

from harvester.errors import ConfigError

MAX_ROUNDS = 10_000  # rejection rounds per draw before giving up (populated pixels that barely touch the region)
WGS84 = "EPSG:4326"
_VAR = "HARVESTER_POPULATION_RASTER"


class PopulationRaster:
    """The positive pixels of a population GeoTIFF that touch a region, and draws from them.

    ``outline`` is the region as one lon/lat geometry; ``region_name`` only names it in error messages.
    ``sha256`` is the file's digest, so that a sample's identity changes when the raster does.
    """

    def __init__(self, path: str, outline: shapely.Geometry, region_name: str) -> None:
        self._region = outline
        shapely.prepare(self._region)
        try:
            with rasterio.open(path) as src:
                if src.crs is None:
                    raise ConfigError(f"{_VAR}: {path!r} has no coordinate reference system")
                self._crs = src.crs
                window = covering_window(src, self._region.bounds)
                if window is None:
                    raise ConfigError(f"{_VAR}: {path!r} does not cover region {region_name}")
                values = src.read(1, window=window, masked=True).filled(0).astype(np.float64)
                x0, y0 = apply_affine(src.transform, window.col_off, window.row_off)  # the window's top-left corner
                self._transform = Affine(src.transform.a, src.transform.b, x0, src.transform.d, src.transform.e, y0)
            with open(path, "rb") as f:
                self.sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        except (rasterio.errors.RasterioError, OSError) as exc:
            raise ConfigError(f"{_VAR}: cannot read {path!r} as a GeoTIFF: {exc}") from exc
        values[~np.isfinite(values) | (values < 0)] = 0  # nodata without a declared nodata value
        # Pixels within a pixel of the region (rasterised in the raster's CRS): a superset; draw() clips exactly.
        in_crs = shapely.transform(shapely.segmentize(self._region, 0.01), self._to_raster_crs)
        pixel = max(math.hypot(self._transform.a, self._transform.d), math.hypot(self._transform.b, self._transform.e))
        near_region = shapely.buffer(shapely.simplify(in_crs, pixel / 2), 1.5 * pixel)  # simplify: 4x faster buffer
        near = rasterio.features.rasterize([near_region], out_shape=values.shape,
                                           transform=self._transform, all_touched=True, dtype="uint8")
        self._pixels = np.flatnonzero((near > 0) & (values > 0))
        if self._pixels.size == 0:
            raise ConfigError(f"{_VAR}: {path!r} has no population (positive pixels) in region {region_name}")
        self._cumulative = np.cumsum(values.ravel()[self._pixels])
        self._width = values.shape[1]

    def _to_raster_crs(self, lon_lat: np.ndarray) -> np.ndarray:
        x, y = rasterio.warp.transform(WGS84, self._crs, lon_lat[:, 0], lon_lat[:, 1])
        return np.column_stack([x, y])

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` lon/lat points: a pixel by weight, a uniform point in it, kept when inside the region (else both
        are drawn again). Deterministic for a given generator state."""
        out = np.empty((size, 2))
        todo = np.arange(size)
        for _ in range(MAX_ROUNDS):
            if todo.size == 0:
                return out
            # Inverse-CDF draw over the cumulative pixel values; the clamp guards against rng.random() * total
            # rounding up to the total itself.
            picks = np.searchsorted(self._cumulative, rng.random(todo.size) * self._cumulative[-1], side="right")
            picks = np.minimum(picks, self._cumulative.size - 1)
            row, col = np.divmod(self._pixels[picks], self._width)
            u = rng.random((todo.size, 2))
            x, y = apply_affine(self._transform, col + u[:, 0], row + u[:, 1])
            lon, lat = (np.asarray(v, dtype=np.float64) for v in rasterio.warp.transform(self._crs, WGS84, x, y))
            inside = shapely.contains_xy(self._region, lon, lat)
            out[todo[inside]] = np.column_stack([lon[inside], lat[inside]])
            todo = todo[~inside]
        raise RuntimeError(f"no raster point inside the region after {MAX_ROUNDS} tries")


def apply_affine(transform: Affine, cols: Any, rows: Any) -> tuple[Any, Any]:
    """``transform`` applied to arrays (affine's ``*`` on tuples is deprecated, its ``@`` is new in affine 3)."""
    return transform.a * cols + transform.b * rows + transform.c, transform.d * cols + transform.e * rows + transform.f


def covering_window(src: rasterio.DatasetReader, lon_lat_bounds: tuple[float, ...]) -> rasterio.windows.Window | None:
    """The smallest pixel window of ``src`` covering a lon/lat box, or None when they do not overlap."""
    x0, y0, x1, y1 = rasterio.warp.transform_bounds(WGS84, src.crs, *lon_lat_bounds, densify_pts=21)
    cols, rows = apply_affine(~src.transform, np.array([x0, x0, x1, x1]), np.array([y0, y1, y0, y1]))
    col0, row0 = max(0, math.floor(cols.min())), max(0, math.floor(rows.min()))
    col1, row1 = min(src.width, math.ceil(cols.max())), min(src.height, math.ceil(rows.max()))
    if col1 <= col0 or row1 <= row0:
        return None
    return rasterio.windows.Window(col0, row0, col1 - col0, row1 - row0)
