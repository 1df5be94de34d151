"""Train-step throughput of the U-Net and the ratio input pipeline / step: ``trainer benchmark`` for several widths,
its loader measured on the dubai-aerial crops in a temporary database (no harvest needed).

The step is :func:`trainer.benchmark.step_benchmark` (the real compiled train step on a synthetic batch already on
the device; FLOPs counted from the layer shapes, MFU against the device's dense bf16 peak, or ``--peak-tflops``).
With the loader (the default) one run also measures :class:`trainer.data.SampleStream` from PostgreSQL
(``bench/bench_loader.py``'s database: the dubai-aerial JPEG crops, or ``--database-url``) and prints, for each
model, the ratio loader samples/s / train images/s: above 1 the loader stays ahead of the device, below 1 the device
waits for data. ``--no-loader``: the step alone.

    python bench/bench_train.py --base-filters 32 64 --batch-size 8 --steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_loader import DEFAULT_ADMIN_URL, DEFAULT_DATA, bench_database  # noqa: E402
from trainer import compile_cache  # noqa: E402
from trainer.benchmark import format_row, measure_loader, step_benchmark  # noqa: E402
from trainer.config import DEFAULT_DECODE_WORKERS, resolve_batch_size  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-filters", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch-size", default="auto", help="an integer or auto (the trainer's default)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after one warm-up step")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s of one device, for MFU")
    parser.add_argument("--no-loader", dest="loader", action="store_false", help="do not measure the loader")
    parser.add_argument("--database-url", help="loader: an existing database with samples in split train (read only)")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL, help="loader: where to create the temporary "
                        "database of the dubai-aerial crops")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="loader: the dubai-aerial folder")
    parser.add_argument("--decode-workers", type=int, default=DEFAULT_DECODE_WORKERS, help="loader: worker processes")
    parser.add_argument("--loader-samples", type=int, default=1000, help="loader: samples to time (default 1000)")
    parser.add_argument("--json", action="store_true", help="one JSON object per model")
    args = parser.parse_args(argv)
    compile_cache.enable()
    loader = None
    if args.loader:
        batch = resolve_batch_size(args.batch_size, min(args.base_filters))
        if args.database_url:
            loader = measure_loader(args.database_url, batch, args.decode_workers, samples=args.loader_samples)
        else:
            with bench_database(args.admin_url, args.data) as url:
                loader = measure_loader(url, batch, args.decode_workers, samples=args.loader_samples)
    for base in args.base_filters:
        row = step_benchmark(base, resolve_batch_size(args.batch_size, base), args.steps, depth=args.depth,
                             compute_dtype=args.compute_dtype, peak_tflops=args.peak_tflops)
        if loader is not None:
            row.update(loader_samples_per_s=loader.samples_per_s, loader_to_step=loader.samples_per_s / row["images_per_s"])
        print(json.dumps(row, sort_keys=True) if args.json else format_row(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
