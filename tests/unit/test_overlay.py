"""The pictures' building blocks (harvester.overlay): outlines, masks drawn over tiles, the TP/FP/FN picture."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from harvester.overlay import (FN_COLOUR, FP_COLOUR, OUTLINE_COLOUR, TP_COLOUR, confusion_picture, draw_mask,
                               outline, save_png)


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (256, 256, 3), dtype=np.uint8)


def test_outline_of_a_rectangle_is_its_one_pixel_border():
    mask = np.zeros((256, 256), np.uint8)
    mask[40:60, 100:130] = 1
    edge = outline(mask)
    assert edge.sum() == 2 * 20 + 2 * 30 - 4
    assert edge[40, 100:130].all() and edge[59, 100:130].all() and edge[40:60, 100].all() and edge[40:60, 129].all()
    assert not edge[41:59, 101:129].any() and not edge[~mask.astype(bool)].any()


def test_a_building_cut_by_the_tile_edge_is_not_outlined_along_the_edge():
    mask = np.zeros((256, 256), bool)
    mask[0:10, 0:10] = True
    edge = outline(mask)
    assert edge[9, 0:10].all() and edge[0:10, 9].all()
    assert edge.sum() == 19  # the two inner sides only


def test_draw_mask_outlines_tints_and_leaves_the_rest_untouched():
    image = _image()
    mask = np.zeros((256, 256), bool)
    mask[100:140, 20:90] = True
    mask[200:210, 200:256] = True
    drawn = draw_mask(image, mask)
    border = mask & ~ndimage.binary_erosion(mask, border_value=1)
    inner = mask & ~border
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert (drawn[border] == OUTLINE_COLOUR).all()
    assert (drawn[~mask] == image[~mask]).all()
    expected = np.rint(0.7 * image[inner] + 0.3 * np.array(OUTLINE_COLOUR)).astype(np.uint8)
    assert np.abs(drawn[inner].astype(int) - expected).max() <= 1
    assert (image == _image()).all()  # the input is not modified


def test_confusion_colours_match_a_known_prediction(tmp_path):
    image = _image(1)
    truth = np.zeros((256, 256), bool)
    predicted = np.zeros((256, 256), bool)
    truth[10:110, 10:110] = True  # a building
    predicted[60:160, 60:160] = True  # a prediction overlapping it by 50 x 50
    picture = confusion_picture(image, truth, predicted)
    # read back from the PNG a person would open: lossless, the colours exact
    path = save_png(picture, tmp_path / "confusion.png")
    with Image.open(path) as png:
        assert png.size == (256, 256) and png.mode == "RGB"
        read = np.asarray(png)

    def where(colour):
        return (read == colour).all(axis=2)

    assert where(TP_COLOUR).sum() == 50 * 50 and where(TP_COLOUR)[60:110, 60:110].all()
    assert where(FP_COLOUR).sum() == 100 * 100 - 50 * 50 and not where(FP_COLOUR)[truth].any()
    assert where(FN_COLOUR).sum() == 100 * 100 - 50 * 50 and not where(FN_COLOUR)[predicted].any()
    rest = ~(truth | predicted)
    assert (read[rest][:, 0] == read[rest][:, 1]).all() and (read[rest][:, 1] == read[rest][:, 2]).all()  # grey
    assert read[rest].max() <= 128 and read[rest].std() > 10  # the tile, dimmed: still visible, not blank


def test_save_png_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"old")
    save_png(np.zeros((4, 5, 3), np.uint8), path)
    with Image.open(path) as png:
        assert png.size == (5, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
