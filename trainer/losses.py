"""Training loss: binary cross-entropy + soft Dice, over the valid (non-padding) samples of a batch only.

Why both terms: buildings are sparse (a few percent of the pixels of most tiles, none in many), so per-pixel BCE alone
is dominated by the easy background and is content to under-predict buildings. The soft Dice term (Milletari et al.,
V-Net, arXiv:1606.04797) is a differentiable overlap score of the building class, insensitive to how much background
there is; BCE keeps well-behaved per-pixel gradients, which Dice alone lacks early in training. Dice is computed over
all pixels of the batch at once (not per tile and averaged), because a per-tile Dice is undefined or noisy on the many
tiles without buildings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

DICE_SMOOTH = 1.0  # pixels added to both sides of the Dice ratio: keeps it defined (= 1) on a batch with no buildings


def bce_dice_loss(logits: jax.Array, masks: jax.Array, valid: jax.Array, *, dice_weight: float = 1.0
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``logits`` float [B, H, W], ``masks`` {0, 1} [B, H, W], ``valid`` bool [B] -> (loss, {"bce", "dice"}).

    Padding rows (``valid`` False) contribute nothing: neither to the sums nor to the pixel count. A batch of padding
    only has loss 0. Computed in float32 whatever the dtype of the logits.
    """
    logits = logits.astype(jnp.float32)
    targets = masks.astype(jnp.float32)
    weights = jnp.broadcast_to(valid.astype(jnp.float32)[:, None, None], logits.shape)
    pixels = jnp.maximum(weights.sum(), 1.0)
    bce = (optax.sigmoid_binary_cross_entropy(logits, targets) * weights).sum() / pixels
    probs = jax.nn.sigmoid(logits) * weights
    intersection = (probs * targets).sum()
    denominator = probs.sum() + (targets * weights).sum()
    dice = 1.0 - (2.0 * intersection + DICE_SMOOTH) / (denominator + DICE_SMOOTH)
    return bce + dice_weight * dice, {"bce": bce, "dice": dice}
