"""bench/step_profile.py: its GroupNorm variant computes nnx.GroupNorm's function, and its trace summary puts the
time where the program spends it."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.step_profile import channel_sum_group_norm, patched, summarise_trace


def test_channel_sum_group_norm_is_nnx_group_norm():
    norm = nnx.GroupNorm(32, num_groups=8, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.linspace(0.5, 1.5, 32)
    norm.bias[...] = jnp.linspace(-1.0, 1.0, 32)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 32)) * 3.0 + 1.0
    np.testing.assert_allclose(channel_sum_group_norm(norm, x), norm(x), atol=1e-5)


def test_variant_patch_is_undone():
    original = nnx.GroupNorm.__call__
    with patched("nonorm"):
        assert nnx.GroupNorm.__call__ is not original
    assert nnx.GroupNorm.__call__ is original


def test_trace_summary_names_the_costly_instruction(tmp_path):
    big = jax.jit(lambda a, b: (a @ b) @ b + 1.0)
    a = jnp.ones((512, 512))
    big(a, a).block_until_ready()
    jax.profiler.start_trace(str(tmp_path))
    for _ in range(3):
        big(a, a).block_until_ready()
    jax.profiler.stop_trace()
    lines = {"dot.1": "f32[512,512] dot(a, b)"}
    summary = summarise_trace(str(tmp_path), top=10, hlo_lines=lines)
    shares = [op["share"] for op in summary["top_ops"]]
    assert shares == sorted(shares, reverse=True) and 0.99 < sum(shares) <= 1.0 + 1e-9
    # two 512^3 matmuls (however XLA:CPU fuses them) against one 512^2 add: the matmuls hold the time
    assert sum(shares[:2]) > 0.9
    assert all(op["hlo"] == lines.get(op["op"], "") for op in summary["top_ops"])
