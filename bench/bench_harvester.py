"""Harvester benchmark: ``python -m bench.bench_harvester [--samples 1000]``. Prints two figures:

1. End-to-end samples/s with zero-latency local fakes (run as their own process, so they do not share our GIL), next to
   a baseline measured in the same run: the raw rate at which one aiohttp client fetches the same kind of tiles from the
   same fakes with the same concurrency and does nothing else. The ratio is the share of that ceiling the harvest keeps
   while it also queries Overpass, validates, rasterizes, encodes and writes to PostgreSQL.
2. The tile rate actually held against HARVESTER_TILE_RATE with 100 ms upstream latency: mean request rate over the
   run / limit (target 0.95-1.0) and the most request starts in any one-second window (never above the limit).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
import uuid

import aiohttp
import asyncpg

from harvester import db
from harvester.config import load_settings
from harvester.run import harvest
from harvester.tiles import tile_at
from tests.fakes.faults import max_in_window
from tests.fakes.servers import FakeUpstreams
from tests.fakes.world import World

ADMIN_URL = os.environ.get("TEST_DATABASE_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
USER_AGENT = "tilesmith-bench/0.1 (+https://github.com/tilesmith/tilesmith)"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


class TempDatabase:
    def __init__(self):
        self.name = f"tilesmith_bench_{uuid.uuid4().hex[:10]}"
        self.url = ADMIN_URL.rpartition("/")[0] + "/" + self.name

    async def __aenter__(self) -> str:
        await _admin(f'CREATE DATABASE "{self.name}"')
        await db.migrate(self.url)
        return self.url

    async def __aexit__(self, *exc) -> None:
        await _admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def start_fakes(*extra: str) -> tuple[subprocess.Popen, dict[str, str]]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes", "--port", "0", "--knob", "overpass:slots=64",
                             *extra], stdout=subprocess.PIPE, text=True)
    env = {}
    for line in proc.stdout:
        line = line.strip()
        if line == "READY":
            return proc, env
        name, _, value = line.partition("=")
        env[name] = value
    raise RuntimeError("the fakes did not start")


async def raw_tile_rate(template: str, n: int, concurrency: int, seed: int) -> float:
    """Baseline: distinct zoom-18 tiles in France fetched as fast as one client can, nothing else done."""
    rng = random.Random(seed)
    tiles = {tile_at(rng.uniform(-1.0, 7.0), rng.uniform(43.5, 49.5), 18) for _ in range(n)}
    urls = [template.replace("{z}", str(t.z)).replace("{x}", str(t.x)).replace("{y}", str(t.y)) for t in tiles]
    start = time.perf_counter()
    async with aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}) as session:
        async def worker():
            while urls:
                async with session.get(urls.pop()) as resp:
                    await resp.read()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(tiles) / (time.perf_counter() - start)


async def end_to_end(samples: int, concurrency: int) -> dict[str, float]:
    proc, fake_env = start_fakes()
    try:
        baseline = await raw_tile_rate(fake_env["HARVESTER_TILE_URL"], samples * 2, concurrency, seed=99)
        async with TempDatabase() as url:
            settings = load_settings({
                **fake_env, "DATABASE_URL": url, "HARVESTER_SAMPLES": str(samples), "HARVESTER_ZOOMS": "17,18",
                "HARVESTER_TILE_PROVIDER": "xyz", "HARVESTER_TILE_RATE": "100000",
                "HARVESTER_TILE_CONCURRENCY": str(concurrency), "HARVESTER_OVERPASS_RATE": "100000",
                "HARVESTER_OVERPASS_CONCURRENCY": "8", "HARVESTER_SEED": "1"})
            start = time.perf_counter()
            final = await harvest(settings)
            elapsed = time.perf_counter() - start
        stored = final["done"]
        return {"samples": stored, "seconds": elapsed, "samples_per_s": stored / elapsed,
                "baseline_tiles_per_s": baseline, "ratio": (stored / elapsed) / baseline}
    finally:
        proc.terminate()
        proc.wait(10)


async def rate_held(limit: float, samples: int) -> dict[str, float]:
    with FakeUpstreams(World(seed=5), latency_s=0.1) as up:
        async with TempDatabase() as url:
            settings = load_settings({
                **up.env(), "DATABASE_URL": url, "HARVESTER_SAMPLES": str(samples), "HARVESTER_ZOOMS": "17,18",
                "HARVESTER_TILE_PROVIDER": "xyz", "HARVESTER_TILE_RATE": str(limit),
                "HARVESTER_TILE_CONCURRENCY": "8", "HARVESTER_OVERPASS_RATE": "1000",
                "HARVESTER_OVERPASS_CONCURRENCY": "8", "HARVESTER_REGION": "bbox:2.2,48.8,2.5,48.9"})
            await harvest(settings)
        starts = sorted(r.t for r in up.requests("xyz"))
    mean_rate = (len(starts) - 1) / (starts[-1] - starts[0])
    peak = max_in_window(starts, 1.0)
    return {"requests": len(starts), "limit": limit, "mean_rate": mean_rate, "held_ratio": mean_rate / limit,
            "max_in_any_1s_window": peak, "peak_ratio": peak / limit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="coordinates of the end-to-end run (x2 zooms)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=20.0, help="HARVESTER_TILE_RATE of the rate run")
    parser.add_argument("--rate-samples", type=int, default=150)
    args = parser.parse_args()
    e2e = asyncio.run(end_to_end(args.samples, args.concurrency))
    print(f"end to end: {e2e['samples']} samples in {e2e['seconds']:.1f} s = {e2e['samples_per_s']:.0f} samples/s"
          f" | baseline raw tile fetch {e2e['baseline_tiles_per_s']:.0f} tiles/s | ratio {e2e['ratio']:.2f}")
    held = asyncio.run(rate_held(args.rate, args.rate_samples))
    print(f"tile rate with 100 ms latency: limit {held['limit']:g}/s, held {held['mean_rate']:.2f}/s"
          f" (ratio {held['held_ratio']:.3f}) over {held['requests']} requests;"
          f" max {held['max_in_any_1s_window']} in any 1 s window (ratio {held['peak_ratio']:.2f})")


if __name__ == "__main__":
    main()
