"""Throughput of the fakes run as their own process: ``python -m tests.fakes.bench [--requests 2000]``.

Starts ``python -m tests.fakes`` (zero latency, many Overpass slots), then requests, CONCURRENCY at a time: distinct
zoom-18 tiles at random places in France (new cells rendered and encoded), the same tiles again (cached), Overpass
queries for distinct zoom-17 tiles, and whole samples (a query, then the zoom-17 and zoom-18 tiles of one place) at new
places and at places given to ``--prewarm``. Prints, for each, requests per second and the fake process's CPU time
per request: on a shared, loaded machine the second tells its capacity (1000 / ms per core).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time

import aiohttp

from .osm import tile_bounds
from .process import start_fakes_process
from .world import tile_for

USER_AGENT = "tilesmith-fakes-bench/0.1 (+https://github.com/tilesmith/tilesmith)"
CONCURRENCY = 16
QUERY = (
    '[out:json][timeout:25][maxsize:100000000];(way["building"]["building"!="no"]({b});'
    'relation["type"="multipolygon"]["building"]["building"!="no"]({b}););out geom;'
)


async def _drive(urls: list, send) -> float:
    queue = list(reversed(urls))

    async def worker(session):
        while queue:
            await send(session, queue.pop())

    start = time.perf_counter()
    async with aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
    return len(urls) / (time.perf_counter() - start)


async def _get(session, url) -> None:
    async with session.get(url) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(pid: int, items: list, send) -> tuple[float, float]:
    """(requests per second, server CPU milliseconds per request)."""
    before = _cpu_s(pid)
    rate = asyncio.run(_drive(items, send))
    return rate, (_cpu_s(pid) - before) * 1000 / len(items)


def run(count: int, seed: int) -> dict[str, tuple[float, float]]:
    rng = random.Random(seed)
    places = [(rng.uniform(-1.0, 7.0), rng.uniform(43.5, 49.5)) for _ in range(count)]
    prewarmed = [(lon + 1.0, lat) for lon, lat in places[: count // 2]]
    with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as points:
        points.write("lon,lat\n" + "".join(f"{lon},{lat}\n" for lon, lat in prewarmed))
    process, env = start_fakes_process("--seed", str(seed), "--knob", "overpass:slots=64", "--prewarm", points.name)
    try:
        tiles = [
            env["HARVESTER_TILE_URL"].format(z=18, x=x, y=y) for x, y in (tile_for(lon, lat, 18) for lon, lat in places)
        ]
        cold = _measure(process.pid, tiles, _get)
        warm = _measure(process.pid, tiles, _get)
        queries = []
        for lon, lat in places[: count // 2]:
            west, south, east, north = tile_bounds(17, *tile_for(lon + 0.5, lat, 17))  # cells not yet generated
            queries.append(QUERY.format(b=f"{south},{west},{north},{east}"))

        async def post(session, query):
            async with session.post(env["HARVESTER_OVERPASS_URL"], data={"data": query}) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"overpass: HTTP {response.status}")

        overpass = _measure(process.pid, queries, post)

        async def sample(session, place):  # what a harvester does per coordinate: Overpass, then zooms 17 and 18
            lon, lat = place
            x, y = tile_for(lon, lat, 17)
            west, south, east, north = tile_bounds(17, x, y)
            await post(session, QUERY.format(b=f"{south},{west},{north},{east}"))
            await _get(session, env["HARVESTER_TILE_URL"].format(z=17, x=x, y=y))
            x, y = tile_for(lon, lat, 18)
            await _get(session, env["HARVESTER_TILE_URL"].format(z=18, x=x, y=y))

        fresh = [(lon - 0.5, lat) for lon, lat in places[: count // 2]]
        return {
            "tiles (new places)": cold,
            "tiles (cached)": warm,
            "overpass queries (new places)": overpass,
            "samples: overpass + z17 + z18 tiles (new places)": _measure(process.pid, fresh, sample),
            "samples: overpass + z17 + z18 tiles (--prewarm places)": _measure(process.pid, prewarmed, sample),
        }
    finally:
        process.terminate()
        process.wait(10)
        os.unlink(points.name)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.bench")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, (rate, cpu_ms) in run(args.requests, args.seed).items():
        print(f"{name}: {rate:.0f}/s, server CPU {cpu_ms:.2f} ms each ({1000 / max(cpu_ms, 1e-6):.0f}/s per core)")


if __name__ == "__main__":
    main()
