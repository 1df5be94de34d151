"""Training loss: binary cross-entropy + soft Dice, over the valid (non-padding) samples of a batch only.

Why both terms: buildings are sparse (a few percent of the pixels of most tiles, none in many), so per-pixel BCE alone
is dominated by the easy background and is content to under-predict buildings. The soft Dice term (Milletari et al.,
V-Net, arXiv:1606.04797) is a differentiable overlap score of the building class, insensitive to how much background
there is; BCE keeps well-behaved per-pixel gradients, which Dice alone lacks early in training. Dice is computed over
all pixels of the batch at once (not per tile and averaged), because a per-tile Dice is undefined or noisy on the many
tiles without buildings.

:func:`segmentation_loss` adds what the border targets of :mod:`trainer.instances` allow (issue 11):

* ``separation_weight`` (the U-Net paper's weight map, simplified): the building BCE of a border/gap pixel weighs
  ``1 + separation_weight``, so bridging the gap between two buildings costs more than missing an isolated pixel;
* a border output (second channel): BCE (+ ``border_dice_weight`` x Dice) of the border logits against the border
  target, times ``border_weight`` (a boundary-aware multi-task loss, as in Bischke et al. and the SpaceNet 2
  winners). Dice is off by default: the target is empty on most tiles and a few pixels on the others, and with Dice
  on it the building IoU fell from 0.544 to 0.252 at 250 CPU steps (README, ablation);
* ``lovasz_weight``: the Lovasz hinge of the building logits (Berman et al., "The Lovasz-Softmax loss: a tractable
  surrogate for the optimization of the intersection-over-union measure in neural networks", CVPR 2018,
  arXiv:1705.08790), a convex surrogate of 1 - IoU, over all pixels of the batch's valid tiles at once, as the Dice
  term: per tile, each tile without buildings (most of them) would push its worst pixels down with the whole weight
  of a tile, and at 250 CPU steps such a model predicted no building at all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

DICE_SMOOTH = 1.0  # pixels added to both sides of the Dice ratio: keeps it defined (= 1) on a batch with no buildings


def bce_dice_loss(logits: jax.Array, masks: jax.Array, valid: jax.Array, *, dice_weight: float = 1.0,
                  pixel_weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``logits`` float [B, H, W], ``masks`` {0, 1} [B, H, W], ``valid`` bool [B] -> (loss, {"bce", "dice"}).

    Padding rows (``valid`` False) contribute nothing: neither to the sums nor to the pixel count. A batch of padding
    only has loss 0. Computed in float32 whatever the dtype of the logits. ``pixel_weights`` [B, H, W] (default 1)
    scale each pixel's BCE (the Dice term is unweighted).
    """
    logits = logits.astype(jnp.float32)
    targets = masks.astype(jnp.float32)
    weights = jnp.broadcast_to(valid.astype(jnp.float32)[:, None, None], logits.shape)
    pixels = jnp.maximum(weights.sum(), 1.0)
    bce_weights = weights if pixel_weights is None else weights * pixel_weights
    bce = (optax.sigmoid_binary_cross_entropy(logits, targets) * bce_weights).sum() / pixels
    probs = jax.nn.sigmoid(logits) * weights
    intersection = (probs * targets).sum()
    denominator = probs.sum() + (targets * weights).sum()
    dice = 1.0 - (2.0 * intersection + DICE_SMOOTH) / (denominator + DICE_SMOOTH)
    return bce + dice_weight * dice, {"bce": bce, "dice": dice}


def lovasz_hinge(logits: jax.Array, masks: jax.Array, valid: jax.Array) -> jax.Array:
    """The binary Lovasz hinge of the pixels of the valid tiles (``logits`` [B, H, W], ``masks`` {0, 1}) taken as
    one set: the hinge errors ``1 - logit * sign`` (sign +1 building, -1 background) sorted in decreasing order,
    dotted with the gradient of the Lovasz extension of the Jaccard loss at that order (``lovasz_grad`` of the
    paper's reference code). Padding rows count nothing (their errors are set below 0); with no building in the
    batch it is the hinge of the worst false positive."""
    rows = valid.astype(bool)[:, None]
    labels = (masks.reshape(masks.shape[0], -1) > 0) & rows
    errors = 1.0 - logits.astype(jnp.float32).reshape(labels.shape) * (2.0 * labels - 1.0)
    errors = jnp.where(rows, errors, -1.0).ravel()  # padding: no hinge, sorted last
    labels = labels.astype(jnp.float32).ravel()
    order = jnp.argsort(-errors)
    errors_sorted, labels_sorted = errors[order], labels[order]
    positives = labels_sorted.sum()
    intersection = positives - jnp.cumsum(labels_sorted)
    union = positives + jnp.cumsum(1.0 - labels_sorted)
    jaccard = 1.0 - intersection / union
    grad = jnp.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return jnp.dot(jax.nn.relu(errors_sorted), jax.lax.stop_gradient(grad))


def segmentation_loss(logits: jax.Array, masks: jax.Array, borders: jax.Array, valid: jax.Array, *,
                      dice_weight: float = 1.0, border_weight: float = 1.0, border_dice_weight: float = 0.0,
                      separation_weight: float = 0.0, lovasz_weight: float = 0.0
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss of a U-Net's output: ``logits`` [B, H, W] (building) or [B, H, W, 2] (building, border);
    ``borders`` {0, 1} [B, H, W] the border/gap target. Returns (loss, {"bce", "dice"[, "border"][, "lovasz"]})."""
    from .model import split_logits

    building, border = split_logits(logits)
    borders = borders.astype(jnp.float32)
    weights = 1.0 + separation_weight * borders if separation_weight else None
    loss, parts = bce_dice_loss(building, masks, valid, dice_weight=dice_weight, pixel_weights=weights)
    if lovasz_weight:
        lovasz = lovasz_hinge(building, masks, valid)
        loss = loss + lovasz_weight * lovasz
        parts = {**parts, "lovasz": lovasz}
    if border is not None:
        border_loss, _ = bce_dice_loss(border, borders, valid, dice_weight=border_dice_weight)
        loss = loss + border_weight * border_loss
        parts = {**parts, "border": border_loss}
    return loss, parts
