"""Border/gap targets and the separation of a mask into buildings, on hand-made instance maps."""

import numpy as np
import pytest

from trainer.instances import border_target, separate_buildings


def _tile(size=16):
    return np.zeros((size, size), np.uint16)


def test_two_touching_buildings_border_on_both_sides_of_the_shared_edge():
    instances = _tile()
    instances[4:10, 2:6] = 1
    instances[4:10, 6:11] = 2  # shares the edge between columns 5 and 6
    mask = instances > 0
    border = border_target(mask, instances)
    expected = np.zeros_like(border)
    expected[4:10, 5:7] = 1  # the last column of 1 and the first of 2
    # and the background at both ends of the shared edge: within 2 px of both buildings (where a gap would open)
    expected[2:4, 4:8] = expected[10:12, 4:8] = 1
    np.testing.assert_array_equal(border, expected)
    # the mask alone cannot see the edge: one connected component, no border
    assert border_target(mask).sum() == 0


@pytest.mark.parametrize("gap", [1, 2])
def test_a_gap_of_one_or_two_pixels_is_border_from_instances_and_from_the_mask(gap):
    instances = _tile()
    instances[3:9, 2:6] = 1
    instances[3:9, 6 + gap:11] = 2
    mask = instances > 0
    expected = np.zeros((16, 16), np.uint8)
    expected[3:9, 6:6 + gap] = 1  # the background columns between them; the buildings do not touch
    # rows just above and below the gap are within 2 px of both buildings too (diagonally)
    expected[1:3, 6:6 + gap] = expected[9:11, 6:6 + gap] = 1
    if gap == 1:  # a 1-pixel gap: the pixels beside it lie within 2 px of both buildings as well
        expected[1:3, 5] = expected[9:11, 5] = expected[1:3, 7] = expected[9:11, 7] = 1
    for border in (border_target(mask, instances), border_target(mask)):
        np.testing.assert_array_equal(border, expected)
        assert not (border.astype(bool) & mask).any()


def test_lone_building_and_empty_tile_have_no_border():
    instances = _tile()
    instances[5:9, 5:9] = 7
    assert border_target(instances > 0, instances).sum() == 0
    assert border_target(instances > 0).sum() == 0
    empty = _tile()
    assert border_target(empty, empty).sum() == 0
    assert border_target(empty > 0).dtype == np.uint8


def test_far_apart_buildings_have_no_border():
    instances = _tile()
    instances[2:5, 2:5] = 1
    instances[10:14, 10:14] = 2  # 5 px apart
    assert border_target(instances > 0, instances).sum() == 0


def test_two_touching_squares_are_two_buildings_only_with_a_border_between_them():
    mask = np.zeros((16, 16), bool)
    mask[4:10, 2:12] = True  # two 6x5 squares side by side, columns 2-6 and 7-11
    border = np.zeros((16, 16), np.uint8)
    border[4:10, 6:8] = 1
    labels, count = separate_buildings(mask, border)
    assert count == 2
    assert (labels > 0).sum() == mask.sum() and ((labels > 0) == mask).all()  # grown back over the whole building
    left, right = labels[5, 2], labels[5, 11]
    assert left != right and (labels[4:10, 2:7] == left).all() and (labels[4:10, 7:12] == right).all()
    assert separate_buildings(mask, None)[1] == 1
    assert separate_buildings(mask, np.zeros_like(border))[1] == 1


def test_a_building_predicted_all_border_is_still_one_building():
    mask = np.zeros((12, 12), bool)
    mask[2:4, 2:4] = True
    mask[6:10, 6:10] = True
    border = np.zeros((12, 12), np.uint8)
    border[2:4, 2:4] = 1
    labels, count = separate_buildings(mask, border)
    assert count == 2 and ((labels > 0) == mask).all()
    assert len(np.unique(labels[mask])) == 2


def test_min_area_drops_small_buildings_and_renumbers_the_rest():
    mask = np.zeros((16, 16), bool)
    mask[1:3, 1:3] = True  # 4 px: speckle
    mask[5:10, 5:10] = True  # 25 px
    mask[12:15, 1:4] = True  # 9 px
    labels, count = separate_buildings(mask, None, min_area=9)
    assert count == 2
    assert sorted(np.unique(labels[labels > 0]).tolist()) == [1, 2]  # numbered 1..count again
    assert not labels[1:3, 1:3].any() and (labels[5:10, 5:10] > 0).all() and (labels[12:15, 1:4] > 0).all()
    assert separate_buildings(mask, None, min_area=0)[1] == 3
    assert separate_buildings(mask, None, min_area=26)[1] == 0
