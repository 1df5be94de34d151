"""harvester.labels.pbf: the footprint rule on a real .osm.pbf (written with pyosmium): what is kept, repaired, dropped."""

from __future__ import annotations

from collections import Counter

import osmium
import pytest
import shapely
from osmium.osm import mutable

from harvester.errors import InputFileError
from harvester.labels.osm import REPAIRED
from harvester.labels.pbf import footprint_batches, read_header
from tests.fakes.pbf import objects_in, write_extract
from tests.fakes.world import World

SQUARE = [(0.0, 0.0), (1e-3, 0.0), (1e-3, 1e-3), (0.0, 1e-3)]


def _write(path, nodes, ways, relations):
    writer = osmium.SimpleWriter(str(path), overwrite=True)
    try:
        for node_id, (where, tags) in sorted(nodes.items()):
            writer.add_node(mutable.Node(id=node_id, location=where, tags=tags))
        for way_id, (refs, tags) in sorted(ways.items()):
            writer.add_way(mutable.Way(id=way_id, nodes=refs, tags=tags))
        for rel_id, (members, tags) in sorted(relations.items()):
            writer.add_relation(mutable.Relation(id=rel_id, members=members, tags=tags))
    finally:
        writer.close()


def _square_nodes(first_id, dx=0.0):
    return {first_id + i: ((dx + x, y), {}) for i, (x, y) in enumerate(SQUARE)}


def test_footprint_rule_on_a_hand_made_extract(tmp_path):
    nodes = {}
    for k in range(9):  # nodes 10k+1 .. 10k+4: the corners of a square 0.01 k degrees east
        nodes.update(_square_nodes(10 * k + 1, dx=0.01 * k))
    nodes[500] = ((0.5, 0.5), {"building": "yes"})  # a node is never a footprint
    b = {"building": "yes"}
    ways = {
        1: ([1, 2, 3, 4, 1], b),  # a plain square
        2: ([11, 13, 12, 14, 11], b),  # a bow tie: repaired, kept
        3: ([21, 22, 23, 24], b),  # unclosed
        4: ([31, 32, 33, 34, 31], {"building": "no"}),
        5: ([41, 42, 43, 44, 41], {"building:part": "yes"}),
        6: ([51, 52, 53, 999, 51], b),  # node 999 is not in the file
        # relation 10: outer ring split over two untagged ways sharing nodes 61 and 63 (one reversed)
        20: ([61, 62, 63], {}), 21: ([61, 64, 63], {}),
        # relation 11: a dangling outer and a member the file does not hold
        23: ([71, 72, 73], {}),
        # relation 12's outer way is tagged building itself: both are footprints, as Overpass returns both
        24: ([1, 2, 3, 4, 1], {"building": "yes", "building:levels": "3", "name": "tagged member"}),
        30: ([81, 82, 83, 84, 81], {"highway": "service"}),  # a closed road
    }
    relations = {
        10: ([("w", 20, "outer"), ("w", 21, "outer"), ("n", 500, "label")], {"type": "multipolygon", **b}),
        11: ([("w", 23, "outer"), ("w", 98, "outer")], {"type": "multipolygon", **b}),
        12: ([("w", 24, "outer")], {"type": "multipolygon", "building": "church"}),
        13: ([("w", 1, "outline")], {"type": "building", **b}),
        14: ([("w", 30, "outer")], {"type": "multipolygon", "building": "no"}),
    }
    path = tmp_path / "hand.osm.pbf"
    _write(path, nodes, ways, relations)

    tally: Counter[str] = Counter()
    found = {(f.osm_type, f.osm_id): f for batch in footprint_batches(path, tally, batch=2) for f in batch}
    assert set(found) == {("way", 1), ("way", 2), ("way", 24), ("relation", 10), ("relation", 12)}
    assert all(shapely.is_valid(f.geometry) and f.geometry.area > 0 for f in found.values())
    assert found[("relation", 10)].geometry.equals(shapely.box(0.06, 0, 0.061, 1e-3))
    assert found[("way", 24)].tags == {"building": "yes", "building:levels": "3"}  # the tags kept of a way
    assert found[("relation", 12)].tags == {"type": "multipolygon", "building": "church"}
    assert tally.pop(REPAIRED) == 1
    assert tally == {"way_unclosed": 1, "building_no": 2, "way_missing_or_bad_geometry": 1,
                     "relation_member_missing_geometry": 1, "relation_member_dangling": 1,
                     "relation_no_outer_ring": 1, "relation_not_multipolygon": 1}
    assert read_header(path) == (None, None)


def test_extract_of_the_fake_world_holds_exactly_its_footprints(tmp_path):
    world, box = World(seed=3), (2.35, 48.85, 2.36, 48.856)
    path = tmp_path / "world.osm.pbf"
    counts = write_extract(world, box, path)
    expected = {(o.type, o.id): o.shape() for o in objects_in(world, box) if o.is_footprint}
    found = {(f.osm_type, f.osm_id): f.geometry for batch in footprint_batches(path, Counter()) for f in batch}
    assert len(found) == counts["footprints"] > 50 and found.keys() == expected.keys()
    assert all(found[key].equals(shape) for key, shape in expected.items())
    assert read_header(path).replication_sequence == 4321


@pytest.mark.parametrize("content", [b"", b"not a pbf\n" * 50, None])
def test_unreadable_files_raise_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.osm.pbf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputFileError, match="bad.osm.pbf"):
        read_header(path)
