"""The shared budget's own cost: ``python -m bench.bench_budget [--requests 2000] [--slots 8] [--processes 4]``.

Requests here send nothing: each of ``2 x --slots`` tasks per process takes a slot, "sends" (no I/O) and frees it, as
fast as the limiter lets it (rate 1,000,000/s, so only the limiter's own work counts; twice as many tasks as slots,
as in a harvest, so finished requests hand their slot over to waiting ones). Prints, in one run, on one temporary database:

1. the in-process limiter (:class:`LocalLimiter`, today's per-process behaviour): microseconds per request;
2. the shared limiter, one process: statements per request, milliseconds per request (wall / requests), the time one
   request spends in acquire + release, and the ratio to (1);
3. the same with ``--processes`` processes on one budget (the rate row and the slots contended);
4. the slot + rate statement as one statement (what the limiter sends) against the same work as two statements
   (take a slot; book a start): the cost of a slot-and-start of each, which answers "can slot + rate be one
   statement" in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time

import asyncpg

from harvester.limits import _ACQUIRE, _RELEASE, LocalLimiter, SharedBudget, SharedLimiter
from tests.databases import TempDatabase

RATE = 1_000_000.0
KEY = "bench:budget"

# The same work as _ACQUIRE in two statements: a slot, then a start.
_SLOT_ONLY = """
UPDATE upstream_slots s SET holder = $3, expires_at = clock_timestamp() + interval '60 s'
WHERE (s.upstream, s.slot) = (SELECT upstream, slot FROM upstream_slots
                              WHERE upstream = $1 AND slot < $2 AND expires_at < clock_timestamp()
                              ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING s.slot
"""
_RATE_ONLY = """
UPDATE upstream_budget SET tat = greatest(tat, clock_timestamp()) + make_interval(secs => $2)
WHERE upstream = $1 AND tat <= clock_timestamp() + make_interval(secs => $3)
RETURNING extract(epoch FROM tat)::float8 - $2 AS start, extract(epoch FROM clock_timestamp())::float8 AS now
"""


async def drive(limiter, requests: int, tasks: int) -> tuple[float, float]:
    """``(wall s, mean s in acquire + release per request)`` for ``requests`` over ``tasks`` tasks."""
    left, spent = [requests], [0.0]

    async def task():
        while left[0] > 0:
            left[0] -= 1
            t = time.perf_counter()
            permit = await limiter.acquire()
            await limiter.release(permit)
            spent[0] += time.perf_counter() - t

    start = time.perf_counter()
    await asyncio.gather(*(task() for _ in range(tasks)))
    return time.perf_counter() - start, spent[0] / requests


async def local(requests: int, slots: int) -> dict:
    wall, each = await drive(LocalLimiter("bench", rate=RATE, concurrency=slots), requests, 2 * slots)
    return {"ms_per_request": wall / requests * 1e3, "ms_in_limiter": each * 1e3}


async def shared(url: str, requests: int, slots: int) -> dict:
    pool = await asyncpg.create_pool(url, min_size=slots, max_size=slots + 2)
    try:
        async with SharedBudget(pool, url) as budget:
            limiter = SharedLimiter(budget, KEY, rate=RATE, concurrency=slots, lease_s=60)
            budget._limiters[KEY] = limiter
            await drive(limiter, 2 * slots, 2 * slots)  # rows created, statements prepared
            before = limiter.statements
            wall, each = await drive(limiter, requests, 2 * slots)
            return {"ms_per_request": wall / requests * 1e3, "ms_in_limiter": each * 1e3,
                    "statements_per_request": (limiter.statements - before) / requests}
    finally:
        await pool.close()


def _process(url: str, requests: int, slots: int, queue) -> None:
    queue.put(asyncio.run(shared(url, requests, slots)))


def many(url: str, processes: int, requests: int, slots: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_process, args=(url, requests, slots, queue)) for _ in range(processes)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    wall = time.perf_counter() - start  # includes the processes' start-up: an upper bound
    return {"requests_per_s_upper_bound_wall": processes * requests / wall,
            "ms_in_limiter": sum(r["ms_in_limiter"] for r in results) / processes,
            "statements_per_request": sum(r["statements_per_request"] for r in results) / processes}


async def statements(url: str, n: int, concurrency: int) -> dict:
    """One slot-and-start as the limiter's one statement, and as two, each followed by the release; ms each."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("INSERT INTO upstream_budget (upstream) VALUES ($1) ON CONFLICT DO NOTHING", KEY)
        out = {}
        for name in ("one statement", "two statements", "one statement"):  # again: the first warms the cache
            start = time.perf_counter()
            for i in range(n):
                holder = f"bench:{i}"
                if name == "one statement":
                    row = await conn.fetchrow(_ACQUIRE, KEY, concurrency, 1 / RATE, 1.0, holder, 60.0, 2.0)
                else:
                    row = await conn.fetchrow(_SLOT_ONLY, KEY, concurrency, holder)
                    await conn.fetchrow(_RATE_ONLY, KEY, 1 / RATE, 1.0)
                await conn.execute(_RELEASE, KEY, row["slot"], holder)
            out[name] = (time.perf_counter() - start) / n * 1e3
        return out
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per process")
    parser.add_argument("--slots", type=int, default=8, help="concurrency (tasks: twice as many) per process")
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with TempDatabase(prefix="tilesmith_bench", migrate=True) as url:
        base = asyncio.run(local(args.requests, args.slots))
        one = asyncio.run(shared(url, args.requests, args.slots))
        several = many(url, args.processes, args.requests, args.slots)
        stmt = asyncio.run(statements(url, args.requests // 2, args.slots))
    print(f"in-process limiter: {base['ms_per_request'] * 1e3:.1f} us per request "
          f"({base['ms_in_limiter'] * 1e3:.1f} us in acquire + release)")
    print(f"shared budget, 1 process x {args.slots} slots: {one['statements_per_request']:.2f} statements and "
          f"{one['ms_per_request']:.2f} ms per request (wall / requests; {1e3 / one['ms_per_request']:.0f} requests/s"
          f" at most), {one['ms_in_limiter']:.2f} ms in acquire + release | ratio to in-process "
          f"{one['ms_per_request'] / base['ms_per_request']:.0f}x")
    print(f"shared budget, {args.processes} processes x {args.slots} slots: {several['statements_per_request']:.2f}"
          f" statements per request, {several['ms_in_limiter']:.2f} ms in acquire + release, "
          f">= {several['requests_per_s_upper_bound_wall']:.0f} requests/s over all")
    print(f"slot + start + release: as one statement {stmt['one statement']:.3f} ms, as two statements "
          f"{stmt['two statements']:.3f} ms (ratio {stmt['two statements'] / stmt['one statement']:.2f})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
