"""Segmentation metrics of the building class, as the SPEC defines them for ``trainer evaluate``.

Pixel metrics come from confusion counts (tp, fp, fn, tn) summed over ALL pixels of ALL valid samples, then turned
into ratios once: a micro average, so a tile with one building pixel weighs as much as its pixels, not as much as a
tile full of buildings (a per-tile average would be dominated by the many nearly empty tiles).

Object metric (``object_f1``): the SpaceNet building-footprint F1 (Van Etten et al., "SpaceNet: A Remote Sensing
Dataset and Challenge Series", arXiv:1807.01232): buildings are found in the true and predicted masks of each tile by
:func:`trainer.instances.separate_buildings`, the function ``trainer predict --geojson`` uses: 4-connected components,
split along the border map where there is one (true: the border target of the sample, from its ``instances``;
predicted: the model's border output, when it has one); buildings of fewer than ``min_area`` pixels are left out on
both sides, as SpaceNet's own scorer leaves out footprints under 20 pixels (solaris ``spacenet_buildings_2``,
``min_area=20``; :data:`OBJECT_MIN_AREA`, ``evaluate --min-area``, 0 counts every component); a predicted building is
a true positive when it matches a distinct true building with IoU >= 0.5 (greedy, highest IoU first); F1 = 2 *
matched / (predicted + true), summed over all tiles.

Zero denominators (e.g. IoU of a split without buildings and no prediction) follow one rule: the score is 1.0 when
there was nothing to find and nothing was found (tp = fp = fn = 0), else 0.0. So every value is a finite float and the
JSON output never holds NaN.

:func:`confusion_counts` runs on the device inside the jitted eval step; the rest is host-side numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .config import OBJECT_MIN_AREA
from .instances import separate_buildings

OBJECT_IOU_THRESHOLD = 0.5
PIXEL_METRICS = ("iou", "f1", "precision", "recall", "pixel_accuracy")


def confusion_counts(logits: jax.Array, masks: jax.Array, valid: jax.Array) -> jax.Array:
    """Per-sample (tp, fp, fn, tn) of the building class: int32 [B, 4]; padding rows are all zero.

    A pixel is predicted building when its logit is > 0 (probability > 0.5).
    """
    predicted = logits > 0
    actual = masks > 0
    keep = valid[:, None, None]

    def count(x):
        return jnp.sum(x & keep, axis=(1, 2), dtype=jnp.int32)

    return jnp.stack([count(predicted & actual), count(predicted & ~actual), count(~predicted & actual),
                      count(~predicted & ~actual)], axis=-1)


def _ratio(numerator: int, denominator: int, nothing_to_find: bool) -> float:
    if denominator == 0:
        return 1.0 if nothing_to_find else 0.0
    return numerator / denominator


@dataclass
class PixelCounts:
    """Confusion counts of the building class, summed in Python ints (no overflow)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, tp: int, fp: int, fn: int, tn: int) -> None:
        self.tp += int(tp)
        self.fp += int(fp)
        self.fn += int(fn)
        self.tn += int(tn)

    def scores(self) -> dict[str, float]:
        tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
        empty = tp + fp + fn == 0
        return {
            "iou": _ratio(tp, tp + fp + fn, empty),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn, empty),
            "precision": _ratio(tp, tp + fp, empty),
            "recall": _ratio(tp, tp + fn, empty),
            "pixel_accuracy": _ratio(tp + tn, tp + fp + fn + tn, True),
        }


class ObjectMatch(NamedTuple):
    matched: int  # predicted buildings matched to a distinct true building with IoU >= threshold
    predicted: int  # connected components of the predicted mask
    actual: int  # connected components of the true mask


def match_objects(predicted: np.ndarray, actual: np.ndarray, iou_threshold: float = OBJECT_IOU_THRESHOLD, *,
                  predicted_border: np.ndarray | None = None, actual_border: np.ndarray | None = None,
                  min_area: int = 0) -> ObjectMatch:
    """Match the buildings of two masks of one tile, SpaceNet style; each mask's buildings are separated along its
    border map when given (:func:`~trainer.instances.separate_buildings`), else its 4-connected components.
    Buildings of fewer than ``min_area`` pixels are left out, predicted and true (as SpaceNet scores, and as
    ``predict --geojson --min-area`` leaves them out)."""
    pred_labels, n_pred = separate_buildings(predicted, predicted_border, min_area)
    true_labels, n_true = separate_buildings(actual, actual_border, min_area)
    if n_pred == 0 or n_true == 0:
        return ObjectMatch(0, n_pred, n_true)
    # joint histogram of (true label, predicted label): intersections; its margins are the component areas
    joint = np.bincount(true_labels.ravel().astype(np.int64) * (n_pred + 1) + pred_labels.ravel(),
                        minlength=(n_true + 1) * (n_pred + 1)).reshape(n_true + 1, n_pred + 1)
    true_area = joint.sum(axis=1)[1:, None]
    pred_area = joint.sum(axis=0)[None, 1:]
    intersection = joint[1:, 1:]
    iou = intersection / (true_area + pred_area - intersection)
    candidates = np.argwhere(iou >= iou_threshold)
    order = np.argsort(-iou[candidates[:, 0], candidates[:, 1]], kind="stable")
    used_true, used_pred = set(), set()
    for t, p in candidates[order]:
        if t not in used_true and p not in used_pred:
            used_true.add(t)
            used_pred.add(p)
    return ObjectMatch(len(used_true), n_pred, n_true)


@dataclass
class ObjectCounts:
    matched: int = 0
    predicted: int = 0
    actual: int = 0

    def add(self, match: ObjectMatch) -> None:
        self.matched += match.matched
        self.predicted += match.predicted
        self.actual += match.actual

    def f1(self) -> float:
        return _ratio(2 * self.matched, self.predicted + self.actual, self.predicted + self.actual == 0)


@dataclass
class _Group:
    pixels: PixelCounts = field(default_factory=PixelCounts)
    objects: ObjectCounts = field(default_factory=ObjectCounts)
    samples: int = 0

    def result(self) -> dict[str, float | int]:
        return {**self.pixels.scores(), "object_f1": self.objects.f1(), "samples": self.samples}


class SegmentationMetrics:
    """Accumulates confusion counts and object matches overall and per zoom, over the valid samples of batches.

    ``mapper``: how the samples of a batch are matched, ``mapper(function, indices)`` (default the built-in ``map``);
    a thread pool's ``map`` matches them in parallel (SciPy's labelling and NumPy release the GIL), as
    :func:`trainer.steps.evaluate_stream` does: on a GPU host the matching, not the model, bounds evaluation."""

    def __init__(self, *, objects: bool = True, min_area: int = OBJECT_MIN_AREA,
                 mapper: Callable[[Callable, Iterable], Iterable] = map):
        self.objects = objects  # object matching needs the predicted masks on the host; skip it when not wanted
        self.min_area = min_area  # buildings smaller than this (pixels), true or predicted, are not counted
        self._map = mapper
        self._overall = _Group()
        self._by_zoom: dict[int, _Group] = {}

    @property
    def samples(self) -> int:
        return self._overall.samples

    def update(self, counts: np.ndarray, valid: np.ndarray, zooms: np.ndarray,
               predicted: np.ndarray | None = None, masks: np.ndarray | None = None, *,
               predicted_borders: np.ndarray | None = None, true_borders: np.ndarray | None = None) -> None:
        """``counts`` int [B, 4] from :func:`confusion_counts`; ``valid`` bool [B]; ``zooms`` int [B];
        ``predicted`` bool [B, H, W] and ``masks`` [B, H, W] (needed when ``objects``); ``predicted_borders`` and
        ``true_borders`` [B, H, W] (optional) split the buildings of each (see :func:`match_objects`)."""
        counts, valid, zooms = np.asarray(counts), np.asarray(valid, dtype=bool), np.asarray(zooms)
        if self.objects and (predicted is None or masks is None):
            raise ValueError("object metrics need the predicted and true masks")
        rows = np.flatnonzero(valid)

        def match_one(i: int) -> ObjectMatch:
            return match_objects(predicted[i], masks[i],
                                 predicted_border=None if predicted_borders is None else predicted_borders[i],
                                 actual_border=None if true_borders is None else true_borders[i],
                                 min_area=self.min_area)

        matches = list(self._map(match_one, rows)) if self.objects else [None] * len(rows)
        for i, match in zip(rows, matches):
            zoom_group = self._by_zoom.setdefault(int(zooms[i]), _Group())
            for group in (self._overall, zoom_group):
                group.pixels.add(*counts[i])
                group.samples += 1
                if match is not None:
                    group.objects.add(match)

    def result(self) -> dict:
        """``{iou, f1, precision, recall, pixel_accuracy, object_f1, samples, per_zoom: {"17": {...}}}``."""
        out = self._overall.result()
        if not self.objects:
            out.pop("object_f1")
        out["per_zoom"] = {}
        for zoom in sorted(self._by_zoom):
            group = self._by_zoom[zoom].result()
            if not self.objects:
                group.pop("object_f1")
            out["per_zoom"][str(zoom)] = group
        return out
