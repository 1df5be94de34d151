"""On-device data augmentation, run inside the jitted train step from a per-step PRNG key.

* One of the 8 symmetries of the square (the dihedral group D4: 4 rotations by 90 degrees, each with or without a
  transpose), drawn per sample and applied to the image and its mask together, so they stay aligned. Aerial tiles
  have no canonical orientation (north-up is a convention, shadows aside), so every one of the 8 is a plausible tile.
* Light photometric jitter per sample: brightness shift and contrast scaling about the image mean; the mask is
  untouched. It covers the differences between orthophoto campaigns and providers.
* Optionally (``--zoom-augment``, off by default), a random rescaling by 1/MAX to MAX (:func:`zoom_crop`): the same
  ground at the resolution of another zoom level or provider.

Everything is pure jax.numpy on [B, H, W, C] arrays; no host round trip. :func:`tta` (8-fold test-time
augmentation, ``--tta`` of ``evaluate`` and ``predict``) uses the same 8 symmetries.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NUM_DIHEDRAL = 8
BRIGHTNESS_DELTA = 0.1  # added brightness drawn from U(-delta, delta), images in [0, 1]
CONTRAST_RANGE = (0.8, 1.2)  # contrast factor drawn from U(low, high)


def dihedral(x: jax.Array, k: jax.Array | int) -> jax.Array:
    """The ``k``-th (0..7) symmetry of the square applied to ``x`` [H, W, ...] (H == W).

    ``k % 4`` quarter turns counter-clockwise, preceded by a transpose (a reflection about the main diagonal) when
    ``k >= 4``. ``k = 0`` is the identity. Works with a traced ``k`` (``lax.switch``).
    """
    def make(index):
        def transform(a):
            if index >= 4:
                a = jnp.swapaxes(a, 0, 1)
            return jnp.rot90(a, index % 4, axes=(0, 1))
        return transform

    return jax.lax.switch(jnp.asarray(k, jnp.int32), [make(i) for i in range(NUM_DIHEDRAL)], x)


def color_jitter(image: jax.Array, key: jax.Array) -> jax.Array:
    """Random brightness shift and contrast scaling of one float image [H, W, 3] in [0, 1]; result clipped to [0, 1]."""
    k_brightness, k_contrast = jax.random.split(key)
    delta = jax.random.uniform(k_brightness, (), minval=-BRIGHTNESS_DELTA, maxval=BRIGHTNESS_DELTA)
    factor = jax.random.uniform(k_contrast, (), minval=CONTRAST_RANGE[0], maxval=CONTRAST_RANGE[1])
    mean = image.mean()
    return jnp.clip((image - mean) * factor + mean + delta, 0.0, 1.0)


def zoom_crop(key: jax.Array, stacked: jax.Array, max_zoom: float) -> jax.Array:
    """``stacked`` float [H, H, C] seen at a scale z drawn log-uniformly from [1 / ``max_zoom``, ``max_zoom``]: a
    random square window of side H / z resampled to H x H (bilinear; antialiased when it shrinks). z > 1 enlarges a
    window inside the tile, z < 1 shrinks a window larger than the tile, its margin the tile mirrored at its edges
    (``max_zoom`` <= 2: one mirror image each side). Both ways, so that buildings are shown bigger and smaller than
    the tiles show them, never biased one way (enlarging alone made a model over-predict: README, ablation).
    Channels move together, so image and targets stay aligned (the targets come back fractional: threshold them)."""
    if not 1.0 <= max_zoom <= 2.0:
        raise ValueError(f"max_zoom must be in [1, 2], got {max_zoom}")
    k_zoom, k_top, k_left = jax.random.split(key, 3)
    size = stacked.shape[0]
    log_max = math.log(max_zoom)
    zoom = jnp.exp(jax.random.uniform(k_zoom, (), minval=-log_max, maxval=log_max))
    window = size / zoom
    pad = math.ceil(size * (max_zoom - 1.0))  # the most a shrunk window sticks out on one side
    padded = jnp.pad(stacked, ((pad, pad), (pad, pad), (0, 0)), mode="reflect") if pad else stacked
    low, high = jnp.minimum(0.0, size - window), jnp.maximum(0.0, size - window)  # the window's corner, tile coords
    top = pad + low + jax.random.uniform(k_top, ()) * (high - low)
    left = pad + low + jax.random.uniform(k_left, ()) * (high - low)
    # output pixel x samples the padded input at x / zoom + corner
    out = jax.image.scale_and_translate(padded, stacked.shape, (0, 1), jnp.stack([zoom, zoom]),
                                        jnp.stack([-top * zoom, -left * zoom]), method="linear", antialias=True)
    return out


def augment_batch(key: jax.Array, images: jax.Array, masks: jax.Array, *planes: jax.Array, max_zoom: float = 1.0
                  ) -> tuple[jax.Array, ...]:
    """``images`` uint8 [B, H, W, 3], ``masks`` [B, H, W] (and other per-pixel targets ``planes``, e.g. the borders,
    [B, H, W] each), all uint8 -> ``(images, masks, *planes)`` augmented, one draw per sample: the images float32 in
    [0, 1], the targets float32 {0, 1}. ``max_zoom`` > 1 adds :func:`zoom_crop` (targets re-thresholded at 0.5).

    The symmetry moves the uint8 arrays (vmapped, ``lax.switch`` computes all 8 branches and selects: a quarter of
    the bytes of doing it in float32); the colour jitter runs on the float image after it.
    """
    def one(sample_key, image, *targets):
        k_dihedral, k_color = jax.random.split(sample_key)  # as before zoom_augment: the same default draws
        k = jax.random.randint(k_dihedral, (), 0, NUM_DIHEDRAL)
        # transform image and targets as one array: they cannot drift apart
        stacked = dihedral(jnp.concatenate([image, *(t[..., None].astype(image.dtype) for t in targets)], axis=-1), k)
        stacked = stacked.astype(jnp.float32)
        if max_zoom > 1.0:
            stacked = zoom_crop(jax.random.fold_in(sample_key, 1), stacked, max_zoom)
            stacked = stacked.at[..., 3:].set((stacked[..., 3:] >= 0.5).astype(jnp.float32))
        return (color_jitter(stacked[..., :3] / 255.0, k_color), *(stacked[..., 3 + i] for i in range(len(targets))))

    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(one)(keys, images, masks, *planes)


def dihedral_batch(x: jax.Array, k: int) -> jax.Array:
    """The ``k``-th symmetry of :func:`dihedral` (a Python int) applied to every sample of ``x`` [B, H, W, ...]."""
    if k >= 4:
        x = jnp.swapaxes(x, 1, 2)
    return jnp.rot90(x, k % 4, axes=(1, 2))


def inverse_dihedral_batch(x: jax.Array, k: int) -> jax.Array:
    """Undo :func:`dihedral_batch` ``k``: ``inverse_dihedral_batch(dihedral_batch(x, k), k) == x``."""
    x = jnp.rot90(x, -(k % 4), axes=(1, 2))
    return jnp.swapaxes(x, 1, 2) if k >= 4 else x


def tta(apply, images: jax.Array) -> jax.Array:
    """8-fold test-time augmentation: the mean over the 8 symmetries of the square of ``apply`` run on the
    transformed ``images`` [B, H, W, C] and transformed back. ``apply`` maps [B, H, W, C] to per-pixel outputs
    [B, H, W] or [B, H, W, K] (logits: their mean is the logit of the geometric mean of the odds)."""
    total = None
    for k in range(NUM_DIHEDRAL):
        out = inverse_dihedral_batch(apply(dihedral_batch(images, k)), k)
        total = out if total is None else total + out
    return total / NUM_DIHEDRAL
