"""8-fold test-time augmentation (``--tta``): the mean of the 8 transformed predictions, transformed back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer.augment import dihedral_batch, inverse_dihedral_batch, tta
from trainer.model import UNet


def _by_hand(x: np.ndarray, k: int, inverse: bool = False) -> np.ndarray:
    """Symmetry ``k`` of the square on [B, H, W, ...] with numpy: a transpose (k >= 4), then k % 4 quarter turns."""
    if not inverse:
        x = np.swapaxes(x, 1, 2) if k >= 4 else x
        return np.rot90(x, k % 4, axes=(1, 2))
    x = np.rot90(x, -(k % 4), axes=(1, 2))
    return np.swapaxes(x, 1, 2) if k >= 4 else x


def _model(outputs: int = 1, seed: int = 1) -> UNet:
    return UNet(base_filters=4, depth=2, outputs=outputs, rngs=nnx.Rngs(seed))


def _d4_symmetric(rng, size=32) -> np.ndarray:
    """An image equal to its own image under all 8 symmetries: the sum of its 8 transforms."""
    x = rng.random((1, size, size, 3)).astype(np.float32)
    return sum(_by_hand(x, k) for k in range(8)) / 8


def test_transforms_match_numpy_and_invert():
    x = np.arange(2 * 5 * 5 * 2, dtype=np.float32).reshape(2, 5, 5, 2)
    images = {k: _by_hand(x, k) for k in range(8)}
    assert len({v.tobytes() for v in images.values()}) == 8  # eight different symmetries
    for k in range(8):
        np.testing.assert_array_equal(dihedral_batch(jnp.asarray(x), k), images[k])
        np.testing.assert_array_equal(inverse_dihedral_batch(dihedral_batch(jnp.asarray(x), k), k), x)


@pytest.mark.parametrize("outputs", [1, 2])
def test_tta_of_a_random_model_is_the_mean_of_the_eight_transformed_predictions(outputs):
    model = _model(outputs)
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    expected = np.mean([_by_hand(np.asarray(model(jnp.asarray(_by_hand(x, k)))), k, inverse=True)
                        for k in range(8)], axis=0)
    got = np.asarray(jax.jit(lambda v: tta(model, v))(jnp.asarray(x)))
    assert got.shape == expected.shape == ((2, 32, 32) if outputs == 1 else (2, 32, 32, 2))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, np.asarray(model(jnp.asarray(x))), atol=1e-3)  # it does change a random model


def test_tta_on_a_symmetric_image_gives_a_symmetric_output():
    x = _d4_symmetric(np.random.default_rng(1))
    out = np.asarray(tta(_model(), jnp.asarray(x)))
    for k in range(8):
        np.testing.assert_allclose(_by_hand(out, k), out, rtol=1e-5, atol=1e-5)


def test_tta_of_an_equivariant_function_is_that_function():
    # a per-pixel function followed by a blur with a kernel symmetric under the 8 symmetries: equivariant
    kernel = jnp.asarray([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])[:, :, None, None] / 16

    def f(images):
        grey = jnp.tanh(images @ jnp.asarray([0.3, -1.2, 0.8]))[..., None]
        return jax.lax.conv_general_dilated(grey, kernel, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))[..., 0]

    x = jnp.asarray(np.random.default_rng(2).random((3, 24, 24, 3)), jnp.float32)
    np.testing.assert_allclose(np.asarray(tta(f, x)), np.asarray(f(x)), rtol=1e-5, atol=1e-6)
