"""harvester.tiles: slippy-map maths. Property tests (round trip, nesting, transform corners) and pinned examples."""

from __future__ import annotations

import math
import re
from pathlib import Path

import mercantile
import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from rasterio.warp import transform as proj_transform

from harvester.tiles import (
    MAX_LATITUDE_DEG,
    LonLatBounds,
    MercatorBounds,
    Tile,
    ancestor,
    area_tile,
    check_tile,
    from_mercator,
    lonlat_bounds,
    mercator_bounds,
    parse_zooms,
    pixel_grid,
    pixel_transform,
    tile_at,
    to_mercator,
)

KAMPALA = Path(__file__).resolve().parents[3] / "shared" / "data" / "kampala-oam"


@st.composite
def tiles(draw, min_zoom: int = 0, max_zoom: int = 30) -> Tile:
    z = draw(st.integers(min_zoom, max_zoom))
    return Tile(draw(st.integers(0, 2**z - 1)), draw(st.integers(0, 2**z - 1)), z)


lons = st.floats(-180.0, 180.0, allow_nan=False)
lats = st.floats(-MAX_LATITUDE_DEG, MAX_LATITUDE_DEG, allow_nan=False)
unit = st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)


# --- pinned examples ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("lon", "lat", "zoom", "expected"), [
    (2.3499, 48.8530, 17, Tile(66391, 45094, 17)),  # Notre-Dame de Paris
    (2.3499, 48.8530, 0, Tile(0, 0, 0)),
    (0.0, 0.0, 1, Tile(1, 1, 1)),  # on both edges: the east and south tiles own them
    (-180.0, MAX_LATITUDE_DEG, 5, Tile(0, 0, 5)),  # top-left corner of the world
    (180.0, -MAX_LATITUDE_DEG, 5, Tile(31, 31, 5)),  # bottom-right corner belongs to the last tile
    (13.4050, 89.9, 3, Tile(4, 0, 3)),  # beyond the square world: clamped
    (13.4050, -90.0, 3, Tile(4, 7, 3)),
    (32.5906, 0.3495, 21, Tile(1238430, 1046540, 21)),  # Kampala
])
def test_tile_at_pinned(lon, lat, zoom, expected):
    assert tile_at(lon, lat, zoom) == expected


def test_bounds_pinned():
    tile = Tile(66391, 45094, 17)
    assert lonlat_bounds(tile) == pytest.approx((2.34832763671875, 48.85206549830757, 2.35107421875, 48.85387273165655))
    assert mercator_bounds(tile) == pytest.approx(
        (261414.63673530146, 6249797.180709152, 261720.38484844193, 6250102.928822292), abs=1e-6)
    assert lonlat_bounds(Tile(0, 0, 0)) == pytest.approx((-180, -MAX_LATITUDE_DEG, 180, MAX_LATITUDE_DEG))
    assert mercator_bounds(Tile(0, 0, 0)) == pytest.approx((-20037508.342789244, -20037508.342789244,
                                                             20037508.342789244, 20037508.342789244))


def test_named_tuples_are_named():
    bounds = lonlat_bounds(Tile(1, 2, 3))
    assert isinstance(bounds, LonLatBounds) and bounds.west < bounds.east and bounds.south < bounds.north
    merc = mercator_bounds(Tile(1, 2, 3))
    assert isinstance(merc, MercatorBounds) and merc.left < merc.right and merc.bottom < merc.top
    assert Tile(1, 2, 3).z == 3
    with pytest.raises(AttributeError):
        Tile(1, 2, 3).x = 5  # frozen


@pytest.mark.skipif(not KAMPALA.is_dir(), reason=f"real tiles not present at {KAMPALA}")
def test_kampala_tile_names_match_their_labels():
    """The data set's tiles are named by an independent tool: each tile's centre maps back to its name."""
    names = sorted(KAMPALA.glob("OAM-*-*-*.png"))
    assert len(names) == 147
    for path in names:
        x, y, z = map(int, re.fullmatch(r"OAM-(\d+)-(\d+)-(\d+)\.png", path.name).groups())
        west, south, east, north = lonlat_bounds(Tile(x, y, z))
        assert tile_at((west + east) / 2, (south + north) / 2, z) == Tile(x, y, z)


# --- properties -----------------------------------------------------------------------------------------------------

@settings(max_examples=150)
@given(tiles(), unit, unit)
@example(Tile(66391, 45094, 17), 0.5, 0.5)
def test_round_trip_strictly_inside(tile, fx, fy):
    west, south, east, north = lonlat_bounds(tile)
    lon, lat = west + fx * (east - west), south + fy * (north - south)
    assume(west < lon < east and south < lat < north)
    assert tile_at(lon, lat, tile.z) == tile


@settings(max_examples=100)
@given(tiles())
def test_edge_rule(tile):
    """Top and left edges are in the tile; bottom and right edges belong to the neighbours (but not off the world)."""
    west, south, east, north = lonlat_bounds(tile)
    lon_mid, lat_mid = (west + east) / 2, (south + north) / 2
    last = 2**tile.z - 1
    assert tile_at(west, north, tile.z) == tile
    assert tile_at(west, lat_mid, tile.z) == tile
    assert tile_at(lon_mid, north, tile.z) == tile
    assert tile_at(east, lat_mid, tile.z) == Tile(min(tile.x + 1, last), tile.y, tile.z)
    assert tile_at(lon_mid, south, tile.z) == Tile(tile.x, min(tile.y + 1, last), tile.z)


@settings(max_examples=150)
@given(lons, lats, st.integers(0, 30))
def test_point_lies_in_its_tile(lon, lat, zoom):
    tile = tile_at(lon, lat, zoom)
    west, south, east, north = lonlat_bounds(tile)
    assert west <= lon and (lon < east or (lon == east == 180.0))
    assert lat <= north and (south < lat or (lat == south and tile.y == 2**zoom - 1))


@settings(max_examples=150)
@given(lons, st.floats(-90, 90), st.integers(1, 30), st.data())
def test_nesting(lon, lat, zoom, data):
    parent_zoom = data.draw(st.integers(0, zoom - 1))
    assert ancestor(tile_at(lon, lat, zoom), parent_zoom) == tile_at(lon, lat, parent_zoom)
    assert ancestor(tile_at(lon, lat, zoom), zoom - 1) == tile_at(lon, lat, zoom - 1)


@settings(max_examples=100)
@given(tiles(max_zoom=28))
def test_nesting_of_bounds(tile):
    """A child's bounds lie inside its parent's; the four children tile it exactly."""
    parent = lonlat_bounds(tile)
    children = [Tile(2 * tile.x + dx, 2 * tile.y + dy, tile.z + 1) for dx in (0, 1) for dy in (0, 1)]
    for child in children:
        assert ancestor(child, tile.z) == tile
        c = lonlat_bounds(child)
        assert parent.west <= c.west < c.east <= parent.east
        assert parent.south <= c.south < c.north <= parent.north
    assert lonlat_bounds(children[0]).west == parent.west and lonlat_bounds(children[3]).east == parent.east
    assert lonlat_bounds(children[0]).north == parent.north and lonlat_bounds(children[3]).south == parent.south


@settings(max_examples=200)
@given(tiles())
def test_agrees_with_mercantile(tile):
    assert lonlat_bounds(tile) == pytest.approx(tuple(mercantile.bounds(*tile)), rel=1e-12, abs=1e-9)
    assert mercator_bounds(tile) == pytest.approx(tuple(mercantile.xy_bounds(*tile)), rel=1e-12, abs=1e-6)
    west, south, east, north = lonlat_bounds(tile)
    centre = ((west + east) / 2, (south + north) / 2)
    assert tile_at(*centre, tile.z) == tuple(mercantile.tile(*centre, tile.z))


@settings(max_examples=100)
@given(tiles(), st.sampled_from([256, 512, 64]))
def test_pixel_transform_corners(tile, size):
    left, bottom, right, top = mercator_bounds(tile)
    transform = pixel_transform(tile, size)
    tolerance = 1e-6  # metres; the coordinates are up to 2e7 m, whose rounding step is 4e-9 m
    assert transform @ (0, 0) == pytest.approx((left, top), abs=tolerance)
    assert transform @ (size, size) == pytest.approx((right, bottom), abs=tolerance)
    assert transform @ (size, 0) == pytest.approx((right, top), abs=tolerance)
    assert transform @ (0.5, 0.5) == pytest.approx((left + transform.a / 2, top + transform.e / 2), abs=tolerance)
    assert transform.b == 0 and transform.d == 0 and transform.a > 0 and transform.e < 0  # north-up
    assert transform.a == pytest.approx((right - left) / size) and transform.e == pytest.approx(-(top - bottom) / size)
    assert (~transform) @ (left, top) == pytest.approx((0, 0), abs=1e-6)


@settings(max_examples=100)
@given(tiles(max_zoom=24))
def test_to_mercator_maps_bounds_to_mercator_bounds(tile):
    west, south, east, north = lonlat_bounds(tile)
    xs, ys = to_mercator(np.array([west, east]), np.array([south, north]))
    left, bottom, right, top = mercator_bounds(tile)
    assert (xs[0], ys[0], xs[1], ys[1]) == pytest.approx((left, bottom, right, top), rel=1e-12, abs=1e-6)


def test_to_mercator_agrees_with_proj():
    rng = np.random.default_rng(0)
    lon = rng.uniform(-180, 180, 2000)
    lat = rng.uniform(-85, 85, 2000)
    xs, ys = to_mercator(lon, lat)
    px, py = proj_transform("EPSG:4326", "EPSG:3857", lon.tolist(), lat.tolist())
    np.testing.assert_allclose(xs, px, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ys, py, rtol=0, atol=1e-6)
    x, y = to_mercator(2.3499, 48.8530)  # scalars work too
    assert float(x) == pytest.approx(261589.67141511, abs=1e-4) and float(y) == pytest.approx(6249955.27852148, abs=1e-4)
    _, y_clamped = to_mercator(0.0, 90.0)
    assert float(y_clamped) == pytest.approx(20037508.342789244)


@settings(max_examples=100)
@given(lons, lats, st.lists(st.integers(0, 24), min_size=1, max_size=4))
def test_area_tile_holds_every_zoom(lon, lat, zooms):
    area = area_tile(lon, lat, zooms)
    assert area.z == min(zooms)
    for zoom in zooms:
        assert ancestor(tile_at(lon, lat, zoom), area.z) == area


# --- refusals -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("lon", "lat", "zoom"), [
    (181.0, 0.0, 3), (-180.1, 0.0, 3), (0.0, 90.5, 3), (math.nan, 0.0, 3), (0.0, math.inf, 3), (0.0, 0.0, -1),
    (0.0, 0.0, 31),
])
def test_tile_at_refuses(lon, lat, zoom):
    with pytest.raises(ValueError):
        tile_at(lon, lat, zoom)


@pytest.mark.parametrize("tile", [Tile(2, 0, 1), Tile(0, -1, 1), Tile(0, 0, 31), Tile(0, 0, -1)])
def test_bad_tiles_refused(tile):
    with pytest.raises(ValueError):
        check_tile(tile)
    with pytest.raises(ValueError):
        lonlat_bounds(tile)
    with pytest.raises(ValueError):
        mercator_bounds(tile)


@given(tiles(), st.sampled_from([256, 512, 64, 1]))
def test_pixel_grid_holds_the_transform_numbers(tile, size):
    grid, transform = pixel_grid(tile, size), pixel_transform(tile, size)
    assert (grid.left, grid.top, grid.pixel_m, -grid.pixel_m) == (transform.c, transform.f, transform.a, transform.e)
    with pytest.raises(ValueError):
        pixel_grid(tile, -size)


def test_other_refusals():
    with pytest.raises(ValueError):
        ancestor(Tile(5, 5, 4), 5)
    with pytest.raises(ValueError):
        ancestor(Tile(5, 5, 4), -1)
    with pytest.raises(ValueError):
        area_tile(0.0, 0.0, [])
    with pytest.raises(ValueError):
        pixel_transform(Tile(0, 0, 0), 0)
    assert ancestor(Tile(5, 5, 4), 4) == Tile(5, 5, 4)
    assert check_tile((np.int64(1), 1, 1)) == Tile(1, 1, 1) and type(check_tile((np.int64(1), 1, 1)).x) is int


def test_parse_zooms_one_rule_for_harvester_and_trainer():
    assert parse_zooms(" 18, 17") == (17, 18)
    assert parse_zooms("0") == (0,)  # the trainer's filter may name any zoom; the harvester asks for minimum=1
    for bad, message in (("17,17", "repeat"), ("17,,18", "comma-separated"), ("", "comma-separated"),
                         ("17;18", "integer"), ("31", "between 0 and 30")):
        with pytest.raises(ValueError, match=message):
            parse_zooms(bad)
    with pytest.raises(ValueError, match="between 1 and 22"):
        parse_zooms("0,17", minimum=1, maximum=22)


def test_from_mercator_inverts_to_mercator_as_mercantile_does():
    lon = np.array([-180.0, -3.5, 0.0, 2.3522, 179.9])
    lat = np.array([-MAX_LATITUDE_DEG, -33.9, 0.0, 48.8566, MAX_LATITUDE_DEG])
    x, y = to_mercator(lon, lat)
    back_lon, back_lat = from_mercator(x, y)
    np.testing.assert_allclose(back_lon, lon, atol=1e-9)
    np.testing.assert_allclose(back_lat, lat, atol=1e-9)
    expected = np.array([mercantile.lnglat(a, b) for a, b in zip(x, y)])
    np.testing.assert_allclose(np.column_stack([back_lon, back_lat]), expected, atol=1e-9)
