"""Benchmark of evaluation's host side: samples/s of :func:`trainer.steps.evaluate_stream` when the model is free.

On a GPU host the U-Net evaluates thousands of crops a second; what bounds ``trainer evaluate``, the validation of
``trainer train`` and the quality run of ``bench/gpu_report.py`` is the host: decoding the split, and matching the
buildings of every predicted mask with the true ones (``object_f1``: labelling, areas, IoU per pair). This bench
measures that host side on this machine with a stand-in for the model that costs nearly nothing: a jitted function
that "predicts" each true mask shifted by a few pixels, plus the tile's brightest pixels as speckle (many small
false buildings, as a young model makes), so that the matching has realistic work.

Real tiles: the dubai-aerial crops loaded into a temporary database (``bench_loader.bench_database``), or
``--database-url`` and ``--split`` of an existing one. Configurations, alternating over ``--rounds`` rounds (the
median is kept), in two parts: the matching alone (the split decoded once and kept in memory), and
``evaluate_stream`` end to end (decoding, border targets, the stand-in, the matching); each with the buildings
matched on one thread (the code before this bench: the baseline of its part) and on ``--threads`` threads (default:
``trainer.steps.MATCH_THREADS``, at least 2), and, end to end, pixel metrics only (no matching: the ceiling)::

    python bench/bench_evaluate.py [--database-url URL --split test] [--batch-size 32] [--workers 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere: before importing the project's modules
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench_loader import DEFAULT_ADMIN_URL, DEFAULT_DATA, SPLIT, bench_database  # noqa: E402

SHIFT = 3  # pixels: the stand-in's predicted mask is the true one moved down and right by this
SPECKLE = 235  # grey level: pixels brighter than this are predicted "building" too


def stand_in(images, masks, xp):
    """The stand-in model's predicted masks of ``images`` [B, H, W, 3] and ``masks`` [B, H, W] (numpy or jax.numpy
    as ``xp``): each true mask moved by :data:`SHIFT` pixels, plus the pixels brighter than :data:`SPECKLE`."""
    return xp.roll(masks > 0, (SHIFT, SHIFT), axis=(1, 2)) | (images.astype(xp.int32).mean(axis=-1) > SPECKLE)


def stand_in_eval_fn(mesh):
    """``eval_fn(params, batch)`` of :func:`trainer.steps.evaluate_stream`'s contract, without a model."""
    import jax
    import jax.numpy as jnp

    from trainer.metrics import confusion_counts
    from trainer.steps import batch_sharded, replicated

    def step(params, batch):
        del params
        predicted = stand_in(batch["images"], batch["masks"], jnp)
        logits = jnp.where(predicted, 1.0, -1.0)
        return {"counts": confusion_counts(logits, batch["masks"], batch["valid"]), "predicted": predicted}

    return jax.jit(step, in_shardings=(replicated(mesh), batch_sharded(mesh)))


def measure_stream(url: str, split: str, batch_size: int, workers: int, *, threads: int, objects: bool) -> dict:
    """One pass of ``evaluate_stream`` over ``split``: samples/s, and the metrics (the same in every configuration)."""
    import jax

    from trainer.data import SampleStream
    from trainer.steps import batch_sharded, evaluate_stream, make_mesh

    mesh = make_mesh(batch_size)
    eval_fn = stand_in_eval_fn(mesh)
    with SampleStream(url, split, None, batch_size, shuffle=False, pad_last=True, decode_workers=workers) as stream:
        with contextlib.closing(stream.epoch(0)) as batches:  # the workers started, the step compiled: not timed
            first = next(batches)
            arrays = {"images": first.images, "masks": first.masks, "valid": first.valid}
            jax.block_until_ready(eval_fn({}, jax.device_put(arrays, batch_sharded(mesh))))
        started = time.perf_counter()
        result = evaluate_stream(eval_fn, {}, stream, mesh, objects=objects, match_threads=threads)
        seconds = time.perf_counter() - started
    return {"samples_per_s": result["samples"] / seconds, "samples": result["samples"], "iou": result["iou"],
            "object_f1": result.get("object_f1")}


def read_split(url: str, split: str, batch_size: int, workers: int) -> list:
    """Every batch of ``split``, decoded once (with the border targets, as evaluation reads them), kept in memory."""
    from trainer.data import SampleStream

    with SampleStream(url, split, None, batch_size, shuffle=False, pad_last=True, decode_workers=workers) as stream:
        return list(stream.epoch(0))


def measure_matching(batches: list, threads: int) -> dict:
    """The object matching alone (:class:`trainer.metrics.SegmentationMetrics` over the kept batches)."""
    import numpy as np

    from trainer.metrics import SegmentationMetrics

    predicted = [stand_in(b.images, b.masks, np) for b in batches]
    counts = [np.zeros((len(b.valid), 4), np.int64) for b in batches]  # pixel counts do not matter here
    with ThreadPoolExecutor(threads) as pool:
        metrics = SegmentationMetrics(mapper=pool.map if threads > 1 else map)
        started = time.perf_counter()
        for b, p, c in zip(batches, predicted, counts):
            metrics.update(c, b.valid, b.zooms, p, b.masks, true_borders=b.borders)
        seconds = time.perf_counter() - started
    return {"samples_per_s": metrics.samples / seconds, "samples": metrics.samples, "iou": None,
            "object_f1": metrics.result()["object_f1"]}


def run_bench(url: str, split: str, batch_size: int, workers: int, threads: int, rounds: int) -> dict:
    batches = read_split(url, split, batch_size, workers)
    configs = [
        ("matching alone, 1 thread (before)", lambda: measure_matching(batches, 1)),
        (f"matching alone, {threads} threads", lambda: measure_matching(batches, threads)),
        ("evaluate_stream, 1 thread (before)", lambda: measure_stream(url, split, batch_size, workers, threads=1,
                                                                      objects=True)),
        (f"evaluate_stream, {threads} threads", lambda: measure_stream(url, split, batch_size, workers,
                                                                       threads=threads, objects=True)),
        ("evaluate_stream, pixels only", lambda: measure_stream(url, split, batch_size, workers, threads=1,
                                                                objects=False)),
    ]
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    load_before = os.getloadavg()[0]
    for _ in range(rounds):
        for name, run in configs:
            runs[name].append(run())
    rows = []
    for name, measured in runs.items():
        median = sorted(measured, key=lambda r: r["samples_per_s"])[rounds // 2]
        rows.append({"config": name, **median, "all_samples_per_s": [r["samples_per_s"] for r in measured]})
    for row in rows:  # each against the 1-thread row of its part
        base = rows[0] if row["config"].startswith("matching") else rows[2]
        row["ratio"] = row["samples_per_s"] / base["samples_per_s"]
    object_f1s = {round(r["object_f1"], 12) for measured in runs.values() for r in measured
                  if r["object_f1"] is not None}
    if len(object_f1s) != 1:  # threads change the order of the work, never the result
        raise SystemExit(f"bench_evaluate: the configurations disagree on object F1: {sorted(object_f1s)}")
    return {"cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
            "split": split, "batch_size": batch_size, "workers": workers, "rounds": rounds, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    from trainer.steps import MATCH_THREADS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="an existing database holding the samples (read only)")
    parser.add_argument("--split", default=SPLIT, help=f"split to evaluate (default {SPLIT}; the bench database "
                        "puts every crop there)")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="decode worker processes (default 2)")
    threads = max(2, MATCH_THREADS)
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"matching threads of the parallel rows (default {threads}: trainer.steps.MATCH_THREADS, "
                        "at least 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        url = args.database_url or stack.enter_context(bench_database(args.admin_url, args.data))
        result = run_bench(url, args.split, args.batch_size, args.workers, args.threads, args.rounds)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"evaluate_stream, stand-in model, split {args.split!r}, batch {args.batch_size}, {args.workers} decode "
          f"workers, {result['cpus']} CPUs, load {result['load_average_before']:.1f} -> "
          f"{result['load_average_after']:.1f}, median of {args.rounds} rounds")
    print(f"{'configuration':<40}{'samples/s':>12}{'ratio':>8}  rounds")
    for row in result["rows"]:
        print(f"{row['config']:<40}{row['samples_per_s']:>12.0f}{row['ratio']:>8.2f}  "
              + ", ".join(f"{v:.0f}" for v in row["all_samples_per_s"]))
    first = result["rows"][2]
    print(f"{first['samples']} samples; IoU {first['iou']:.3f}, object F1 {first['object_f1']:.3f} in every row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
