"""On-device data augmentation, run inside the jitted train step from a per-step PRNG key.

* One of the 8 symmetries of the square (the dihedral group D4: 4 rotations by 90 degrees, each with or without a
  transpose), drawn per sample and applied to the image and its mask together, so they stay aligned. Aerial tiles
  have no canonical orientation (north-up is a convention, shadows aside), so every one of the 8 is a plausible tile.
* Light photometric jitter per sample: brightness shift and contrast scaling about the image mean; the mask is
  untouched. It covers the differences between orthophoto campaigns and providers.

Everything is pure jax.numpy on [B, H, W, C] arrays; no host round trip. :func:`tta` (8-fold test-time
augmentation, ``--tta`` of ``evaluate`` and ``predict``) uses the same 8 symmetries.
"""

from __future__ import annotations

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
    """A random square window of ``stacked`` float [H, H, C], of side H / z with z drawn from U(1, ``max_zoom``),
    enlarged back to H x H (bilinear): the same ground seen at a finer resolution, as a higher zoom level or another
    provider's ground sampling distance would show it. Channels move together, so image and targets stay aligned
    (the targets come back fractional at edges: threshold them)."""
    k_zoom, k_top, k_left = jax.random.split(key, 3)
    size = stacked.shape[0]
    zoom = jax.random.uniform(k_zoom, (), minval=1.0, maxval=max_zoom)
    free = size - size / zoom  # room for the window's corner
    top = jax.random.uniform(k_top, (), maxval=free)
    left = jax.random.uniform(k_left, (), maxval=free)
    # output pixel x samples the input at x / zoom + offset
    return jax.image.scale_and_translate(stacked, stacked.shape, (0, 1), jnp.stack([zoom, zoom]),
                                         jnp.stack([-top * zoom, -left * zoom]), method="linear", antialias=False)


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
