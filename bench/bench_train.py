"""Train-step throughput of the U-Net: images/s at a given width and batch size on the current JAX backend, and the
model FLOP utilisation (MFU) on GPU.

Measures the real ``trainer.steps`` train step (augmentation, forward, backward, AdamW update; data parallel over every
local device) on a synthetic batch already on the device, so the input pipeline is out of the picture (see
``bench/bench_loader.py`` for that). FLOPs per step come from XLA's own count of the compiled program
(``jax.jit(...).lower(...).compile().cost_analysis()``); MFU = achieved FLOP/s / peak FLOP/s of the devices, with the
peak of the accelerator's dense bfloat16 tensor cores (H100 / H200 SXM: 989 TFLOP/s) or ``--peak-tflops``.

With the loader (the default), one run also measures the input pipeline: samples/s of
:class:`trainer.data.SampleStream` from PostgreSQL (``bench/bench_loader.py``: the dubai-aerial JPEG crops in a
temporary database, or ``--database-url``), and prints, for each model, the ratio loader samples/s / train images/s:
above 1 the loader stays ahead of the device, below 1 the device waits for data. ``--no-loader``: the step alone.

    python bench/bench_train.py --base-filters 32 64 --batch-size 8 --steps 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.bench_loader import (  # noqa: E402
    DEFAULT_ADMIN_URL,
    DEFAULT_DATA,
    bench_database,
    loader_samples_per_s,
)
from trainer.config import TrainConfig  # noqa: E402
from trainer.model import default_compute_dtype  # noqa: E402
from trainer.steps import StepSpec, batch_sharded, compiled_functions, make_mesh  # noqa: E402

# Dense bfloat16 peak per device, FLOP/s (NVIDIA datasheets, SXM parts).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _peak_flops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in PEAK_FLOPS.items() if name in kind), None)


def _flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def benchmark(base_filters: int, batch_size: int, steps: int, *, depth: int = 4, compute_dtype: str = "auto",
              peak_tflops: float | None = None) -> dict:
    """Time ``steps`` train steps (after one warm-up step) and return images/s, FLOPs per step and MFU."""
    config = TrainConfig(steps=steps + 1, batch_size=batch_size, base_filters=base_filters, depth=depth,
                         compute_dtype=compute_dtype)
    mesh = make_mesh(batch_size)
    _, _, init, step = compiled_functions(StepSpec.of(config, steps + 1), mesh)
    state = init()
    rng = np.random.default_rng(0)
    batch = jax.device_put({
        "images": rng.integers(0, 256, (batch_size, 256, 256, 3), dtype=np.uint8),
        "masks": (rng.random((batch_size, 256, 256)) > 0.9).astype(np.uint8),
        "valid": np.ones(batch_size, bool),
    }, batch_sharded(mesh))
    started = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - started
    flops = _flops(compiled)
    state, metrics = compiled(state, batch)  # warm-up: first run
    jax.block_until_ready(metrics)
    started = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - started) / steps
    devices = len(mesh.devices.flat)
    peak = peak_tflops * 1e12 if peak_tflops else _peak_flops_per_device()
    achieved = flops / seconds if flops else None
    return {
        "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "devices": devices,
        "base_filters": base_filters, "depth": depth, "batch_size": batch_size, "steps": steps,
        "compute_dtype": str(jnp.dtype(default_compute_dtype(compute_dtype))), "compile_s": compile_s,
        "step_s": seconds, "images_per_s": batch_size / seconds, "flops_per_step": flops,
        "tflops_per_s": achieved / 1e12 if achieved else None,
        "mfu": achieved / (peak * devices) if achieved and peak and jax.default_backend() != "cpu" else None,
    }


def train_step_images_per_s(base_filters: int, batch_size: int, steps: int) -> float:
    """Images per second of the train step (U-Net of depth 4) at this width and batch size, on this backend."""
    return benchmark(base_filters, batch_size, steps)["images_per_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-filters", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after one warm-up step")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s of one device, for MFU")
    parser.add_argument("--no-loader", dest="loader", action="store_false", help="do not measure the loader")
    parser.add_argument("--database-url", help="loader: an existing database with samples in split train (read only)")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL, help="loader: where to create the temporary "
                        "database of the dubai-aerial crops")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="loader: the dubai-aerial folder")
    parser.add_argument("--decode-workers", type=int, default=2, help="loader: decode threads (default 2)")
    parser.add_argument("--loader-samples", type=int, default=1000, help="loader: samples to time (default 1000)")
    args = parser.parse_args(argv)
    loader = None
    if args.loader:
        def measure(url: str) -> float:
            return loader_samples_per_s(url, args.batch_size, args.decode_workers, samples=args.loader_samples)

        if args.database_url:
            loader = measure(args.database_url)
        else:
            with bench_database(args.admin_url, args.data) as url:
                loader = measure(url)
        print(f"loader (PostgreSQL -> decoded batches of {args.batch_size}, {args.decode_workers} decode workers): "
              f"{loader:.1f} samples/s", flush=True)
    for base in args.base_filters:
        r = benchmark(base, args.batch_size, args.steps, depth=args.depth, compute_dtype=args.compute_dtype,
                      peak_tflops=args.peak_tflops)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        tflops = f"{r['tflops_per_s']:.3f}" if r["tflops_per_s"] is not None else "n/a"
        gflop = f"{r['flops_per_step'] / 1e9:.1f}" if r["flops_per_step"] else "n/a"
        print(f"{r['backend']} ({r['device']} x{r['devices']}) base {base} depth {r['depth']} batch {r['batch_size']} "
              f"{r['compute_dtype']}: {r['images_per_s']:.2f} images/s, {r['step_s'] * 1000:.0f} ms/step, "
              f"{gflop} GFLOP/step, {tflops} TFLOP/s, MFU {mfu} (compile {r['compile_s']:.0f} s)"
              + (f"; loader/train = {loader / r['images_per_s']:.2f}"
                 f" ({'loader ahead' if loader >= r['images_per_s'] else 'DEVICE WAITS FOR DATA'})"
                 if loader is not None else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
