"""Where the train step's time goes on a GPU (issue 9): the step of ``trainer benchmark`` under variants that each
take one piece out or change one thing, all in one process (XLA's autotuning results are shared, so only the first
variant pays the long compile), then one profiled run of the default step with the device time summed per kernel.

Variants (``--variants``, comma-separated): ``default``; ``batch=N``; ``noaug`` (no augmentation in the step);
``nonorm`` (GroupNorm replaced by the identity: the most any normalisation change could gain); ``chgn`` (GroupNorm
computed from per-channel sums, the same function in another reduction order); ``plain`` (no residual blocks).
Each prints one JSON line of :func:`trainer.benchmark.step_benchmark` with the variant's name and its ratio to the
first variant. ``--profile N``: N profiled steps of the default step (after the variants), summarised from the
trace's device planes: the share of device time of each kernel name (top ``--top``), and of four classes:
convolutions (cuDNN/cuBLAS kernels), reductions, other XLA fusions, copies and the rest.

    python bench/step_profile.py --base-filters 32 --batch-size 128 --variants default,nonorm,chgn,noaug \\
        --profile 5 --out profile.json
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


@contextlib.contextmanager
def patched(variant: str):
    """The model patch a variant needs (GroupNorm replaced), undone after."""
    from flax import nnx

    from trainer.steps import compiled_functions

    original = nnx.GroupNorm.__call__
    if variant == "nonorm":
        nnx.GroupNorm.__call__ = lambda self, x, *, mask=None: x
    elif variant == "chgn":
        nnx.GroupNorm.__call__ = channel_sum_group_norm
    compiled_functions.cache_clear()
    try:
        yield
    finally:
        nnx.GroupNorm.__call__ = original
        compiled_functions.cache_clear()


def run_variant(variant: str, base: int, batch: int, steps: int, on_compiled=None) -> dict:
    from trainer.benchmark import step_benchmark

    options = {"augment": False} if variant == "noaug" else {"residual": False} if variant == "plain" else {}
    if variant.startswith("batch="):
        batch = int(variant.split("=", 1)[1])
    with patched(variant):
        return step_benchmark(base, batch, steps, options=options, on_compiled=on_compiled)


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
            "top_ops": [{"op": k, "share": v / total, "ms": v / 1e6, "hlo": (hlo_lines or {}).get(k, "")[:300]}
                        for k, v in ops], "classes": {k: v / total for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": k[:160], "share": v / total, "ms": v / 1e6} for k, v in ranked[:top]],
            "kernels": len(per_name), "other_lines": sorted(set(lines_seen))}


def hlo_lines(text: str) -> dict[str, str]:
    """Instruction name -> the rest of its line, in an optimized program's text (``Compiled.as_text()``)."""
    lines = {}
    for line in text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
        if match:
            lines[match.group(1)] = match.group(2)
    return lines


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
    report = {"base_filters": args.base_filters, "batch_size": args.batch_size, "variants": []}
    first = None
    for variant in args.variants.split(","):
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
            print(f"  {100 * k['share']:5.1f} %  {k['ms']:8.2f} ms  {k['op']}: {k['hlo'][:200]}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
