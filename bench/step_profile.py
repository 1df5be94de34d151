"""Where the train step's time goes on a GPU (issue 9): the step of ``trainer benchmark`` under variants that each
take one piece out or change one thing, all in one process (XLA's autotuning results are shared, so only the first
variant pays the long compile), then one profiled run of the default step with the device time summed per kernel.

Variants (``--variants``, comma-separated): ``default``; ``batch=N``; ``noaug`` (no augmentation in the step);
``nonorm`` (GroupNorm replaced by the identity: the most any normalisation change could gain); ``chgn`` (GroupNorm
computed from per-channel sums, the same function in another reduction order); ``plain`` (no residual blocks);
``convtranspose`` (the up-convolutions as ``nnx.ConvTranspose``'s transposed convolution, as before 2026-11-28,
instead of :class:`trainer.model.UpConv2x2`'s matrix product: the same function); ``matmul1x1`` (the 1 x 1
convolutions, the head and the residual projections, as matrix products over the channels: the same function; the
H200 ran the head's as cuDNN convolutions at about a tenth of their memory-bound speed);
``stem=N`` (the images' 3 channels zero-padded to N inside the model, before its first convolution, built for N
input channels: the same function, without the 3-channel convolution that cuDNN pads; the FLOPs, so the MFU, still
count 3 channels); ``xla:FLAG=VALUE[;FLAG=VALUE...]`` (the default step compiled with these XLA options, e.g.
``xla:xla_gpu_autotune_level=0``: ``true``/``false`` read as booleans, numbers as numbers, no comma in a value;
an option that JAX's persistent cache key leaves out, e.g. ``xla_dump_to``, acts only where the step is not
cached yet). Every variant is checked before the first one runs: an unknown one, or an XLA option name or value
that XLA rejects, stops the run with one line. Each prints one JSON line of
:func:`trainer.benchmark.step_benchmark` with the variant's name and its ratio to the first variant.

``--profile N``: N profiled steps of the default step (after the variants), summarised from the trace's device
planes: the share of device time of each kernel name (top ``--top``), and of four classes: convolutions
(cuDNN/cuBLAS kernels), reductions, other XLA fusions, copies and the rest; and per XLA instruction, with its line
of the optimized program, operand shapes included (a convolution's input, kernel, output and window).

    python bench/step_profile.py --base-filters 32 --batch-size 128 --variants default,nonorm,chgn,noaug \\
        --profile 5 --out profile.json
    python bench/step_profile.py --variants 'default,stem=8,stem=16,xla:xla_gpu_autotune_level=0'
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def channel_sum_group_norm(self, x, *, mask=None):
    """GroupNorm of ``x`` [B, H, W, C] from per-channel sums over H, W (then summed per group): nnx.GroupNorm's
    function (float32 statistics, fast variance), its reductions in another order."""
    import jax
    import jax.numpy as jnp

    b, c = x.shape[0], x.shape[-1]
    groups = self.num_groups
    xf = x.astype(jnp.float32)
    count = x.size // (b * groups)
    sums = jnp.stack([xf.sum(axis=(1, 2)), (xf * xf).sum(axis=(1, 2))])  # [2, B, C]
    sums = sums.reshape(2, b, groups, c // groups).sum(-1) / count
    mean, var = sums[0], jnp.maximum(sums[1] - sums[0] ** 2, 0.0)
    inv = jax.lax.rsqrt(var + self.epsilon)
    inv, mean = jnp.repeat(inv, c // groups, axis=1), jnp.repeat(mean, c // groups, axis=1)
    a = inv * self.scale[...].astype(jnp.float32)
    shift = self.bias[...].astype(jnp.float32) - mean * a
    return (xf * a[:, None, None, :] + shift[:, None, None, :]).astype(self.dtype or x.dtype)


def zero_padded(block_call):
    """``ConvBlock.__call__`` that first pads its input's channels with zeros up to the input channels of the block's
    first convolution (stem=N: the first block's 3 image channels, after the model's [0, 1] -> [-1, 1] map)."""
    import jax.numpy as jnp

    def call(self, x):
        missing = self.conv1.in_features - x.shape[-1]
        if missing:
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, missing)])
        return block_call(self, x)

    return call


def pointwise_as_matmul(conv_call):
    """``nnx.Conv.__call__`` that computes a 1 x 1, stride-1 convolution (the head, the residual projections) as a
    matrix product over the channels (the same function); every other convolution as before."""
    import jax.numpy as jnp

    def call(self, x):
        if tuple(self.kernel_size) != (1, 1) or self.strides not in (1, (1, 1)):
            return conv_call(self, x)
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)  # as trainer.model.UpConv2x2 (nnx's promote_dtype rule)
        y = jnp.einsum("bhwi,io->bhwo", x.astype(dtype), kernel[0, 0].astype(dtype))
        return y if self.bias is None else y + self.bias[...].astype(dtype)

    return call


@contextlib.contextmanager
def patched(variant: str):
    """The model patch a variant needs (GroupNorm replaced; the first block built for, and fed, N channels), undone
    after."""
    from flax import nnx

    from trainer.model import ConvBlock, UNet, UpConv2x2
    from trainer.steps import compiled_functions

    originals = nnx.GroupNorm.__call__, UNet.__init__, ConvBlock.__call__, UpConv2x2.__call__, nnx.Conv.__call__
    if variant == "convtranspose":
        UpConv2x2.__call__ = nnx.ConvTranspose.__call__
    elif variant == "matmul1x1":
        nnx.Conv.__call__ = pointwise_as_matmul(nnx.Conv.__call__)
    elif variant == "nonorm":
        nnx.GroupNorm.__call__ = lambda self, x, *, mask=None: x
    elif variant == "chgn":
        nnx.GroupNorm.__call__ = channel_sum_group_norm
    elif variant.startswith("stem="):
        channels, unet_init = int(variant.split("=", 1)[1]), UNet.__init__
        UNet.__init__ = lambda self, **kwargs: unet_init(self, **{**kwargs, "in_channels": channels})
        ConvBlock.__call__ = zero_padded(ConvBlock.__call__)
    compiled_functions.cache_clear()
    try:
        yield
    finally:
        nnx.GroupNorm.__call__, UNet.__init__, ConvBlock.__call__, UpConv2x2.__call__, nnx.Conv.__call__ = originals
        compiled_functions.cache_clear()


NAMED_VARIANTS = ("default", "noaug", "nonorm", "chgn", "plain", "convtranspose", "matmul1x1")
MIN_VALUE = {"batch": 1, "stem": 3}  # of batch=N and stem=N


def option_value(text: str) -> bool | int | float | str:
    """An XLA option's value from its text: XLA takes a boolean option only as a boolean (not "true" nor "1")."""
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def compiler_options(variant: str) -> dict | None:
    """The XLA options of an ``xla:FLAG=VALUE[;FLAG=VALUE...]`` variant, ``None`` for any other variant; a
    ValueError for a malformed one."""
    if not variant.startswith("xla:"):
        return None
    options = {}
    for item in variant[len("xla:"):].split(";"):
        flag, _, value = item.partition("=")
        if not (flag.isidentifier() and value):
            raise ValueError(f"variant {variant!r}: expected xla:FLAG=VALUE[;FLAG=VALUE...], got {item!r}")
        options[flag] = option_value(value)
    return options


def check_variants(variants: list[str]) -> None:
    """A ValueError of one line for the first of ``variants`` that is not a known one, or whose XLA options XLA
    rejects (an unknown name, a value of the wrong type: tried on a trivial program), so that a mistyped variant
    stops the run before the first long compile rather than after the variants before it."""
    import jax

    for variant in variants:
        kind, _, value = variant.partition("=")
        if variant in NAMED_VARIANTS or (kind in MIN_VALUE and value.isdigit() and int(value) >= MIN_VALUE[kind]):
            continue
        options = compiler_options(variant)
        if options is None:
            raise ValueError(f"unknown variant {variant!r}: expected one of {', '.join(NAMED_VARIANTS)}, batch=N "
                             f"(N >= 1), stem=N (N >= 3) or xla:FLAG=VALUE[;FLAG=VALUE...]")
        try:
            jax.jit(lambda x: x + 1).lower(0.0).compile(options)
        except jax.errors.JaxRuntimeError as exc:
            raise ValueError(f"variant {variant!r}: {' '.join(str(exc).split())}") from None


def run_variant(variant: str, base: int, batch: int, steps: int, on_compiled=None, depth: int = 4) -> dict:
    from trainer.benchmark import step_benchmark

    options = {"augment": False} if variant == "noaug" else {"residual": False} if variant == "plain" else {}
    if variant.startswith("batch="):
        batch = int(variant.split("=", 1)[1])
    with patched(variant):
        return step_benchmark(base, batch, steps, depth=depth, options=options,
                              compiler_options=compiler_options(variant), on_compiled=on_compiled)


def kernel_class(name: str) -> str:
    lowered = name.lower()
    if any(k in lowered for k in ("conv", "xmma", "cudnn", "implicit_gemm", "wgrad", "dgrad", "fprop", "sm90", "sm80",
                                  "gemm", "cutlass", "nhwc")):
        return "convolution/matmul"
    if "reduce" in lowered or "reduction" in lowered:
        return "reduction fusion"
    if "fusion" in lowered or "loop_" in lowered or "triton" in lowered:
        return "other fusion"
    return "copy/other"


def summarise_trace(trace_dir: str, top: int, hlo_lines: dict[str, str] | None = None) -> dict:
    """Device time per kernel name (on a CPU: XLA's thread-pool events), and per XLA instruction (the ``hlo_op`` of each kernel event, with its line of
    the optimized program from ``hlo_lines`` when given: shapes and convolution windows), over the GPU planes of
    the trace in ``trace_dir``."""
    from jax.profiler import ProfileData

    per_name: dict[str, float] = defaultdict(float)
    per_op: dict[str, float] = defaultdict(float)
    lines_seen = []
    planes = [plane for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
              for plane in ProfileData.from_file(path).planes]
    gpu = any(plane.name.startswith("/device:GPU") for plane in planes)
    for plane in planes:
        if not (plane.name.startswith("/device:GPU") if gpu else plane.name == "/host:CPU"):
            continue
        for line in plane.lines:
            # GPU: kernels live on the stream lines ("XLA Ops"/"XLA Modules" repeat them at other granularities);
            # CPU (no GPU in the trace): the XLA thread pool's events that name an XLA instruction
            if gpu and not line.name.startswith("Stream"):
                lines_seen.append(line.name)
                continue
            for event in line.events:
                op = dict(event.stats).get("hlo_op")
                if not gpu and not op:
                    continue
                per_name[event.name] += event.duration_ns
                if op:
                    per_op[str(op)] += event.duration_ns
    total = sum(per_name.values()) or 1.0
    classes: dict[str, float] = defaultdict(float)
    for name, ns in per_name.items():
        classes[kernel_class(name)] += ns
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1])
    ops = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return {"device_ms": total / 1e6,
            "top_ops": [{"op": k, "share": v / total, "ms": v / 1e6, "hlo": (hlo_lines or {}).get(k, "")[:400]}
                        for k, v in ops], "classes": {k: v / total for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": k[:160], "share": v / total, "ms": v / 1e6} for k, v in ranked[:top]],
            "kernels": len(per_name), "other_lines": sorted(set(lines_seen))}


def hlo_lines(text: str) -> dict[str, str]:
    """Instruction name -> the rest of its line in an optimized program's text (``Compiled.as_text()``), each operand
    preceded by its shape (the text names operands only), without the metadata and backend config that follow the
    attributes: a convolution's line shows its input, kernel and output dims, window and dim_labels."""
    lines, shapes = {}, {}
    for line in text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
        if match:
            name, rest = match.groups()
            lines[name] = re.split(r", (?:metadata|backend_config)=", rest)[0]
            shapes[name] = re.sub(r"\{[^}]*\}", "", leading_shape(rest))  # without its layout
    return {name: re.sub(r"%([\w.\-]+)", lambda m: f"{shapes[m[1]]} {m[0]}" if m[1] in shapes else m[0], line)
            for name, line in lines.items()}


def leading_shape(rest: str) -> str:
    """The shape that begins an instruction's line after its ``=``: up to the first space, or a parenthesised tuple
    of shapes."""
    if not rest.startswith("("):
        return rest.split(" ", 1)[0]
    depth = 0
    for i, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return rest[:i + 1]
    return rest


def profile_default(base: int, batch: int, steps: int, top: int) -> dict:
    import jax

    trace_dir = tempfile.mkdtemp(prefix="tilesmith-step-trace-")
    run_variant("default", base, batch, 2)  # compiled (cache) and warm before the trace
    programs: list[str] = []  # the optimized program of the traced step itself
    jax.profiler.start_trace(trace_dir)
    try:
        row = run_variant("default", base, batch, steps, on_compiled=lambda compiled: programs.append(
            compiled.as_text()))
    finally:
        jax.profiler.stop_trace()
    summary = summarise_trace(trace_dir, top, hlo_lines(programs[0]))
    summary["steps_traced"] = steps + 1
    summary["images_per_s_while_traced"] = row["images_per_s"]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-filters", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", default="default,nonorm,chgn,noaug,batch=256")
    parser.add_argument("--profile", type=int, default=0, help="profiled steps of the default step (0: none)")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from bench.gpu_report import install_carried_wheels

    install_carried_wheels()
    from trainer import compile_cache

    compile_cache.enable()
    variants = args.variants.split(",")
    try:
        check_variants(variants)
    except ValueError as exc:
        parser.error(f"--variants: {exc}")
    report = {"base_filters": args.base_filters, "batch_size": args.batch_size, "variants": []}
    first = None
    for variant in variants:
        started = time.perf_counter()
        row = run_variant(variant, args.base_filters, args.batch_size, args.steps)
        row.update(variant=variant, wall_s=time.perf_counter() - started)
        first = first or row["images_per_s"]
        row["ratio_to_first"] = row["images_per_s"] / first
        report["variants"].append(row)
        print(json.dumps({k: row[k] for k in ("variant", "base_filters", "batch_size", "images_per_s", "mfu",
                                              "compile_s", "ratio_to_first", "wall_s")}), flush=True)
    if args.profile:
        report["profile"] = profile_default(args.base_filters, args.batch_size, args.profile, args.top)
        p = report["profile"]
        print(f"profile: {p['device_ms']:.1f} ms of device time over {p['steps_traced']} steps, {p['kernels']} kernels")
        for name, share in p["classes"].items():
            print(f"  {100 * share:5.1f} %  {name}")
        for k in p["top"]:
            print(f"  {100 * k['share']:5.1f} %  {k['ms']:8.2f} ms  {k['kernel']}")
        print("per XLA instruction:")
        for k in p["top_ops"]:
            print(f"  {100 * k['share']:5.1f} %  {k['ms']:8.2f} ms  {k['op']}: {k['hlo']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
