"""U-Net for binary building segmentation, written from scratch in Flax NNX.

Follows O. Ronneberger, P. Fischer, T. Brox, "U-Net: Convolutional Networks for Biomedical Image Segmentation",
MICCAI 2015, arXiv:1505.04597: a contracting path of (3x3 conv, ReLU) x 2 blocks and 2x2 max pooling that doubles the
filters at each level, an expanding path of 2x2 up-convolutions that halve them, concatenated with the skip connection
of the same level and followed by another (3x3 conv, ReLU) x 2 block, and a final 1x1 convolution.

Departures from the paper, and why:

* 'SAME' padding instead of the paper's unpadded ('valid') convolutions: the output is the full 256x256 tile, so every
  pixel of the mask is predicted and no overlap-tile stitching or skip cropping is needed.
* GroupNorm after every 3x3 convolution (the paper has no normalisation). GroupNorm rather than BatchNorm because it
  keeps no batch statistics: the model holds parameters only (a pure train step, nothing to sync across devices,
  identical behaviour in training and evaluation) and it works with the tiny per-device batches that 256x256 tiles
  force on small GPUs. Convolutions followed by a norm have no bias (the norm's shift replaces it).
* One output logit per pixel (sigmoid, building vs. background) instead of a two-channel softmax; with
  ``outputs=2`` a second, independent sigmoid logit per pixel: "border/gap between two buildings" (issue 11, the
  SpaceNet 2 winners' recipe; :mod:`trainer.instances`), which ``predict`` and the object metric use to split touching
  buildings apart. Its bias starts at the logit of :data:`BORDER_PRIOR` (the prior initialisation of Lin et al.,
  arXiv:1708.02002): borders are rare (0.02 % of the Dubai pixels, on 14 % of its tiles; more where ``instances``
  show touching buildings), and from 0 the border loss's first gradients, all pushing
  every pixel to "no border", swamped the building output (building IoU 0.23 against 0.54 at 250 CPU steps).
* ``residual=True``: each block adds its input (through a 1x1 projection where the width changes) to its output
  before the last ReLU (He et al., arXiv:1512.03385; the "residual U-Nets" of the Inria results).
* Width and depth are configurable: ``base_filters`` (64 in the paper, 32 by default here) and ``depth`` (number of
  downsamplings, 4 in the paper). He-normal initialisation, as the paper recommends for ReLU networks.
* Mixed precision: parameters are float32; activations are computed in ``dtype`` (bfloat16 on GPU/TPU by default,
  see :func:`default_compute_dtype`), and the logits are returned as float32 so that the loss is computed in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

BORDER_PRIOR = 0.01  # initial border probability of every pixel
_MAX_GROUPS = 8  # groups of GroupNorm: 8 (fewer when the channel count is not a multiple of 8)
# XLA's RngBitGenerator: compiles in a fraction of a second where threefry takes seconds per shape on XLA:CPU.
PRNG_IMPL = "rbg"


def prng_key(seed: int) -> jax.Array:
    """The root PRNG key of a run (parameter initialisation, augmentation)."""
    return jax.random.key(seed, impl=PRNG_IMPL)


def norm_groups(channels: int) -> int:
    """Number of GroupNorm groups for ``channels`` features: the largest divisor of ``channels`` that is <= 8."""
    return math.gcd(channels, _MAX_GROUPS)


def default_compute_dtype(name: str = "auto") -> jnp.dtype:
    """``"auto"``: bfloat16 on GPU/TPU (tensor cores), float32 on CPU (where bfloat16 is slow and emulated)."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else jnp.float32
    return jnp.dtype(name)


class ConvBlock(nnx.Module):
    """Two times (3x3 convolution, GroupNorm, ReLU): one level of the contracting or expanding path."""

    def __init__(self, in_channels: int, out_channels: int, *, residual: bool = False, dtype, param_dtype,
                 rngs: nnx.Rngs):
        conv = dict(kernel_size=(3, 3), padding="SAME", use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.initializers.he_normal(), rngs=rngs)
        norm = dict(num_groups=norm_groups(out_channels), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = nnx.Conv(in_channels, out_channels, **conv)
        self.norm1 = nnx.GroupNorm(out_channels, **norm)
        self.conv2 = nnx.Conv(out_channels, out_channels, **conv)
        self.norm2 = nnx.GroupNorm(out_channels, **norm)
        self.residual = residual
        if residual and in_channels != out_channels:
            self.project = nnx.Conv(in_channels, out_channels, kernel_size=(1, 1), use_bias=False, dtype=dtype,
                                    param_dtype=param_dtype, kernel_init=nnx.initializers.he_normal(), rngs=rngs)
        else:
            self.project = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.norm2(self.conv2(nnx.relu(self.norm1(self.conv1(x)))))
        if self.residual:
            y = y + (x if self.project is None else self.project(x))
        return nnx.relu(y)


class UpConv2x2(nnx.ConvTranspose):
    """The paper's 2x2 up-convolution, stride 2: ``nnx.ConvTranspose``'s parameters (the same names, shapes and
    initialisation, so checkpoints and seeds carry over) and function, computed as one matrix product of each input
    pixel with the kernel [C_in, 2 x 2 x C_out] followed by a depth-to-space reshape.

    Why: XLA lowers a transposed convolution to a convolution of the zero-dilated input (4x the multiplications, 3 in
    4 of them by zeros, after a pad pass over the dilated input) and its weight gradient to a convolution with a
    window as large as the image, which cuDNN ran with a slow Ampere-generation kernel: 14.9 % of the H200's base-32
    train step for the top level alone (``bench/step_profile.py --profile``, 2026-11-28). A matrix product and its
    two gradients run on cuBLAS's Hopper kernels. Built for ``kernel_size=(2, 2), strides=(2, 2), padding="VALID"``
    only."""

    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        if (self.kernel_size, self.strides, self.padding, self.transpose_kernel) != ((2, 2), (2, 2), "VALID", False):
            raise ValueError("UpConv2x2 is the 2x2, stride-2, VALID up-convolution only")

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        # as nnx's promote_dtype: the module's compute dtype, else the inputs' common one
        dtype = self.dtype or jnp.result_type(x, kernel)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        b, h, w, _ = x.shape
        # lax.conv_transpose (VALID, kernel not transposed) gives out[2i + a, 2j + c] = x[i, j] @ kernel[1 - a, 1 - c]
        y = jnp.einsum("bhwi,acio->bhawco", x, kernel[::-1, ::-1], precision=self.precision)
        y = y.reshape(b, 2 * h, 2 * w, y.shape[-1])
        return y if self.bias is None else y + self.bias[...].astype(dtype)


class UNet(nnx.Module):
    """``images`` float [B, H, W, 3] in [0, 1] -> building logits float32 [B, H, W] (``outputs=1``), or
    [B, H, W, 2]: building, border (``outputs=2``; see :func:`split_logits`). H and W divisible by 2**depth."""

    def __init__(self, *, base_filters: int = 32, depth: int = 4, in_channels: int = 3, outputs: int = 1,
                 residual: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if base_filters < 1 or depth < 1 or outputs not in (1, 2):
            raise ValueError(f"base_filters and depth must be >= 1 and outputs 1 or 2, got {base_filters}, {depth}, "
                             f"{outputs}")
        self.depth = depth
        self.outputs = outputs
        self.dtype = dtype
        widths = [base_filters * 2**level for level in range(depth + 1)]
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        block = dict(residual=residual, **kw)
        # encoder[depth] is the bottleneck (no pooling after it).
        self.encoder = nnx.List(
            [ConvBlock(in_channels if level == 0 else widths[level - 1], widths[level], **block)
             for level in range(depth + 1)]
        )
        # Ordered from the deepest level up, in the order they are applied.
        self.upsample = nnx.List(
            [UpConv2x2(widths[level + 1], widths[level], kernel_size=(2, 2), strides=(2, 2), padding="VALID",
                       kernel_init=nnx.initializers.he_normal(), **kw)
             for level in reversed(range(depth))]
        )
        self.decoder = nnx.List([ConvBlock(2 * widths[level], widths[level], **block)
                                 for level in reversed(range(depth))])
        self.head = nnx.Conv(widths[0], outputs, kernel_size=(1, 1), bias_init=_head_bias, **kw)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = (images * 2.0 - 1.0).astype(self.dtype)  # [0, 1] -> [-1, 1]
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x)
            if level < self.depth:
                skips.append(x)
                x = max_pool_2x2(x)
        for up, block, skip in zip(self.upsample, self.decoder, reversed(skips)):
            x = block(jnp.concatenate([skip, up(x)], axis=-1))
        logits = self.head(x).astype(jnp.float32)
        return logits[..., 0] if self.outputs == 1 else logits


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, of ``x`` [B, H, W, C] (H, W even) as a reshape and a max: the same values and
    gradients as ``nnx.max_pool``, whose backward pass (XLA's select-and-scatter) is a slow kernel on GPUs."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _head_bias(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """0 for the building logit; the logit of :data:`BORDER_PRIOR` for the border logit."""
    return jnp.zeros(shape, dtype).at[1:].set(math.log(BORDER_PRIOR / (1 - BORDER_PRIOR)))


def split_logits(logits: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """``(building logits [B, H, W], border logits [B, H, W] or None)`` of a U-Net's output."""
    if logits.ndim == 4:
        return logits[..., 0], logits[..., 1]
    return logits, None


def build_unet(base_filters: int, depth: int, *, seed: int = 0, compute_dtype: str = "auto", outputs: int = 1,
               residual: bool = False) -> UNet:
    """A freshly initialised U-Net (parameters float32, compute dtype resolved by :func:`default_compute_dtype`).

    Initialised in one compiled program: op by op, every layer shape would be compiled on its own.
    """
    dtype = default_compute_dtype(compute_dtype)
    return nnx.jit(lambda: UNet(base_filters=base_filters, depth=depth, outputs=outputs, residual=residual,
                                dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(prng_key(seed))))()


def count_params(model: nnx.Module) -> int:
    """Number of scalar parameters (``nnx.Param`` leaves) of ``model``."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
