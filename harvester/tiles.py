"""Web Mercator tile maths: the slippy-map scheme (XYZ, y counted from the north), nothing else.

Follows https://wiki.openstreetmap.org/wiki/Slippy_map_tilenames and EPSG:3857 (spherical Web Mercator, sphere radius
6,378,137 m). Latitudes are clamped to +-85.0511287798 degrees, the edge of the square world.

Edge rule: the top and left edges of a tile are in the tile, the bottom and right edges are not (they belong to the
neighbours), except at the bottom and right edges of the world, which belong to the last row and column.
:func:`tile_at` is exact with respect to :func:`lonlat_bounds`: a point that lies inside ``lonlat_bounds(t)`` by that
rule maps to ``t``, also within a rounding error of an edge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # imported where used: the trainer reads tile maths on GPU hosts that have no rasterio
    from rasterio.transform import Affine

EARTH_RADIUS_M = 6378137.0
#: Half the side of the square world in EPSG:3857 metres (pi * radius).
ORIGIN_SHIFT_M = math.pi * EARTH_RADIUS_M
#: The latitude where Web Mercator's square world ends: atan(sinh(pi)), in degrees.
MAX_LATITUDE_DEG = math.degrees(math.atan(math.sinh(math.pi)))
MAX_ZOOM = 30


class Tile(NamedTuple):
    """A slippy-map tile: column ``x`` (from the west), row ``y`` (from the north), zoom ``z``; all integers."""

    x: int
    y: int
    z: int


class LonLatBounds(NamedTuple):
    """A tile's edges in degrees (EPSG:4326 longitude and latitude)."""

    west: float  # degrees of longitude
    south: float  # degrees of latitude
    east: float  # degrees of longitude
    north: float  # degrees of latitude


class MercatorBounds(NamedTuple):
    """A tile's edges in metres of EPSG:3857 (Web Mercator)."""

    left: float  # metres, easting
    bottom: float  # metres, northing
    right: float  # metres, easting
    top: float  # metres, northing


def parse_zooms(text: str, *, minimum: int = 0, maximum: int = MAX_ZOOM) -> tuple[int, ...]:
    """``" 18, 17"`` -> ``(17, 18)``: comma-separated zoom levels, sorted. The one rule of the harvester's and the
    trainer's zoom lists: every item an integer in ``minimum..maximum``, none empty, none repeated (a repeat is a typo).
    Raises ``ValueError`` with a message that names no setting (callers add the name)."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ValueError(f"expected comma-separated zoom levels such as 17,18, got {text!r}")
    try:
        zooms = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"expected comma-separated integer zoom levels such as 17,18, got {text!r}") from None
    if any(not minimum <= z <= maximum for z in zooms):
        raise ValueError(f"zoom levels must lie between {minimum} and {maximum}, got {text!r}")
    if len(set(zooms)) != len(zooms):
        raise ValueError(f"zoom levels repeat in {text!r}")
    return tuple(sorted(zooms))


def check_tile(tile: Tile) -> Tile:
    """Return ``tile`` as a :class:`Tile` of ints; raise ``ValueError`` when it is not a tile of the world."""
    x, y, z = (int(v) for v in tile)
    if not 0 <= z <= MAX_ZOOM:
        raise ValueError(f"zoom {z} is outside 0..{MAX_ZOOM}")
    if not (0 <= x < 2**z and 0 <= y < 2**z):
        raise ValueError(f"tile {x}/{y} is outside the 2^{z} x 2^{z} grid of zoom {z}")
    return Tile(x, y, z)


def _west_deg(x: int, z: int) -> float:
    return x / 2**z * 360.0 - 180.0


def _north_deg(y: int, z: int) -> float:
    return math.degrees(math.atan(math.sinh(math.pi * (1.0 - 2.0 * y / 2**z))))


def lonlat_bounds(tile: Tile) -> LonLatBounds:
    """The tile's (west, south, east, north) in degrees."""
    x, y, z = check_tile(tile)
    return LonLatBounds(_west_deg(x, z), _north_deg(y + 1, z), _west_deg(x + 1, z), _north_deg(y, z))


def mercator_bounds(tile: Tile) -> MercatorBounds:
    """The tile's (left, bottom, right, top) in EPSG:3857 metres."""
    x, y, z = check_tile(tile)
    side = 2.0 * ORIGIN_SHIFT_M / 2**z
    return MercatorBounds(
        -ORIGIN_SHIFT_M + x * side,
        ORIGIN_SHIFT_M - (y + 1) * side,
        -ORIGIN_SHIFT_M + (x + 1) * side,
        ORIGIN_SHIFT_M - y * side,
    )


class PixelGrid(NamedTuple):
    """A tile image's pixel grid in EPSG:3857: its north-west corner and the side of one (square) pixel."""

    left: float  # metres, easting of the west edge
    top: float  # metres, northing of the north edge
    pixel_m: float  # metres, side of one pixel


def pixel_grid(tile: Tile, size: int = 256) -> PixelGrid:
    """The grid of a ``size`` x ``size`` image of the tile: :func:`pixel_transform`'s numbers, without the Affine."""
    if size <= 0:
        raise ValueError(f"tile image size must be positive, got {size}")
    left, _, _, top = mercator_bounds(tile)
    return PixelGrid(left, top, 2.0 * ORIGIN_SHIFT_M / 2 ** tile[2] / size)


def pixel_transform(tile: Tile, size: int = 256) -> Affine:
    """The affine map from (column, row) pixel coordinates of a ``size`` x ``size`` tile image to EPSG:3857 metres.

    North-up: pixel (0, 0) is the top-left corner of the tile, (size, size) its bottom-right corner; pixel
    (c, r) covers [c, c+1) x [r, r+1), so its centre is (c + 0.5, r + 0.5). This is the GDAL geotransform convention.
    """
    from rasterio.transform import Affine

    left, top, pixel_m = pixel_grid(tile, size)
    return Affine(pixel_m, 0.0, left, 0.0, -pixel_m, top)


def _check_lonlat(lon: float, lat: float) -> tuple[float, float]:
    lon, lat = float(lon), float(lat)
    if not (math.isfinite(lon) and -180.0 <= lon <= 180.0):
        raise ValueError(f"longitude {lon} is outside -180..180 degrees")
    if not (math.isfinite(lat) and -90.0 <= lat <= 90.0):
        raise ValueError(f"latitude {lat} is outside -90..90 degrees")
    return lon, min(max(lat, -MAX_LATITUDE_DEG), MAX_LATITUDE_DEG)


def tile_at(lon: float, lat: float, zoom: int) -> Tile:
    """The tile of zoom ``zoom`` that holds the point (degrees), by the module's edge rule.

    The formula gives a first guess; one step of correction against the exact edges of :func:`lonlat_bounds` then
    removes the rounding error of the formula, so that the two functions never disagree.
    """
    lon, lat = _check_lonlat(lon, lat)
    z = int(zoom)
    if not 0 <= z <= MAX_ZOOM:
        raise ValueError(f"zoom {z} is outside 0..{MAX_ZOOM}")
    last = 2**z - 1
    x = min(max(math.floor((lon + 180.0) / 360.0 * 2**z), 0), last)
    if x > 0 and lon < _west_deg(x, z):
        x -= 1
    elif x < last and lon >= _west_deg(x + 1, z):
        x += 1
    lat_rad = math.radians(lat)
    y_exact = (1.0 - math.asinh(math.tan(lat_rad)) / math.pi) / 2.0 * 2**z
    y = min(max(math.floor(y_exact), 0), last)
    if y > 0 and lat > _north_deg(y, z):
        y -= 1
    elif y < last and lat <= _north_deg(y + 1, z):
        y += 1
    return Tile(x, y, z)


def ancestor(tile: Tile, zoom: int) -> Tile:
    """The tile of zoom ``zoom`` (<= the tile's zoom) that contains ``tile``."""
    x, y, z = check_tile(tile)
    if not 0 <= zoom <= z:
        raise ValueError(f"ancestor zoom {zoom} must be between 0 and the tile's zoom {z}")
    shift = z - zoom
    return Tile(x >> shift, y >> shift, zoom)


def area_tile(lon: float, lat: float, zooms: Iterable[int]) -> Tile:
    """The tile at the smallest of ``zooms`` that holds the point: the area one Overpass query covers.

    Every tile of the larger zooms holding the same point is inside it (tiles nest), so one query serves them all.
    """
    zooms = list(zooms)
    if not zooms:
        raise ValueError("area_tile needs at least one zoom")
    return tile_at(lon, lat, min(zooms))


def from_mercator(x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`to_mercator`: EPSG:3857 (x, y) metres to longitudes and latitudes in degrees."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return np.degrees(x / EARTH_RADIUS_M), np.degrees(np.arctan(np.sinh(y / EARTH_RADIUS_M)))


def to_mercator(lon: np.ndarray | float, lat: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Project longitudes and latitudes (degrees, arrays or scalars) to EPSG:3857 (x, y) metres, vectorized.

    Latitudes are clamped to the square world. The signature fits ``shapely.transform(g, to_mercator,
    interleaved=False)``.
    """
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.clip(np.asarray(lat, dtype=np.float64), -MAX_LATITUDE_DEG, MAX_LATITUDE_DEG)
    x = np.radians(lon) * EARTH_RADIUS_M
    y = np.arctanh(np.sin(np.radians(lat))) * EARTH_RADIUS_M
    return x, y
