"""Benchmark of the trainer's input pipeline: samples/s from PostgreSQL to decoded host batches.

Real JPEG tiles: the dubai-aerial crops (``shared/data/dubai-aerial``, about 1,300 of 256 x 256, JPEG quality 95)
loaded into a temporary database that the bench creates and drops (or ``--database-url`` of an existing one, read
only). It prints, in one run, :class:`trainer.data.SampleStream` at batch 32 and 64 with 1, 2 and 4 decode workers,
and a baseline: a plain single-threaded loop (fetch a chunk of rows, decode each image and mask with Pillow, stack),
with the ratio of each to the baseline.

    python bench/bench_loader.py [--database-url URL] [--admin-url URL] [--data DIR] [--samples N] [--json]

``loader_samples_per_s`` and ``baseline_samples_per_s`` are importable, for reports that add other stages.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
from PIL import Image

from tests.databases import ADMIN_URL, TempDatabase

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere; the project's modules are imported where used
    sys.path.insert(0, str(REPO_ROOT))

log = logging.getLogger("bench.loader")

DEFAULT_ADMIN_URL = ADMIN_URL
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "dubai-aerial"
SPLIT = "train"  # the bench database puts every sample in it, so one epoch reads them all


@dataclass(frozen=True)
class Measure:
    samples_per_s: float  # wall clock
    cpu_ms_per_sample: float  # CPU time of this process (every thread), not counting the PostgreSQL server's


def measure_loader(database_url: str, batch_size: int, workers: int, *, samples: int = 4000,
                   prefetch: int = 4) -> Measure:
    """:class:`SampleStream` (split ``train``, shuffled) over at least ``samples`` samples.

    Epochs follow one another as in training, so their start-up (thread, connection, first fetch) is counted.
    One untimed batch first warms PostgreSQL's cache and the decoders.
    """
    from trainer.data import SampleStream

    with SampleStream(database_url, SPLIT, None, batch_size, decode_workers=workers, prefetch=prefetch) as stream:
        if stream.num_batches() == 0:
            raise SystemExit(f"the bench database holds fewer than {batch_size} samples in split {SPLIT!r}")
        for _ in stream.epoch(10_000):
            break
        seen, epoch = 0, 0
        start, cpu = time.perf_counter(), time.process_time()
        while seen < samples:
            for batch in stream.epoch(epoch):
                seen += int(batch.valid.sum())
            epoch += 1
        return Measure(seen / (time.perf_counter() - start), (time.process_time() - cpu) / seen * 1e3)


def loader_samples_per_s(database_url: str, batch_size: int, workers: int, *, samples: int = 4000,
                         prefetch: int = 4) -> float:
    """Samples/s of :class:`SampleStream` (see :func:`measure_loader`)."""
    return measure_loader(database_url, batch_size, workers, samples=samples, prefetch=prefetch).samples_per_s


def baseline_samples_per_s(database_url: str, batch_size: int, *, samples: int = 2000) -> float:
    """Samples/s of the plain way: one thread fetches ``batch_size`` rows, decodes them with Pillow, stacks them."""
    return measure_baseline(database_url, batch_size, samples=samples).samples_per_s


def measure_baseline(database_url: str, batch_size: int, *, samples: int = 2000) -> Measure:
    """See :func:`baseline_samples_per_s`."""
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


def run_bench(database_url: str, samples: int) -> dict[str, Any]:
    """Every configuration of the report, measured on ``database_url``."""
    results: dict[str, Any] = {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()[0], "rows": []}
    for batch_size in (32, 64):
        baseline = measure_baseline(database_url, batch_size, samples=samples // 2)
        results["rows"].append({"batch_size": batch_size, "workers": "baseline", **dataclasses.asdict(baseline),
                                "ratio_to_baseline": 1.0})
        for workers in (1, 2, 4):
            loader = measure_loader(database_url, batch_size, workers, samples=samples)
            results["rows"].append({"batch_size": batch_size, "workers": workers, **dataclasses.asdict(loader),
                                    "ratio_to_baseline": loader.samples_per_s / baseline.samples_per_s})
    results["load_average_after"] = os.getloadavg()[0]
    # This machine's other work competes for its cores; CPU time does not depend on it. The estimate is what the
    # loader would do with every core to itself: cores / (client + server CPU time per sample).
    server = server_cpu_ms_per_sample(database_url)
    results["server_cpu_ms_per_sample"] = server
    if server is not None:
        for row in results["rows"]:
            if row["workers"] == "baseline":  # sequential: the client waits while the server works
                row["estimated_idle_samples_per_s"] = 1e3 / (row["cpu_ms_per_sample"] + server)
            elif row["workers"] >= 2:  # enough threads (and the server's process) to keep every core busy
                row["estimated_idle_samples_per_s"] = results["cpus"] * 1e3 / (row["cpu_ms_per_sample"] + server)
    return results


def _print_report(results: dict[str, Any]) -> None:
    print(f"loader samples/s from PostgreSQL (dubai-aerial JPEG 256x256 crops; {results['cpus']} CPUs;"
          f" 1-min load average {results['load_average_before']:.1f} before,"
          f" {results['load_average_after']:.1f} after)")
    server = results["server_cpu_ms_per_sample"]
    print(f"{'batch':>5} {'workers':>8} {'samples/s':>10} {'x baseline':>10} {'CPU ms/sample':>14}"
          f" {'idle-core estimate':>19}")
    for row in results["rows"]:
        note = "   (one thread: fetch + Pillow decode + stack)" if row["workers"] == "baseline" else ""
        estimate = row.get("estimated_idle_samples_per_s")
        print(f"{row['batch_size']:>5} {row['workers']:>8} {row['samples_per_s']:>10.0f}"
              f" {row['ratio_to_baseline']:>10.2f} {row['cpu_ms_per_sample']:>14.2f}"
              f" {'' if estimate is None else f'{estimate:.0f}':>19}{note}")
    if server is not None:
        print(f"PostgreSQL backend CPU: {server:.2f} ms/sample. Idle-core estimate (what the run would give with the"
              f" machine to itself): {results['cpus']} cores x 1000 / (CPU ms/sample + backend ms/sample) for 2+"
              " workers; 1000 / (the same) for the sequential baseline.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="an existing database with samples in split train (not modified)")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL, help="where to create the temporary database")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the dubai-aerial folder")
    parser.add_argument("--samples", type=int, default=4000, help="samples per measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("trainer").setLevel(logging.WARNING)
    if args.database_url:
        results = run_bench(args.database_url, args.samples)
    else:
        if not args.data.is_dir():
            print(f"error: {args.data} not found: pass --data or --database-url", file=sys.stderr)
            return 2
        with bench_database(args.admin_url, args.data) as url:
            results = run_bench(url, args.samples)
    if args.json:
        print(json.dumps(results))
    else:
        _print_report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
