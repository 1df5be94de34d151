"""Harvester benchmark: ``python -m bench.bench_harvester [--samples 1000]``. Prints three figures:

1. End-to-end samples/s with zero-latency local fakes (run as their own process, so they do not share our GIL; their
   tiles pre-rendered for the benchmark's points, so the fakes' own rendering does not eat the 2 cores), with the
   limits held by the shared budget in PostgreSQL (what ``harvester run`` does) and, on a fresh database in the same
   run, by this process alone (the budget's cost), next to a
   baseline measured in the same run: the raw rate at which one aiohttp client fetches the same tiles from the same
   fakes with the same concurrency and does nothing else. The ratio is the share of that ceiling the harvest keeps
   while it also queries Overpass, validates, rasterizes, encodes and writes to PostgreSQL.
2. The same on real tiles: the fakes serve the bodies of ``../shared/data/kampala-oam`` (123 RGBA PNGs of ~100-200
   kB and 24 JPEGs, bytes as they are, one picked per tile) instead of their small rendered JPEGs; footprints are the
   fakes' (skipped with a note when the folder is absent; ``--tile-files`` names another).
3. The tile rate actually held against HARVESTER_TILE_RATE with 100 ms upstream latency: mean request rate over the
   run / limit (target 0.95-1.0) and the most request starts in any one-second window (never above the limit).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

import aiohttp
import numpy as np

from harvester.config import load_settings
from harvester.run import harvest
from harvester.sampling import PopulationSampler, parse_region
from harvester.labels.osm import building_query
from harvester.tiles import area_tile, lonlat_bounds, tile_at
from tests.databases import TempDatabase
from tests.fakes.faults import max_in_window
from tests.fakes.process import start_fakes_process

USER_AGENT = "tilesmith-bench/0.1 (+https://github.com/tilesmith/tilesmith)"


def write_points(path: str, samples: int, seed: int) -> np.ndarray:
    """The benchmark's coordinates: population-weighted across France, as a default run draws them."""
    points = PopulationSampler(parse_region("france")).sample(samples, seed)
    np.savetxt(path, points, delimiter=",", fmt="%.7f", header="lon,lat", comments="")
    return points


KAMPALA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                       "kampala-oam")


def start_fakes(*extra: str) -> tuple[subprocess.Popen, dict[str, str]]:
    return start_fakes_process("--knob", "overpass:slots=64", *extra)


async def raw_tile_rate(template: str, points: np.ndarray, concurrency: int) -> float:
    """Baseline: the zoom-17 and zoom-18 tiles of the points fetched as fast as one client can, nothing else done."""
    tiles = {tile_at(lon, lat, z) for lon, lat in points for z in (17, 18)}
    urls = [template.replace("{z}", str(t.z)).replace("{x}", str(t.x)).replace("{y}", str(t.y)) for t in tiles]
    start = time.perf_counter()
    async with aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}) as session:
        async def worker():
            while urls:
                async with session.get(urls.pop()) as resp:
                    await resp.read()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(tiles) / (time.perf_counter() - start)


async def warm_overpass(url: str, points: np.ndarray, zooms: tuple[int, ...], concurrency: int = 8) -> None:
    """Send the fakes, once, the Overpass queries the harvest will send, so that they generate the world around each
    area before the clock starts. ``--prewarm`` generates the cells of the points' tiles only, while the query's box,
    rounded outwards to OSM's 1e-7 degree grid, also touches the neighbouring cells: left cold, their generation
    (about 8 ms of the fakes' CPU per area) was the largest single cost of the timed run, and not the harvester's."""
    queries = list({building_query(lonlat_bounds(area_tile(lon, lat, zooms)), 180, 1 << 28) for lon, lat in points})
    async with aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}) as session:
        async def worker():
            while queries:
                async with session.post(url, data={"data": queries.pop()}) as resp:
                    await resp.read()
        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def end_to_end(samples: int, concurrency: int, workdir: str, tile_files: str | None = None,
                     processes: int = 0) -> dict[str, float]:
    """``processes``: also run the harvest as that many ``harvester run`` processes on one database (one shared
    budget, as ``docker compose up --scale harvester=N`` would), on a fresh database in the same run."""
    points_csv = os.path.join(workdir, "points.csv")
    points = write_points(points_csv, samples, seed=1)
    proc, fake_env = start_fakes("--prewarm", points_csv, *(("--tile-files", tile_files) if tile_files else ()))
    try:
        await warm_overpass(fake_env["HARVESTER_OVERPASS_URL"], points, (17, 18))
        baseline = await raw_tile_rate(fake_env["HARVESTER_TILE_URL"], points, concurrency)
        figures = {}
        for shared in (False, True, "processes") if processes else (False, True):
            async with TempDatabase(prefix="tilesmith_bench", migrate=True) as url:
                env = {**fake_env, "DATABASE_URL": url, "HARVESTER_POINTS": points_csv, "HARVESTER_ZOOMS": "17,18",
                       "HARVESTER_TILE_PROVIDER": "xyz", "HARVESTER_TILE_RATE": "100000",
                       "HARVESTER_TILE_CONCURRENCY": str(concurrency), "HARVESTER_OVERPASS_RATE": "100000",
                       "HARVESTER_OVERPASS_CONCURRENCY": "8", "HARVESTER_SEED": "1"}
                start = time.perf_counter()
                if shared == "processes":
                    done = await harvest_processes(env, processes, url)
                else:
                    done = (await harvest(load_settings(env), shared_budget=shared))["done"]
                figures[shared] = (done, time.perf_counter() - start)
        stored, elapsed = figures[True]
        local = figures[False][0] / figures[False][1]
        out = {"samples": stored, "seconds": elapsed, "samples_per_s": stored / elapsed,
               "baseline_tiles_per_s": baseline, "ratio": (stored / elapsed) / baseline,
               "in_process_samples_per_s": local, "budget_ratio": (stored / elapsed) / local}
        if processes:
            out.update(processes=processes, processes_samples=figures["processes"][0],
                       processes_seconds=figures["processes"][1],
                       processes_samples_per_s=figures["processes"][0] / figures["processes"][1])
        return out
    finally:
        proc.terminate()
        proc.wait(10)


async def harvest_processes(env: dict[str, str], processes: int, url: str) -> int:
    """``processes`` x ``python -m harvester run`` on one database until every one exits; the samples stored."""
    import asyncpg

    procs = [await asyncio.create_subprocess_exec(sys.executable, "-m", "harvester", "run", env={**os.environ, **env},
                                                  stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
             for _ in range(processes)]
    results = await asyncio.gather(*(p.communicate() for p in procs))
    for p, (_, err) in zip(procs, results):
        if p.returncode != 0:
            raise SystemExit(f"harvester run exited {p.returncode}: {err.decode()[-2000:]}")
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT count(*) FROM samples")
    finally:
        await conn.close()


async def rate_held(limit: float, samples: int, workdir: str) -> dict[str, float]:
    """HARVESTER_TILE_RATE against fakes (own process) answering after 100 ms; starts read from the fakes' log."""
    points_csv = os.path.join(workdir, "rate_points.csv")
    write_points(points_csv, samples, seed=2)
    proc, fake_env = start_fakes("--latency", "0.1", "--prewarm", points_csv)
    try:
        async with TempDatabase(prefix="tilesmith_bench", migrate=True) as url:
            settings = load_settings({
                **fake_env, "DATABASE_URL": url, "HARVESTER_POINTS": points_csv, "HARVESTER_ZOOMS": "17,18",
                "HARVESTER_TILE_PROVIDER": "xyz", "HARVESTER_TILE_RATE": str(limit),
                "HARVESTER_TILE_CONCURRENCY": "8", "HARVESTER_OVERPASS_RATE": "1000",
                "HARVESTER_OVERPASS_CONCURRENCY": "8"})
            await harvest(settings)
        stats_url = fake_env["FAKES_STATS_URL"].replace("/stats", "/requests?kind=xyz")
        async with aiohttp.ClientSession() as session, session.get(stats_url) as resp:
            starts = sorted(r["t"] for r in await resp.json())
    finally:
        proc.terminate()
        proc.wait(10)
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
    parser.add_argument("--tile-files", default=KAMPALA, help="folder of real OAM-{x}-{y}-{z}.png tiles")
    parser.add_argument("--processes", type=int, default=2, help="harvester run processes of the real-tile run's "
                        "multi-process figure (0: leave it out)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        e2e = asyncio.run(end_to_end(args.samples, args.concurrency, workdir))
        print(f"end to end: {e2e['samples']} samples in {e2e['seconds']:.1f} s = {e2e['samples_per_s']:.0f} samples/s"
              f" | baseline raw tile fetch {e2e['baseline_tiles_per_s']:.0f} tiles/s | ratio {e2e['ratio']:.2f}")
        print(f"  the same with the limits held in this process only (no shared budget): "
              f"{e2e['in_process_samples_per_s']:.0f} samples/s | shared / in-process {e2e['budget_ratio']:.2f}")
        if os.path.isdir(args.tile_files):
            real = asyncio.run(end_to_end(args.samples, args.concurrency, workdir, args.tile_files, args.processes))
            print(f"end to end, real tiles ({os.path.basename(os.path.normpath(args.tile_files))}): {real['samples']}"
                  f" samples in {real['seconds']:.1f} s = {real['samples_per_s']:.0f} samples/s | baseline raw tile"
                  f" fetch {real['baseline_tiles_per_s']:.0f} tiles/s | ratio {real['ratio']:.2f}"
                  f" | vs the rendered JPEGs {real['samples_per_s'] / e2e['samples_per_s']:.2f}")
            if args.processes:
                print(f"  the same as {real['processes']} harvester run processes on one database (shared budget):"
                      f" {real['processes_samples']} samples in {real['processes_seconds']:.1f} s ="
                      f" {real['processes_samples_per_s']:.0f} samples/s | vs one process"
                      f" {real['processes_samples_per_s'] / real['samples_per_s']:.2f}")
        else:
            print(f"end to end, real tiles: skipped ({args.tile_files} not found)")
        held = asyncio.run(rate_held(args.rate, args.rate_samples, workdir))
    print(f"tile rate with 100 ms latency: limit {held['limit']:g}/s, held {held['mean_rate']:.2f}/s"
          f" (ratio {held['held_ratio']:.3f}) over {held['requests']} requests;"
          f" max {held['max_in_any_1s_window']} in any 1 s window (ratio {held['peak_ratio']:.2f})")


if __name__ == "__main__":
    main()
