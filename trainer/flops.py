"""FLOPs of the U-Net counted from its layer shapes, and the peak FLOP/s of the device, for model FLOP utilisation.

The count is analytic: the forward pass is traced (shapes only, nothing computed or compiled) and every convolution
and matrix product of the program is counted as 2 x its multiply-accumulates (MACs): a convolution produces each
output pixel from ``kh * kw * C_in / groups`` inputs for each of its ``C_out`` channels; a transposed convolution (a
convolution whose input is dilated by its stride) multiplies each *input* pixel by the whole ``kh x kw x C_in x
C_out`` kernel, so the zeros inserted by the dilation are not counted; the U-Net's up-convolutions are matrix products
that do exactly that (:class:`trainer.model.UpConv2x2`). A train step is forward + backward = 3 x the forward count (the
backward pass computes the gradients of both the activations and the weights, each as costly as the forward).
Normalisation, activations, pooling, the loss and the optimizer are left out (they are a few % and not matmuls):
this is the usual "model FLOPs" of MFU, which XLA's ``cost_analysis()`` does not give (it counted 10.2 GFLOP for a
step of 1,158 GFLOP on an H200).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend.core import ClosedJaxpr, Jaxpr

from .config import TILE_SIZE

# Dense bfloat16 tensor-core peak of one device, TFLOP/s, from NVIDIA's datasheets (SXM parts), matched in
# ``jax.Device.device_kind``. PCIe H100s have less (756): pass --peak-tflops there.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
TRAIN_FACTOR = 3  # forward + backward


def conv_macs(jaxpr: Jaxpr) -> int:
    """Multiply-accumulates of every ``conv_general_dilated`` and ``dot_general`` in ``jaxpr`` and its
    sub-programs."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            total += _one_conv_macs(eqn)
        elif eqn.primitive.name == "dot_general":  # the up-convolutions (trainer.model.UpConv2x2)
            total += _one_dot_macs(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, (ClosedJaxpr, Jaxpr)):
                    total += conv_macs(getattr(sub, "jaxpr", sub))
    return total


def _one_dot_macs(eqn) -> int:
    """A matrix product's MACs: each output element sums over the contracting dimensions."""
    (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contracting)


def _one_conv_macs(eqn) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    out = eqn.outvars[0].aval.shape
    lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
    kernel_spatial = math.prod(rhs[d] for d in rhs_spec[2:])
    in_features = rhs[rhs_spec[1]]  # per group already (the kernel's input-feature dimension)
    out_features = out[out_spec[1]]
    if any(d != 1 for d in eqn.params["lhs_dilation"]):  # a transposed convolution: count real input pixels
        positions = lhs[lhs_spec[0]] * math.prod(lhs[d] for d in lhs_spec[2:])
    else:
        positions = out[out_spec[0]] * math.prod(out[d] for d in out_spec[2:])
    return positions * kernel_spatial * in_features * out_features


def forward_flops_per_image(base_filters: int, depth: int, size: int = TILE_SIZE, *, residual: bool = False,
                            outputs: int = 1) -> int:
    """FLOPs (2 x MACs of every convolution) of one forward pass of the U-Net on one ``size`` x ``size`` image
    (``residual``: with the 1x1 projections of the residual blocks; ``outputs``: 2 with the border output)."""
    from .model import UNet

    abstract = nnx.eval_shape(lambda: UNet(base_filters=base_filters, depth=depth, residual=residual,
                                           outputs=outputs, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, image)
    return 2 * conv_macs(jaxpr.jaxpr)


def train_flops_per_image(base_filters: int, depth: int, size: int = TILE_SIZE, *, residual: bool = False,
                          outputs: int = 1) -> int:
    """FLOPs of one train step per image: forward + backward = 3 x the forward pass."""
    return TRAIN_FACTOR * forward_flops_per_image(base_filters, depth, size, residual=residual, outputs=outputs)


def peak_tflops(device_kind: str, backend: str) -> float | None:
    """Dense bf16 peak TFLOP/s of one device of this kind, ``None`` when unknown (every CPU)."""
    if backend == "cpu":
        return None
    return next((peak for name, peak in PEAK_TFLOPS.items() if name.lower() in device_kind.lower()), None)
