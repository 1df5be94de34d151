"""The U-Net: output shape, parameter count computed by hand, a gradient reaching every layer, dtype policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer.model import UNet, build_unet, count_params, default_compute_dtype, norm_groups


def _conv3x3(cin, cout):  # no bias (a GroupNorm follows)
    return 9 * cin * cout


def _block(cin, cout):  # conv, GroupNorm(scale + bias), conv, GroupNorm
    return _conv3x3(cin, cout) + 2 * cout + _conv3x3(cout, cout) + 2 * cout


def expected_params(base, depth, cin=3):
    widths = [base * 2**i for i in range(depth + 1)]
    total = _block(cin, widths[0]) + sum(_block(widths[i - 1], widths[i]) for i in range(1, depth + 1))
    for i in range(depth):
        total += 2 * 2 * widths[i + 1] * widths[i] + widths[i]  # 2x2 up-convolution with bias
        total += _block(2 * widths[i], widths[i])
    return total + widths[0] + 1  # 1x1 head with bias


def _abstract(base, depth, dtype=jnp.float32):
    """The model's structure, shapes and dtypes, without running its initialisers (nothing to compile)."""
    return nnx.eval_shape(lambda: UNet(base_filters=base, depth=depth, dtype=dtype, rngs=nnx.Rngs(0)))


def test_param_count_tiny_by_hand():
    # base 4, depth 1: encoder 3->4 (108+8+144+8) + bottleneck 4->8 (288+16+576+16) + up 8->4 (128+4)
    # + decoder 8->4 (288+8+144+8) + head (4+1) = 268 + 896 + 132 + 448 + 5
    assert count_params(_abstract(4, 1)) == 1749


@pytest.mark.parametrize("base, depth", [(4, 2), (8, 3), (32, 4), (64, 4)])
def test_param_count_formula(base, depth):
    assert count_params(_abstract(base, depth)) == expected_params(base, depth)


def test_paper_width_is_about_31_million():
    assert expected_params(64, 4) == 31_037_633


def test_output_shape_and_dtype():
    logits = nnx.eval_shape(lambda m, x: m(x), _abstract(4, 2), jnp.zeros((2, 256, 256, 3)))
    assert logits.shape == (2, 256, 256)
    assert logits.dtype == jnp.float32


def test_border_output_and_residual_blocks():
    base, depth = 4, 2
    widths = [base * 2**i for i in range(depth + 1)]
    two = nnx.eval_shape(lambda: UNet(base_filters=base, depth=depth, outputs=2, rngs=nnx.Rngs(0)))
    assert nnx.eval_shape(lambda m, x: m(x), two, jnp.zeros((2, 64, 64, 3))).shape == (2, 64, 64, 2)
    assert count_params(two) == expected_params(base, depth) + widths[0] + 1  # a second 1x1 head channel
    residual = nnx.eval_shape(lambda: UNet(base_filters=base, depth=depth, residual=True, rngs=nnx.Rngs(0)))
    # a bias-free 1x1 projection in every block: each one changes the width
    projections = 3 * widths[0] + sum(widths[i - 1] * widths[i] for i in range(1, depth + 1)) + sum(
        2 * widths[i] * widths[i] for i in range(depth))
    assert count_params(residual) == expected_params(base, depth) + projections


def test_residual_block_adds_its_input():
    from trainer.model import ConvBlock

    block = ConvBlock(4, 4, residual=True, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    plain = ConvBlock(4, 4, residual=False, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).random((1, 8, 8, 4)), jnp.float32)
    inner = block.norm2(block.conv2(nnx.relu(block.norm1(block.conv1(x)))))
    np.testing.assert_allclose(block(x), jax.nn.relu(inner + x), rtol=1e-6)
    np.testing.assert_allclose(plain(x), jax.nn.relu(inner), rtol=1e-6)  # same weights (same seed), no skip


def test_build_unet_initialises_finite_parameters():
    model = build_unet(4, 1, seed=3)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(bool(jnp.isfinite(x).all()) for x in leaves)
    kernels = [x for x in leaves if x.ndim == 4]
    assert all(float(jnp.std(k)) > 0 for k in kernels)  # random, not constant


def test_model_holds_parameters_only():
    model = _abstract(4, 2)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    assert jax.tree.leaves(params) and not jax.tree.leaves(rest)  # GroupNorm: no batch statistics, no RNG state


def test_every_layer_gets_a_gradient():
    graphdef, abstract = nnx.split(_abstract(4, 2), nnx.Param)
    rng = np.random.default_rng(0)
    # random parameters made on the host: the test is about the gradient path, not the initialisers
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), abstract)
    images = jnp.asarray(rng.random((2, 32, 32, 3)), jnp.float32)
    targets = jnp.asarray(rng.random((2, 32, 32)) > 0.7, jnp.float32)

    def loss(p):
        logits = nnx.merge(graphdef, p)(images)
        return jnp.mean((jax.nn.sigmoid(logits) - targets) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    flat = nnx.to_flat_state(grads)
    assert len(flat) == len(nnx.to_flat_state(params))
    for path, leaf in flat:
        value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
        assert float(jnp.abs(value).max()) > 0, f"zero gradient at {path}"


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = _abstract(4, 1, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    assert nnx.eval_shape(lambda m: m(jnp.zeros((1, 16, 16, 3))), model).dtype == jnp.float32


def test_compute_dtype_policy():
    assert default_compute_dtype("float32") == jnp.float32
    assert default_compute_dtype("bfloat16") == jnp.bfloat16
    expected = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    assert default_compute_dtype("auto") == expected


def test_norm_groups_divide_channels():
    for channels in (1, 4, 6, 8, 12, 32, 64, 1024):
        assert channels % norm_groups(channels) == 0
    assert norm_groups(64) == 8


def test_border_logit_starts_at_the_prior():
    import math

    from trainer.model import BORDER_PRIOR, split_logits

    model = UNet(base_filters=4, depth=1, outputs=2, rngs=nnx.Rngs(0))
    assert model.head.bias[...].tolist() == pytest.approx([0.0, math.log(BORDER_PRIOR / (1 - BORDER_PRIOR))])
    plain = UNet(base_filters=4, depth=1, rngs=nnx.Rngs(0))
    assert plain.head.bias[...].tolist() == [0.0]
    building, border = split_logits(model(jnp.zeros((1, 16, 16, 3))))
    assert building.shape == border.shape == (1, 16, 16)


def test_max_pool_2x2_matches_flax_pooling_values_and_gradients():
    from trainer.model import max_pool_2x2

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 12, 5)), jnp.float32)
    reference = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
    np.testing.assert_array_equal(np.asarray(max_pool_2x2(x)), np.asarray(reference))
    grad = jax.grad(lambda a: (max_pool_2x2(a) ** 2).sum())(x)
    grad_reference = jax.grad(lambda a: (nnx.max_pool(a, window_shape=(2, 2), strides=(2, 2)) ** 2).sum())(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(grad_reference))


def test_up_convolution_is_flax_conv_transpose_in_values_gradients_and_parameters():
    """The U-Net's up-convolution (a matrix product + depth-to-space) computes what nnx.ConvTranspose computes, with
    the same parameters drawn the same way: old checkpoints and seeds give the same model."""
    from trainer.model import UpConv2x2

    def build(cls, bias_seed):
        layer = cls(6, 4, kernel_size=(2, 2), strides=(2, 2), padding="VALID",
                    kernel_init=nnx.initializers.he_normal(), rngs=nnx.Rngs(7))
        layer.bias[...] = jax.random.normal(jax.random.key(bias_seed), (4,))  # a non-zero bias, to check its add
        return layer

    ours, reference = build(UpConv2x2, 1), build(nnx.ConvTranspose, 1)
    np.testing.assert_array_equal(np.asarray(ours.kernel[...]), np.asarray(reference.kernel[...]))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 7, 6)), jnp.float32)
    assert ours(x).shape == (2, 10, 14, 4)
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(reference(x)), rtol=1e-5, atol=1e-5)

    def grads(layer):
        def loss(model, inputs):
            return (model(inputs) ** 2 * jnp.arange(4.0)).sum()

        return nnx.grad(loss, argnums=(0, 1))(layer, x)

    (ours_params, ours_x), (ref_params, ref_x) = grads(ours), grads(reference)
    np.testing.assert_allclose(np.asarray(ours_x), np.asarray(ref_x), rtol=1e-5, atol=1e-5)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(np.asarray(getattr(ours_params, name)[...]),
                                   np.asarray(getattr(ref_params, name)[...]), rtol=1e-5, atol=1e-4)
    # mixed precision (the GPU's): float32 parameters, bfloat16 compute and output, as nnx.ConvTranspose
    half = [cls(6, 4, kernel_size=(2, 2), strides=(2, 2), padding="VALID", dtype=jnp.bfloat16, rngs=nnx.Rngs(7))
            for cls in (UpConv2x2, nnx.ConvTranspose)]
    outputs = [layer(x) for layer in half]
    assert outputs[0].dtype == outputs[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(outputs[0], np.float32), np.asarray(outputs[1], np.float32), atol=0.05)
    with pytest.raises(ValueError, match="2x2, stride-2"):
        UpConv2x2(6, 4, kernel_size=(3, 3), strides=(2, 2), padding="VALID", rngs=nnx.Rngs(0))
