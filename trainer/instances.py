"""Buildings one by one: the border/gap target the network learns, and the separation of a predicted mask into
buildings that ``trainer predict --geojson`` and the object F1 of ``trainer evaluate`` share.

**Border target** (:func:`border_target`): a pixel is "border" when it lies where two different buildings meet:

* a building pixel with a pixel of another building among its 8 neighbours (the touching edges, on both sides), or
* a background pixel with pixels of two different buildings within :data:`GAP_RADIUS` pixels (Chebyshev distance):
  the thin gaps between close buildings that a blurry prediction would bridge (the separation borders of the U-Net
  paper, Ronneberger et al. 2015, section 3).

Buildings are the ``instances`` of the sample where the data set has them (SPEC: one id per footprint), else the
4-connected components of the mask (external data sets such as Dubai: touching buildings are one component there,
so only their gaps are known). A lone building, or an empty tile, has no border pixel.

It is computed by the decode workers of the input pipeline, beside the PNG decoding, not on the device: the 16-bit
instance PNG is decoded there anyway, connected components have no counterpart in XLA, and the device then only sees
one more uint8 plane per sample. The cost is not small: 1.7 ms a tile on the shared 2-core machine (labelling and
four rank filters), about as much again as fetching and decoding the sample (~1 ms); more ``--decode-workers`` pay
for it where cores are free.

**Separation** (:func:`separate_buildings`): interiors = building pixels not predicted border; their 4-connected
components are the seeds; each seed grows back into the building pixels (first the border pixels it touches, in
steps of one pixel, so that two seeds split the border between them); building pixels no seed reaches (a building
predicted as border everywhere) keep their own connected component. Without a border map it is the 4-connected
components of the mask, the rule the object metric always had.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

GAP_RADIUS = 2  # background pixels within 2 px of two buildings are border: gaps up to 3-4 px wide
_FOUR = ndimage.generate_binary_structure(2, 1)
_BIG = np.iinfo(np.int32).max


def building_labels(mask: np.ndarray, instances: np.ndarray | None = None) -> np.ndarray:
    """int32 label map of the buildings: ``instances`` where given (0 outside ``mask``), else the 4-connected
    components of ``mask``."""
    mask = np.asarray(mask) != 0
    if instances is not None:
        return np.where(mask, np.asarray(instances, dtype=np.int32), 0)
    return ndimage.label(mask, structure=_FOUR)[0]


def _two_labels_near(labels: np.ndarray, size: int) -> np.ndarray:
    """True where the ``size`` x ``size`` window holds two different nonzero labels."""
    high = ndimage.maximum_filter(labels, size=size, mode="constant", cval=0)
    low = ndimage.minimum_filter(np.where(labels > 0, labels, _BIG), size=size, mode="constant", cval=_BIG)
    return (high > 0) & (low < _BIG) & (high != low)


def border_target(mask: np.ndarray, instances: np.ndarray | None = None) -> np.ndarray:
    """uint8 [H, W] of 0/1: the border/gap pixels of a tile (see the module docstring)."""
    labels = building_labels(mask, instances)
    if labels.max() <= 0 or (labels.max() == labels[labels > 0].min()):  # no building, or one: no border
        return np.zeros(labels.shape, np.uint8)
    touching = (labels > 0) & _two_labels_near(labels, 3)
    gaps = (labels == 0) & _two_labels_near(labels, 2 * GAP_RADIUS + 1)
    return (touching | gaps).astype(np.uint8)


def separate_buildings(mask: np.ndarray, border: np.ndarray | None = None, min_area: int = 0
                       ) -> tuple[np.ndarray, int]:
    """``(labels int32 [H, W], count)``: one label per building of a (predicted) mask, split along ``border``;
    buildings of fewer than ``min_area`` pixels are dropped (label 0), the others numbered 1..count again."""
    labels, count = _separate(np.asarray(mask) != 0, border)
    if min_area > 1 and count:
        keep = np.bincount(labels.ravel(), minlength=count + 1) >= min_area
        keep[0] = False
        renumber = np.where(keep, np.cumsum(keep), 0).astype(np.int32)
        return renumber[labels], int(keep.sum())
    return labels, count


def _separate(mask: np.ndarray, border: np.ndarray | None) -> tuple[np.ndarray, int]:
    if border is None:
        labels, count = ndimage.label(mask, structure=_FOUR)
        return labels.astype(np.int32), int(count)
    seeds, count = ndimage.label(mask & (np.asarray(border) == 0), structure=_FOUR)
    labels = seeds.astype(np.int32)
    if count:
        # grow the seeds into the mask one pixel a round (the 4-neighbourhood), the largest neighbouring label winning
        # a contested pixel: a border between two seeds is split between them, no seed jumps over another
        todo = mask & (labels == 0)
        while todo.any():
            grown = ndimage.grey_dilation(labels, footprint=_FOUR, mode="constant", cval=0)
            reached = todo & (grown > 0)
            if not reached.any():
                break
            labels[reached] = grown[reached]
            todo &= ~reached
    rest, extra = ndimage.label(mask & (labels == 0), structure=_FOUR)  # buildings that were all border
    labels[rest > 0] = rest[rest > 0] + count
    return labels, int(count + extra)
