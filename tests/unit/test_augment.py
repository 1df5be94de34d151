"""Augmentation: the 8 symmetries of the square form the dihedral group; image and mask stay aligned."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer.augment import NUM_DIHEDRAL, augment_batch, color_jitter, dihedral, zoom_crop

_dihedral = jax.jit(dihedral)


def _asymmetric(size=4):
    return jnp.arange(size * size, dtype=jnp.float32).reshape(size, size, 1)


def _all(x):
    return [np.asarray(_dihedral(x, k)) for k in range(NUM_DIHEDRAL)]


def _index(images, y):
    matches = [i for i, im in enumerate(images) if np.array_equal(im, y)]
    assert len(matches) == 1
    return matches[0]


def test_eight_distinct_transforms_identity_first():
    x = _asymmetric()
    images = _all(x)
    np.testing.assert_array_equal(images[0], np.asarray(x))
    assert len({im.tobytes() for im in images}) == NUM_DIHEDRAL


def test_they_are_the_rotations_and_reflections_of_the_square():
    x = np.asarray(_asymmetric())
    expected = [np.rot90(x, r, axes=(0, 1)) for r in range(4)]
    expected += [np.rot90(np.flip(x, 0), r, axes=(0, 1)) for r in range(4)]
    got = {im.tobytes() for im in _all(jnp.asarray(x))}
    assert got == {e.tobytes() for e in expected}


def test_group_closure_and_inverses():
    x = _asymmetric()
    images = _all(x)
    table = {}
    for a, b in itertools.product(range(NUM_DIHEDRAL), repeat=2):
        table[a, b] = _index(images, np.asarray(_dihedral(_dihedral(x, a), b)))  # closure: always found
    for a in range(NUM_DIHEDRAL):
        assert any(table[a, b] == 0 for b in range(NUM_DIHEDRAL))  # every transform has an inverse
        assert sorted(table[a, b] for b in range(NUM_DIHEDRAL)) == list(range(NUM_DIHEDRAL))  # Latin square


def test_image_and_mask_stay_aligned():
    rng = np.random.default_rng(0)
    masks = (rng.random((16, 32, 32)) > 0.7).astype(np.uint8)
    images = np.repeat((50 + 150 * masks)[..., None], 3, axis=-1).astype(np.uint8)  # buildings brighter
    out_images, out_masks = jax.jit(augment_batch)(jax.random.key(3, impl="rbg"), jnp.asarray(images),
                                                   jnp.asarray(masks))
    out_images, out_masks = np.asarray(out_images), np.asarray(out_masks)
    assert set(np.unique(out_masks)) <= {0.0, 1.0}
    assert out_images.min() >= 0.0 and out_images.max() <= 1.0
    for image, mask in zip(out_images, out_masks):
        threshold = (image[..., 0].max() + image[..., 0].min()) / 2  # jitter is monotonic per image
        np.testing.assert_array_equal(image[..., 0] > threshold, mask > 0)
    # 16 samples: several different transforms were drawn
    variants = sum(not np.array_equal(m, o) for m, o in zip(masks, out_masks))
    assert variants >= 8


def test_same_key_same_augmentation():
    images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3)), jnp.uint8)
    masks = jnp.zeros((4, 8, 8), jnp.uint8)
    key = jax.random.key(7, impl="rbg")
    a = jax.jit(augment_batch)(key, images, masks)
    b = jax.jit(augment_batch)(key, images, masks)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_color_jitter_is_light():
    image = jnp.full((8, 8, 3), 0.5)
    out = np.asarray(jax.jit(color_jitter)(image, jax.random.key(0, impl="rbg")))
    assert np.abs(out - 0.5).max() <= 0.1 + 1e-6  # a flat image only gets the brightness shift


@pytest.mark.parametrize("max_zoom", [1.5, 2.0])
def test_zoom_crop_rescales_both_ways_by_at_most_max_zoom(max_zoom):
    """A ramp (value = column index, and row index in a second channel) rescaled: the mirrored margin is a ramp folded
    back, so the typical step between neighbours is 1/z (z in [1/max_zoom, max_zoom], one z for both axes; exact when
    enlarging, within a few % when shrinking, where the antialiasing filter's discrete weights shift samples by a
    fraction of a pixel), z is drawn above and below 1, and every value is one of the tile's (the margin mirrors it)."""
    size = 64
    rows, cols = np.mgrid[:size, :size].astype(np.float32)
    ramp = jnp.asarray(np.stack([cols, rows], axis=-1))
    zooms = []
    for seed in range(24):
        out = np.asarray(jax.jit(zoom_crop, static_argnums=2)(jax.random.key(seed, impl="rbg"), ramp, max_zoom))
        col_step = np.median(np.abs(np.diff(out[..., 0], axis=1)))
        row_step = np.median(np.abs(np.diff(out[..., 1], axis=0)))
        assert row_step == pytest.approx(col_step, rel=0.08)  # square: one scale for both axes
        assert 0.97 / max_zoom <= col_step <= 1.08 * max_zoom
        assert out.min() >= -1e-3 and out.max() <= size - 1 + 1e-3  # inside the tile or its mirror image
        zooms.append(1 / col_step)
    assert min(zooms) < 0.95 and max(zooms) > 1.05  # shrunk and enlarged


def test_zoom_crop_refuses_more_than_one_mirror_image():
    with pytest.raises(ValueError, match="max_zoom"):
        zoom_crop(jax.random.key(0, impl="rbg"), jnp.zeros((8, 8, 1)), 2.5)


def test_zoomed_image_and_mask_stay_aligned():
    rng = np.random.default_rng(1)
    blocks = rng.random((16, 8, 8)) > 0.6
    masks = np.kron(blocks, np.ones((4, 4))).astype(np.uint8)  # 32 x 32, buildings of 4 x 4 pixels or more
    images = np.repeat((50 + 150 * masks)[..., None], 3, axis=-1).astype(np.uint8)
    out_images, out_masks = jax.jit(augment_batch, static_argnames="max_zoom")(
        jax.random.key(5, impl="rbg"), jnp.asarray(images), jnp.asarray(masks), max_zoom=2.0)
    out_images, out_masks = np.asarray(out_images), np.asarray(out_masks)
    assert set(np.unique(out_masks)) <= {0.0, 1.0}
    for image, mask in zip(out_images, out_masks):
        if mask.min() == mask.max():
            continue  # the window fell on one class only
        threshold = (image[..., 0].max() + image[..., 0].min()) / 2  # both interpolated alike, jitter monotonic
        np.testing.assert_array_equal(image[..., 0] > threshold, mask > 0)
    assert (out_masks.mean(axis=(1, 2)) != masks.mean(axis=(1, 2))).sum() >= 8  # rescaled windows, not the tiles
