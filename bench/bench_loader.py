"""Benchmark of the trainer's input pipeline: samples/s from PostgreSQL to decoded host batches.

Real JPEG tiles: the dubai-aerial crops (``shared/data/dubai-aerial``, about 1,300 of 256 x 256, JPEG quality 95)
loaded into a temporary database that the bench creates and drops (or ``--database-url`` of an existing one, read
only). It prints, in one run, :class:`trainer.data.SampleStream` at ``--batch-size`` with each of ``--workers`` worker
processes, the same with a thread of this process holding the GIL about half the time (``+GIL``, as a training
loop's Python dispatch does), the largest worker count read one epoch at a time (``epoch by epoch``: the pipeline
drained and refilled at every epoch boundary, as training read it before ``SampleStream.batches``), and a baseline: a plain single-threaded loop (fetch a chunk of rows, decode each image
and mask with Pillow, stack). Measurements alternate over ``--rounds`` rounds (the median is kept: this machine's
other work comes and goes); the targets are ratios within the run: loader / baseline >= 2 and loader+GIL / loader
>= 0.8 (2 workers).

    python bench/bench_loader.py [--database-url URL] [--admin-url URL] [--data DIR] [--samples N] [--workers 1 2]
                                 [--rounds 3] [--json]

``measure_baseline`` and ``bench_database`` are importable, for reports that add other stages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere: before importing the project's modules
    sys.path.insert(0, str(REPO_ROOT))

from tests.databases import ADMIN_URL, TempDatabase  # noqa: E402
from trainer.benchmark import LoaderMeasure as Measure  # noqa: E402
from trainer.benchmark import measure_loader  # noqa: E402

log = logging.getLogger("bench.loader")

DEFAULT_ADMIN_URL = ADMIN_URL
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "dubai-aerial"
SPLIT = "train"  # the bench database puts every sample in it, so one epoch reads them all


def measure_baseline(database_url: str, batch_size: int, *, samples: int = 2000) -> Measure:
    """Samples/s of the plain way: one thread fetches ``batch_size`` rows, decodes them with Pillow, stacks them."""
    async def run() -> Measure:
        conn = await asyncpg.connect(database_url)
        try:
            ids = [r[0] for r in await conn.fetch(
                "SELECT sample_id FROM dataset WHERE split = $1 ORDER BY sample_id", SPLIT)]
            order = np.random.default_rng(0).permutation(ids).tolist()
            seen = 0
            start, cpu = time.perf_counter(), time.process_time()
            while seen < samples:
                for i in range(0, len(order) - batch_size + 1, batch_size):
                    rows = await conn.fetch("SELECT sample_id, zoom, image, image_format, mask FROM dataset"
                                            " WHERE sample_id = ANY($1::bigint[])", order[i:i + batch_size])
                    images = np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])
                    masks = np.stack([(np.asarray(Image.open(io.BytesIO(r["mask"]))) != 0).astype(np.uint8)
                                      for r in rows])
                    assert len(images) == len(masks) == len(rows)
                    seen += len(images)
                    if seen >= samples:
                        break
            return Measure(seen / (time.perf_counter() - start), (time.process_time() - cpu) / seen * 1e3)
        finally:
            await conn.close()

    return asyncio.run(run())


def server_cpu_ms_per_sample(database_url: str, batch_size: int = 64) -> float | None:
    """CPU time of the PostgreSQL backend serving the loader's query (fetch by chunks of ids), per sample.

    Read from ``/proc`` of the backend process: only when the server runs on this machine (else ``None``).
    """
    async def run() -> float | None:
        conn = await asyncpg.connect(database_url)
        try:
            stat = Path(f"/proc/{await conn.fetchval('SELECT pg_backend_pid()')}/stat")
            if not stat.exists():
                return None
            ids = [r[0] for r in await conn.fetch("SELECT sample_id FROM dataset WHERE split = $1", SPLIT)]
            before = _cpu_ticks(stat)
            for i in range(0, len(ids), batch_size):
                await conn.fetch("SELECT sample_id, zoom, image, image_format, mask FROM dataset"
                                 " WHERE sample_id = ANY($1::bigint[])", ids[i:i + batch_size])
            return (_cpu_ticks(stat) - before) / os.sysconf("SC_CLK_TCK") * 1e3 / len(ids)
        finally:
            await conn.close()

    return asyncio.run(run())


def _cpu_ticks(stat: Path) -> int:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


@contextlib.contextmanager
def bench_database(admin_url: str, data: Path) -> Iterator[str]:
    """A temporary migrated database holding the dubai-aerial crops, all in split ``train``; dropped at exit."""
    from trainer.datasets import load_dubai

    async def all_in_one_split(url: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("UPDATE samples SET split = $1", SPLIT)
        finally:
            await conn.close()

    with TempDatabase(prefix="tilesmith_bench", migrate=True, admin_url=admin_url) as url:
        started = time.perf_counter()
        count = load_dubai(url, data)
        log.info("loaded %d dubai crops in %.1f s", count, time.perf_counter() - started)
        asyncio.run(all_in_one_split(url))
        yield url


def run_bench(database_url: str, samples: int, batch_size: int = 32, workers: tuple[int, ...] = (1, 2),
              rounds: int = 3) -> dict[str, Any]:
    """Every configuration of the report, measured on ``database_url``, alternating over ``rounds`` rounds."""
    results: dict[str, Any] = {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()[0],
                               "batch_size": batch_size, "rounds": rounds}
    # name -> measure_loader's arguments (None: the baseline)
    configs: list[tuple[str, dict | None]] = [("baseline", None)]
    configs += [(str(w), {"workers": w}) for w in workers]
    configs += [(f"{w}+GIL", {"workers": w, "gil_hog": True}) for w in workers]
    # the pipeline drained and refilled at each epoch boundary
    configs += [(f"{workers[-1]} epoch by epoch", {"workers": workers[-1], "continuous": False})]
    runs: dict[str, list[Measure]] = {name: [] for name, _ in configs}
    for _ in range(rounds):
        for name, config in configs:
            if config is None:
                runs[name].append(measure_baseline(database_url, batch_size, samples=samples // 2))
            else:
                runs[name].append(measure_loader(database_url, batch_size, samples=samples, **config))
    median = {name: sorted(m, key=lambda x: x.samples_per_s)[len(m) // 2] for name, m in runs.items()}
    base = median["baseline"].samples_per_s
    results["rows"] = [{"workers": name, **dataclasses.asdict(m), "all_samples_per_s": [x.samples_per_s for x in
                        runs[name]], "ratio_to_baseline": m.samples_per_s / base} for name, m in median.items()]
    for w in workers:
        results[f"gil_ratio_{w}"] = median[f"{w}+GIL"].samples_per_s / median[str(w)].samples_per_s
    results["continuous_to_epoch_by_epoch"] = (median[str(workers[-1])].samples_per_s
                                               / median[f"{workers[-1]} epoch by epoch"].samples_per_s)
    # A consumer that takes each batch in 1.5 x the time the loader needs for it (a GPU step's stand-in): an
    # ideal pipeline never keeps it waiting; a drained one does at each epoch boundary.
    pace = 1.5 * batch_size / median[str(workers[-1])].samples_per_s
    # "to device": the continuous stream read as training reads it, through prefetch_to_device (copies and
    # placement on its thread, off the consumer's next())
    modes = {"continuous": {}, "epoch by epoch": {"continuous": False}, "to device": {"to_device": True}}
    paced: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode, options in modes.items():
            paced[mode].append(measure_loader(database_url, batch_size, workers[-1], samples=samples, pace_s=pace,
                                              **options).wait_fraction)
    results["paced"] = {"pace_ms": pace * 1e3, "workers": workers[-1],
                        **{mode: sorted(w)[len(w) // 2] for mode, w in paced.items()}}
    results["load_average_after"] = os.getloadavg()[0]
    results["server_cpu_ms_per_sample"] = server_cpu_ms_per_sample(database_url)
    return results


def _print_report(results: dict[str, Any]) -> None:
    print(f"loader samples/s from PostgreSQL (dubai-aerial JPEG 256x256 crops; batch {results['batch_size']};"
          f" {results['cpus']} CPUs; 1-min load average {results['load_average_before']:.1f} before,"
          f" {results['load_average_after']:.1f} after; median of {results['rounds']} alternating rounds)")
    print(f"{'workers':>8} {'samples/s':>10} {'x baseline':>10} {'CPU ms/sample':>14}  rounds")
    for row in results["rows"]:
        note = "  (one thread: fetch + Pillow decode + stack)" if row["workers"] == "baseline" else ""
        print(f"{row['workers']:>8} {row['samples_per_s']:>10.0f} {row['ratio_to_baseline']:>10.2f}"
              f" {row['cpu_ms_per_sample']:>14.2f}  {' '.join(f'{x:.0f}' for x in row['all_samples_per_s'])}{note}")
    for key, value in results.items():
        if key.startswith("gil_ratio_"):
            print(f"{key.removeprefix('gil_ratio_')} workers with a thread holding the GIL half the time:"
                  f" {value:.2f} of their speed without it (target >= 0.8)")
    print(f"one stream through the epochs (as training reads it) / one epoch at a time:"
          f" {results['continuous_to_epoch_by_epoch']:.2f}")
    p = results["paced"]
    print(f"a consumer taking {p['pace_ms']:.1f} ms a batch (1.5 x the loader's time, {p['workers']} workers) waited"
          f" for data {100 * p['continuous']:.1f} % of the time with one stream through the epochs,"
          f" {100 * p['epoch by epoch']:.1f} % reading one epoch at a time, {100 * p['to device']:.1f} % through"
          " prefetch_to_device as training reads it")
    print("CPU ms/sample: this process only (workers and PostgreSQL not counted). PostgreSQL backend CPU:"
          f" {results['server_cpu_ms_per_sample'] or float('nan'):.2f} ms/sample. Target: 2 workers >= 2x baseline.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="an existing database with samples in split train (not modified)")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL, help="where to create the temporary database")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the dubai-aerial folder")
    parser.add_argument("--samples", type=int, default=2000, help="samples per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker processes to measure")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (the median is kept)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("trainer").setLevel(logging.WARNING)
    if args.database_url:
        results = run_bench(args.database_url, args.samples, args.batch_size, tuple(args.workers), args.rounds)
    else:
        if not args.data.is_dir():
            print(f"error: {args.data} not found: pass --data or --database-url", file=sys.stderr)
            return 2
        with bench_database(args.admin_url, args.data) as url:
            results = run_bench(url, args.samples, args.batch_size, tuple(args.workers), args.rounds)
    if args.json:
        print(json.dumps(results))
    else:
        _print_report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
