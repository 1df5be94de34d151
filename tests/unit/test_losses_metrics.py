"""Loss and metrics on cases small enough to compute by hand."""

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from trainer import losses
from trainer.metrics import PixelCounts, SegmentationMetrics, confusion_counts, match_objects

# ----------------------------------------------------------------------------------------------- loss

bce_dice_loss = jax.jit(losses.bce_dice_loss, static_argnames="dice_weight")


def test_loss_at_zero_logits_by_hand():
    # one 2x2 sample, one building pixel; sigmoid(0) = 0.5 everywhere
    logits = jnp.zeros((1, 2, 2))
    masks = jnp.array([[[1, 0], [0, 0]]], jnp.uint8)
    loss, parts = bce_dice_loss(logits, masks, jnp.array([True]))
    # BCE = ln 2 per pixel. Dice: probs sum 2, targets sum 1, intersection 0.5 -> 1 - (1 + 1) / (3 + 1) = 0.5
    assert float(parts["bce"]) == pytest.approx(math.log(2), rel=1e-6)
    assert float(parts["dice"]) == pytest.approx(0.5, rel=1e-6)
    assert float(loss) == pytest.approx(math.log(2) + 0.5, rel=1e-6)


def test_dice_weight_scales_the_dice_term():
    logits = jnp.zeros((1, 2, 2))
    masks = jnp.array([[[1, 0], [0, 0]]], jnp.uint8)
    loss, _ = bce_dice_loss(logits, masks, jnp.array([True]), dice_weight=0.0)
    assert float(loss) == pytest.approx(math.log(2), rel=1e-6)


def test_separation_weight_and_border_output_by_hand():
    # one 2x2 sample at zero logits (ln 2 per pixel of BCE); pixel (0, 1) is a border/gap pixel
    masks = jnp.array([[[1, 0], [0, 0]]], jnp.uint8)
    borders = jnp.array([[[0, 1], [0, 0]]], jnp.uint8)
    valid = jnp.array([True])
    plain, parts = losses.segmentation_loss(jnp.zeros((1, 2, 2)), masks, borders, valid)
    assert float(plain) == pytest.approx(math.log(2) + 0.5, rel=1e-6) and "border" not in parts
    weighted, parts = losses.segmentation_loss(jnp.zeros((1, 2, 2)), masks, borders, valid, separation_weight=3.0)
    assert float(parts["bce"]) == pytest.approx((3 + 4) * math.log(2) / 4, rel=1e-6)  # weights 1, 4, 1, 1 over 4 px
    # two channels: building as before, plus border_weight x BCE of the border logits (Dice only when asked)
    both, parts = losses.segmentation_loss(jnp.zeros((1, 2, 2, 2)), masks, borders, valid, border_weight=0.5)
    assert float(parts["border"]) == pytest.approx(math.log(2), rel=1e-6)
    assert float(both) == pytest.approx(math.log(2) + 0.5 + 0.5 * math.log(2), rel=1e-6)
    _, parts = losses.segmentation_loss(jnp.zeros((1, 2, 2, 2)), masks, borders, valid, border_dice_weight=1.0)
    assert float(parts["border"]) == pytest.approx(math.log(2) + 0.5, rel=1e-6)


def test_lovasz_hinge_at_binary_errors_is_the_jaccard_loss():
    # Lovasz's theorem: with hinge errors exactly 0 (right with margin 1) or 1 (logit 0), the loss is the Jaccard
    # loss |M| / |truth u M| of the set M of erring pixels. Truth {0, 1}; pixels 1 (a building) and 2 err: 2 / 3.
    masks = jnp.array([[[1, 1, 0, 0]]], jnp.uint8)
    logits = jnp.array([[[1.0, 0.0, 0.0, -1.0]]])
    assert float(losses.lovasz_hinge(logits, masks, jnp.array([True]))) == pytest.approx(2 / 3, rel=1e-6)
    # right everywhere with a margin: 0; a tile without buildings pays its worst false positive's hinge (1 + 0.5)
    assert float(losses.lovasz_hinge(jnp.array([[[2.0, 3.0, -2.0, -5.0]]]), masks, jnp.array([True]))) == 0.0
    empty = jnp.zeros((1, 1, 2), jnp.uint8)
    assert float(losses.lovasz_hinge(jnp.array([[[0.5, -2.0]]]), empty, jnp.array([True]))) == pytest.approx(1.5)


def test_lovasz_weight_adds_the_per_tile_mean_and_ignores_padding():
    masks = jnp.array([[[1, 1, 0, 0]], [[1, 1, 1, 1]]], jnp.uint8)
    logits = jnp.array([[[1.0, 0.0, 0.0, -1.0]], [[-9.0, -9.0, -9.0, -9.0]]])
    valid = jnp.array([True, False])
    borders = jnp.zeros_like(masks)
    plain, _ = losses.segmentation_loss(logits, masks, borders, valid)
    both, parts = losses.segmentation_loss(logits, masks, borders, valid, lovasz_weight=0.5)
    assert float(parts["lovasz"]) == pytest.approx(2 / 3, rel=1e-6)  # the padding row's 10s of error not counted
    assert float(both) == pytest.approx(float(plain) + 0.5 * 2 / 3, rel=1e-6)
    grad = jax.grad(lambda l: losses.lovasz_hinge(l, masks, valid))(logits)
    assert float(grad[0, 0, 1]) < 0 < float(grad[0, 0, 2])  # raise the missed building, lower the false one
    assert float(jnp.abs(grad[1]).max()) == 0.0


def test_padding_rows_do_not_count():
    masks = jnp.array([[[1, 0], [0, 0]], [[1, 1], [1, 1]]], jnp.uint8)
    logits = jnp.stack([jnp.zeros((2, 2)), jnp.full((2, 2), -50.0)])
    loss_padded, _ = bce_dice_loss(logits, masks, jnp.array([True, False]))
    loss_alone, _ = bce_dice_loss(logits[:1], masks[:1], jnp.array([True]))
    assert float(loss_padded) == pytest.approx(float(loss_alone), rel=1e-6)
    grad = jax.jit(jax.grad(lambda l: losses.bce_dice_loss(l, masks, jnp.array([True, False]))[0]))(logits)
    assert float(jnp.abs(grad[1]).max()) == 0.0


def test_all_padding_batch_has_zero_loss():
    loss, _ = bce_dice_loss(jnp.full((2, 4, 4), 3.0), jnp.ones((2, 4, 4), jnp.uint8), jnp.array([False, False]))
    assert float(loss) == 0.0


def test_confident_correct_prediction_has_near_zero_loss():
    masks = jnp.array([[[1, 0], [0, 1]]], jnp.uint8)
    logits = jnp.where(masks > 0, 30.0, -30.0).astype(jnp.float32)
    loss, _ = bce_dice_loss(logits, masks, jnp.array([True]))
    assert float(loss) < 1e-6


def test_empty_mask_predicted_empty_has_zero_dice():
    loss, parts = bce_dice_loss(jnp.full((1, 4, 4), -30.0), jnp.zeros((1, 4, 4), jnp.uint8), jnp.array([True]))
    assert float(parts["dice"]) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------- pixel metrics


def test_confusion_counts_by_hand():
    logits = jnp.array([[[5.0, 5.0], [-5.0, -5.0]], [[5.0, 5.0], [5.0, 5.0]]])
    masks = jnp.array([[[1, 0], [1, 0]], [[1, 1], [1, 1]]], jnp.uint8)
    counts = np.asarray(jax.jit(confusion_counts)(logits, masks, jnp.array([True, False])))
    np.testing.assert_array_equal(counts, [[1, 1, 1, 1], [0, 0, 0, 0]])  # tp, fp, fn, tn; padding row zero


def test_scores_by_hand():
    scores = PixelCounts(tp=1, fp=1, fn=1, tn=1).scores()
    assert scores == {"iou": 1 / 3, "f1": 0.5, "precision": 0.5, "recall": 0.5, "pixel_accuracy": 0.5}
    scores = PixelCounts(tp=6, fp=2, fn=4, tn=88).scores()
    assert scores["iou"] == pytest.approx(6 / 12)
    assert scores["f1"] == pytest.approx(12 / 18)
    assert scores["precision"] == pytest.approx(6 / 8)
    assert scores["recall"] == pytest.approx(6 / 10)
    assert scores["pixel_accuracy"] == pytest.approx(94 / 100)


def test_zero_denominators_rule():
    assert PixelCounts(tn=10).scores() == {"iou": 1.0, "f1": 1.0, "precision": 1.0, "recall": 1.0,
                                           "pixel_accuracy": 1.0}
    missed = PixelCounts(fn=3, tn=7).scores()  # buildings present, none predicted
    assert (missed["iou"], missed["f1"], missed["precision"], missed["recall"]) == (0.0, 0.0, 0.0, 0.0)


def test_counts_are_summed_over_pixels_not_averaged_over_tiles():
    metrics = SegmentationMetrics(objects=False)
    # tile A: one building pixel found (IoU 1); tile B: no building, 9 false positives (IoU 0)
    metrics.update(np.array([[1, 0, 0, 15], [0, 9, 0, 7]]), np.array([True, True]), np.array([17, 17]))
    result = metrics.result()
    assert result["iou"] == pytest.approx(1 / 10)  # a per-tile mean would say 0.5
    assert result["samples"] == 2
    assert "object_f1" not in result


def test_per_zoom_and_padding():
    metrics = SegmentationMetrics(objects=False)
    counts = np.array([[2, 0, 2, 12], [1, 1, 0, 14], [9, 9, 9, 9]])
    metrics.update(counts, np.array([True, True, False]), np.array([17, 18, -1]))
    result = metrics.result()
    assert result["samples"] == 2
    assert set(result["per_zoom"]) == {"17", "18"}
    assert result["per_zoom"]["17"]["iou"] == pytest.approx(2 / 4)
    assert result["per_zoom"]["18"]["iou"] == pytest.approx(1 / 2)
    assert result["per_zoom"]["18"]["samples"] == 1
    assert result["iou"] == pytest.approx(3 / 6)


# ----------------------------------------------------------------------------------------------- object metric


def _square(mask, y, x, h, w):
    mask[y:y + h, x:x + w] = True


def test_object_matching_by_hand():
    truth = np.zeros((16, 16), bool)
    pred = np.zeros((16, 16), bool)
    _square(truth, 0, 0, 4, 4)
    _square(pred, 0, 0, 4, 4)  # exact: IoU 1
    _square(truth, 8, 0, 4, 4)
    _square(pred, 8, 2, 4, 4)  # shifted by 2: overlap 8, union 24, IoU 1/3 -> not matched
    _square(pred, 12, 12, 3, 3)  # spurious
    assert match_objects(pred, truth) == (1, 3, 2)


def test_min_area_leaves_small_buildings_out_on_both_sides_as_spacenet_scores():
    truth = np.zeros((16, 16), bool)
    pred = np.zeros((16, 16), bool)
    _square(truth, 0, 0, 4, 4)
    _square(pred, 0, 0, 4, 4)  # 16 px, matched
    _square(pred, 12, 12, 2, 2)  # 4 px of speckle: a false building at min_area 0
    _square(truth, 8, 0, 2, 2)  # a 4 px true sliver, predicted as nothing: missed at min_area 0
    assert match_objects(pred, truth) == (1, 2, 2)
    assert match_objects(pred, truth, min_area=5) == (1, 1, 1)  # speckle and sliver both left out
    assert match_objects(pred, truth, min_area=17) == (0, 0, 0)
    metrics = SegmentationMetrics(min_area=5)
    metrics.update(np.zeros((1, 4), int), np.array([True]), np.array([18]), pred[None], truth[None])
    assert metrics.result()["object_f1"] == 1.0
    every = SegmentationMetrics(min_area=0)
    every.update(np.zeros((1, 4), int), np.array([True]), np.array([18]), pred[None], truth[None])
    assert every.result()["object_f1"] == pytest.approx(2 * 1 / (2 + 2))


def test_the_default_min_area_is_spacenets_20_pixels():
    truth = np.zeros((1, 32, 32), bool)
    _square(truth[0], 0, 0, 4, 5)  # 20 px: counted
    _square(truth[0], 10, 10, 3, 6)  # 18 px: left out
    metrics = SegmentationMetrics()
    metrics.update(np.zeros((1, 4), int), np.array([True]), np.array([18]), truth, truth)
    assert metrics.result()["object_f1"] == 1.0
    assert match_objects(truth[0], truth[0], min_area=SegmentationMetrics().min_area) == (1, 1, 1)


def test_object_match_at_exactly_half_iou():
    truth = np.zeros((8, 8), bool)
    pred = np.zeros((8, 8), bool)
    _square(truth, 0, 0, 4, 4)
    _square(pred, 0, 0, 4, 2)  # IoU 8 / 16 = 0.5, matched (>= 0.5)
    assert match_objects(pred, truth) == (1, 1, 1)


def test_merged_prediction_matches_nothing():
    truth = np.zeros((8, 12), bool)
    _square(truth, 0, 0, 4, 4)
    _square(truth, 0, 5, 4, 4)  # two buildings, one pixel apart
    pred = np.zeros((8, 12), bool)
    _square(pred, 0, 0, 4, 9)  # one blob over both: IoU 16/36 each
    assert match_objects(pred, truth) == (0, 1, 2)


def test_diagonal_pixels_are_separate_buildings():
    truth = np.array([[1, 0], [0, 1]], bool)  # 4-connectivity: two components
    assert match_objects(truth, truth) == (2, 2, 2)


def test_object_f1_accumulates_over_tiles():
    truth = np.zeros((2, 16, 16), bool)
    pred = np.zeros((2, 16, 16), bool)
    _square(truth[0], 0, 0, 4, 4)
    _square(pred[0], 0, 0, 4, 4)
    _square(truth[1], 5, 5, 4, 4)
    _square(pred[1], 12, 12, 2, 2)
    metrics = SegmentationMetrics(min_area=0)  # every component: 4 x 4 and 2 x 2 squares
    metrics.update(np.zeros((2, 4), int), np.array([True, True]), np.array([18, 18]), pred, truth)
    result = metrics.result()
    assert result["object_f1"] == pytest.approx(2 * 1 / (2 + 2))
    assert result["per_zoom"]["18"]["object_f1"] == pytest.approx(0.5)


def test_no_buildings_anywhere_is_a_perfect_object_score():
    empty = np.zeros((1, 8, 8), bool)
    metrics = SegmentationMetrics()
    metrics.update(np.array([[0, 0, 0, 64]]), np.array([True]), np.array([17]), empty, empty)
    assert metrics.result()["object_f1"] == 1.0


def test_objects_are_split_along_the_border_maps():
    # three 10x10 buildings in a row, touching: one blob in the mask; borders at the two shared edges
    mask = np.zeros((32, 40), bool)
    mask[5:15, 5:35] = True
    border = np.zeros((32, 40), np.uint8)
    border[5:15, 14:16] = border[5:15, 24:26] = 1
    assert match_objects(mask, mask) == (1, 1, 1)  # no borders: one blob each
    assert match_objects(mask, mask, actual_border=border) == (0, 1, 3)  # the blob is a third of each: no match
    assert match_objects(mask, mask, predicted_border=border, actual_border=border) == (3, 3, 3)
    metrics = SegmentationMetrics()
    counts = np.array([[mask.sum(), 0, 0, mask.size - mask.sum()]])
    metrics.update(counts, np.array([True]), np.array([18]), mask[None], mask[None].astype(np.uint8),
                   predicted_borders=border[None], true_borders=border[None])
    assert metrics.result()["object_f1"] == 1.0


def test_buildings_matched_on_threads_count_as_on_one():
    # SegmentationMetrics(mapper=pool.map), as evaluate_stream matches a batch's samples: the same counts as one
    # thread, each valid sample matched exactly once, on the pool's threads, the padding rows never
    rng = np.random.default_rng(7)
    truth = ndimage.uniform_filter(rng.random((12, 48, 48)), size=(1, 5, 5)) > 0.55
    pred = ndimage.uniform_filter(rng.random((12, 48, 48)), size=(1, 5, 5)) > 0.5
    pred[::3] = truth[::3]  # some tiles matched exactly
    valid = np.ones(12, bool)
    valid[-2:] = False  # padding rows of a last batch
    zooms = np.array([17, 18] * 6)
    counts = np.zeros((12, 4), int)
    one = SegmentationMetrics(min_area=0)
    one.update(counts, valid, zooms, pred, truth)
    threads, matched = set(), []

    def mapper(function, rows):
        def traced(i):
            threads.add(threading.current_thread().name)
            matched.append(int(i))
            return function(i)
        return pool.map(traced, rows)

    with ThreadPoolExecutor(4, thread_name_prefix="match") as pool:
        many = SegmentationMetrics(min_area=0, mapper=mapper)
        many.update(counts, valid, zooms, pred, truth)
    assert many.result() == one.result()
    assert 0 < one.result()["object_f1"] < 1  # a case with matches and misses
    assert sorted(matched) == list(range(10))
    assert threads and all(name.startswith("match") for name in threads)
