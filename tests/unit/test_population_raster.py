"""Population rasters (HARVESTER_POPULATION_RASTER): pixel weights within sampling error, clipping to the region,
any projected CRS, nodata and junk files rejected as ConfigError, the sampler key naming the file's digest.

The rasters are 8 x 8 grids of 1 km pixels around central Paris, written per test in EPSG:3035 and EPSG:2154.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio
import rasterio.warp
import shapely
from rasterio.transform import Affine

from harvester import sampling
from harvester.errors import ConfigError
from harvester.population_raster import PopulationRaster
from harvester.sampling import PopulationSampler, Region, parse_region, region_outline
from tests.unit.test_sampling import assert_binomial


@pytest.fixture(scope="module")
def data() -> sampling.EmbeddedData:
    return sampling.load_embedded()


PIXEL = 1000.0


def grid_origin(crs: str) -> tuple[float, float]:
    """Top-left corner, in ``crs``, of an 8 x 8 km grid centred on central Paris."""
    (x,), (y,) = rasterio.warp.transform("EPSG:4326", crs, [2.345], [48.858])
    return math.floor(x / PIXEL) * PIXEL - 4 * PIXEL, math.floor(y / PIXEL) * PIXEL + 4 * PIXEL


def grid(crs: str) -> Affine:
    """The pixel-to-``crs`` transform of the test rasters (rasterio's from_origin warns under affine 3)."""
    west, north = grid_origin(crs)
    return Affine(PIXEL, 0.0, west, 0.0, -PIXEL, north)


def write_raster(path, values: np.ndarray, crs: str = "EPSG:3035", nodata: float | None = None) -> None:
    with rasterio.open(path, "w", driver="GTiff", width=values.shape[1], height=values.shape[0], count=1,
                       dtype="float32", crs=crs, transform=grid(crs),
                       nodata=nodata) as dst:
        dst.write(values.astype(np.float32), 1)


def apply(t, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f


def pixel_of(points: np.ndarray, crs: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = rasterio.warp.transform("EPSG:4326", crs, points[:, 0], points[:, 1])
    cols, rows = apply(~grid(crs), np.asarray(x), np.asarray(y))
    return np.floor(rows).astype(int), np.floor(cols).astype(int)


POPULATED = {(1, 1): 1.0, (2, 5): 2.0, (6, 3): 3.0, (7, 7): 4.0}


@pytest.fixture(params=["EPSG:3035", "EPSG:2154"])
def raster(tmp_path, request) -> tuple[str, str]:
    values = np.zeros((8, 8), np.float32)
    for pixel, value in POPULATED.items():
        values[pixel] = value
    values[4, 4] = 1000.0  # declared nodata: must be ignored although it would dominate
    values[0, 7] = -5.0  # negative: ignored
    values[3, 0] = np.nan  # undeclared nodata: ignored
    path = tmp_path / "population.tif"
    write_raster(path, values, crs=request.param, nodata=1000.0)
    return str(path), request.param


def test_raster_pixels_drawn_in_proportion_to_their_value(raster):
    path, crs = raster
    points = PopulationSampler(Region("france"), path).sample(20_000, seed=11)
    rows, cols = pixel_of(points, crs)
    hit = dict(zip(*np.unique(rows * 8 + cols, return_counts=True)))
    assert set(hit) <= {r * 8 + c for r, c in POPULATED}, "points only fall in populated pixels"
    total = sum(POPULATED.values())
    for (r, c), value in POPULATED.items():
        assert_binomial(hit.get(r * 8 + c, 0), len(points), value / total)


def test_raster_clipped_to_bbox(raster):
    path, crs = raster
    to_crs = grid(crs)
    lons, lats = rasterio.warp.transform(crs, "EPSG:4326", *apply(to_crs, np.array([0.0, 8.0]), np.array([0.0, 8.0])))
    _, (middle,) = rasterio.warp.transform(crs, "EPSG:4326", *apply(to_crs, np.array([4.0]), np.array([4.5])))
    # The grid's full width, from above row 0 down to the middle of row 4: holds pixels (1, 1) and (2, 5) only.
    box = (min(lons) - 0.02, middle, max(lons) + 0.02, max(lats) + 0.02)
    points = PopulationSampler(parse_region("bbox:" + ",".join(map(str, box))), path).sample(9_000, seed=2)
    assert ((points[:, 1] >= box[1]) & (points[:, 1] <= box[3])).all()
    rows, cols = pixel_of(points, crs)
    assert set(zip(rows, cols)) == {(1, 1), (2, 5)}
    assert_binomial(((rows == 1) & (cols == 1)).sum(), len(points), 1 / 3)


def test_raster_clipped_to_departement_outline(data, raster):
    path, _ = raster
    points = PopulationSampler(parse_region("dep:75"), path).sample(5_000, seed=4)
    paris = data.departement_outlines[list(data.departement_codes).index("75")]
    assert shapely.contains_xy(paris, points[:, 0], points[:, 1]).all()


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_unusable_rasters_are_config_errors(tmp_path):
    not_tiff = tmp_path / "population.txt"
    not_tiff.write_text("not a raster\n")
    empty = tmp_path / "empty.tif"
    write_raster(empty, np.zeros((8, 8), np.float32))
    cases = [str(tmp_path / "missing.tif"), str(not_tiff), str(empty)]
    for path in cases:
        with pytest.raises(ConfigError, match=r"^HARVESTER_POPULATION_RASTER: "):
            PopulationSampler(Region("france"), path)
    elsewhere = tmp_path / "elsewhere.tif"
    write_raster(elsewhere, np.ones((8, 8), np.float32))
    with pytest.raises(ConfigError, match=r"^HARVESTER_POPULATION_RASTER: .*does not cover region dep:2A"):
        PopulationSampler(parse_region("dep:2A"), str(elsewhere))
    no_crs = tmp_path / "no_crs.tif"
    with rasterio.open(no_crs, "w", driver="GTiff", width=4, height=4, count=1, dtype="float32") as dst:
        dst.write(np.ones((1, 4, 4), np.float32))
    with pytest.raises(ConfigError, match=r"^HARVESTER_POPULATION_RASTER: .*coordinate reference system"):
        PopulationSampler(Region("france"), str(no_crs))


def test_raster_draws_depend_only_on_the_generator(raster):
    path, _ = raster
    outline = region_outline(parse_region("dep:75,92,93,94"))
    first = PopulationRaster(path, outline, "dep:75,92,93,94")
    second = PopulationRaster(path, outline, "dep:75,92,93,94")
    draw = first.draw(np.random.default_rng(9), 500)
    assert draw.shape == (500, 2) and draw.dtype == np.float64
    assert np.array_equal(draw, second.draw(np.random.default_rng(9), 500))
    assert shapely.contains_xy(outline, draw[:, 0], draw[:, 1]).all()
    assert first.sha256 == second.sha256 and len(first.sha256) == 64


def test_sampler_key_names_the_raster_digest(tmp_path):
    first, second = tmp_path / "a.tif", tmp_path / "b.tif"
    values = np.zeros((8, 8), np.float32)
    values[1, 1] = 5
    write_raster(first, values)
    values[2, 2] = 1
    write_raster(second, values)
    keys = {PopulationSampler(Region("france"), str(p)).key for p in (first, second)}
    assert len(keys) == 2 and all(k.startswith("v1;france;raster:") for k in keys)
