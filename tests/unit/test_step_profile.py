"""bench/step_profile.py: its GroupNorm variant computes nnx.GroupNorm's function, its stem, convtranspose and
matmul1x1 variants the default model's, its XLA variant's options reach the step's compilation, a mistyped variant
stops the run, and its trace summary puts the time where the program spends it, each instruction with its operands'
shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bench.step_profile import (channel_sum_group_norm, check_variants, compiler_options, hlo_lines, main, patched,
                                run_variant, summarise_trace)
from trainer.losses import segmentation_loss
from trainer.steps import model_factory


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


@pytest.mark.parametrize("residual", [False, True])
def test_stem_pads_with_zeros_and_keeps_the_function(residual):
    """With the first block's kernels equal to the 3-channel model's on the first 3 input channels (and random, not
    zero, on the 5 padded ones), the stem=8 model's logits and loss are the 3-channel model's."""
    three = model_factory(4, 2, "float32", 0, residual=residual)()
    with patched("stem=8"):
        eight = model_factory(4, 2, "float32", 1, residual=residual)()
        nnx.update(eight, jax.tree.map(lambda a, b: b.at[:, :, :3].set(a) if a.shape != b.shape else a,
                                       nnx.state(three, nnx.Param), nnx.state(eight, nnx.Param)))
        images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
        padded = eight(images)
    kernel = eight.encoder[0].conv1.kernel[...]
    assert kernel.shape == (3, 3, 8, 4) and np.abs(kernel[:, :, 3:]).min() > 0
    masks = (jax.random.uniform(jax.random.key(1), (2, 32, 32)) > 0.7).astype(jnp.float32)
    loss = [segmentation_loss(logits, masks, jnp.zeros_like(masks), jnp.ones(2, bool))[0]
            for logits in (three(images), padded)]
    np.testing.assert_allclose(padded, three(images), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss[0], loss[1], rtol=1e-6)


def test_convtranspose_variant_is_the_same_model_through_a_transposed_convolution():
    """The baseline variant of the up-convolution: the same logits, but the program convolves a dilated input where
    the default multiplies matrices."""
    model = model_factory(4, 2, "float32", 0, residual=True)()
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    default = model(images)
    with patched("convtranspose"):
        np.testing.assert_allclose(model(images), default, atol=1e-5, rtol=1e-5)
        assert "lhs_dilation=(2, 2)" in str(jax.make_jaxpr(lambda x: model(x))(images))
    assert "lhs_dilation=(2, 2)" not in str(jax.make_jaxpr(lambda x: model(x))(images))


def test_matmul1x1_variant_is_the_same_model_without_pointwise_convolutions():
    model = model_factory(4, 2, "float32", 0, residual=True)()
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))

    def convolutions():
        return str(jax.make_jaxpr(lambda x: model(x))(images)).count("conv_general_dilated[")

    default, default_convolutions = model(images), convolutions()
    with patched("matmul1x1"):
        np.testing.assert_allclose(model(images), default, atol=1e-5, rtol=1e-5)
        # 5 blocks at depth 2 (3 encoder, 2 decoder) of two 3 x 3 convolutions each; the 1 x 1 ones are products now
        assert convolutions() == 10 < default_convolutions


def test_stem_variant_runs_the_step_with_an_n_channel_first_convolution():
    programs = []
    row = run_variant("stem=8", 4, 2, 1, depth=1, on_compiled=lambda compiled: programs.append(compiled.as_text()))
    assert row["images_per_s"] > 0
    convolutions = [line for line in hlo_lines(programs[0]).values() if " convolution(" in line]
    assert any("convolution(f32[2,256,256,8] %" in line and "f32[3,3,8,4] %" in line for line in convolutions)
    # the patch is undone: the next variant's model takes the 3 image channels
    assert model_factory(4, 1, "float32", 0)().encoder[0].conv1.kernel[...].shape == (3, 3, 3, 4)


def test_xla_variant_options_reach_the_step_compilation(tmp_path):
    """A CPU-valid option with a visible effect: XLA dumps the step's programs where ``xla_dump_to`` says."""
    variant = f"xla:xla_dump_to={tmp_path};xla_dump_hlo_as_text=true"
    assert compiler_options(variant) == {"xla_dump_to": str(tmp_path), "xla_dump_hlo_as_text": True}
    run_variant(variant, 4, 2, 1, depth=1)
    assert list(tmp_path.glob("*jit_train_step*after_optimizations.txt"))


def test_xla_variant_values_parse():
    assert compiler_options("xla:xla_a=true;xla_b=false;xla_c=2;xla_d=0.5;xla_e=cudnn") == {
        "xla_a": True, "xla_b": False, "xla_c": 2, "xla_d": 0.5, "xla_e": "cudnn"}
    assert compiler_options("default") is None and compiler_options("stem=8") is None


@pytest.mark.parametrize("variant, message", [
    ("xla:xla_no_such_option=1", "No such compile option: 'xla_no_such_option'"),
    ("xla:xla_cpu_enable_fast_math=yes", "xla_cpu_enable_fast_math, 'yes' is not a valid bool value"),
    ("xla:", "expected xla:FLAG=VALUE"),
    ("xla:xla_gpu_autotune_level", "expected xla:FLAG=VALUE"),
    ("xla:xla_gpu_autotune_level=0;", "expected xla:FLAG=VALUE"),
    ("stem=2", "unknown variant 'stem=2'"),
    ("stem=eight", "unknown variant"),
    ("batch=0", "unknown variant"),
    ("nonrom", "unknown variant 'nonrom'"),
])
def test_a_mistyped_variant_is_one_clear_line(variant, message):
    with pytest.raises(ValueError, match=message) as caught:
        check_variants(["default", variant])
    assert "\n" not in str(caught.value)


def test_known_variants_pass_the_check():
    check_variants(["default", "noaug", "nonorm", "chgn", "plain", "batch=4", "stem=3", "stem=16",
                    "xla:xla_gpu_autotune_level=0;xla_cpu_enable_fast_math=true"])  # GPU options: known on a CPU too


def test_the_command_stops_on_a_mistyped_variant_before_running_any(capsys, monkeypatch):
    from trainer import compile_cache

    monkeypatch.setattr(compile_cache, "enable", lambda: None)  # no persistent cache for the rest of the session
    with pytest.raises(SystemExit) as exited:
        main(["--base-filters", "4", "--batch-size", "2", "--variants", "default,xla:xla_no_such_option=1"])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "--variants: variant 'xla:xla_no_such_option=1': INVALID_ARGUMENT" in err


def test_hlo_lines_show_operand_shapes():
    """A cuDNN convolution as XLA:GPU prints it: operands by name only, a tuple shape, metadata and backend config."""
    text = "\n".join([
        "ENTRY %main.1 (p.1: u8[128,256,256,3]) -> bf16[128,256,256,32] {",
        '  %p.1 = u8[128,256,256,3]{3,2,1,0} parameter(0), metadata={op_name="images"}',
        "  %fusion.12 = bf16[128,256,256,8]{3,2,1,0} fusion(%p.1), kind=kLoop, calls=%fused_pad",
        "  %p.2 = bf16[32,3,3,8]{3,2,1,0} parameter(1)",
        "  %cudnn-conv.3 = (bf16[128,256,256,32]{3,2,1,0}, u8[0]{0}) custom-call(%fusion.12, %p.2), "
        'window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", '
        'metadata={op_name="jit(train_step)/conv"}, '
        'backend_config={"cudnn_conv_backend_config":{"conv_result_scale":1}}',
        "  ROOT %get-tuple-element.1 = bf16[128,256,256,32]{3,2,1,0} get-tuple-element(%cudnn-conv.3), index=0",
        "}"])
    lines = hlo_lines(text)
    assert lines["cudnn-conv.3"] == (
        "(bf16[128,256,256,32]{3,2,1,0}, u8[0]{0}) custom-call(bf16[128,256,256,8] %fusion.12, bf16[32,3,3,8] %p.2), "
        'window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward"')
    assert lines["fusion.12"] == ("bf16[128,256,256,8]{3,2,1,0} fusion(u8[128,256,256,3] %p.1), kind=kLoop, "
                                  "calls=%fused_pad")
    assert lines["get-tuple-element.1"].endswith("get-tuple-element((bf16[128,256,256,32], u8[0]) %cudnn-conv.3), "
                                                 "index=0")
