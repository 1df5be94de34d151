"""The shared budget (harvester/limits.py) against a real PostgreSQL: several budgets on one database stand for
several ``harvester run`` processes (each its own pool and listening connection). Every check reads the database's
clock (the start each booking returned, the leases), never a sleep of the test's."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

from harvester.limits import HANDOVERS, SharedBudget, SharedLimiter
from tests.fakes.faults import max_in_window

#: Measures time (rates, timeouts, windows): scripts/test.sh runs it alone, after the parallel part.
pytestmark = pytest.mark.timing

KEY = "tiles:example.org"


@contextlib.asynccontextmanager
async def processes(url: str, n: int):
    """``n`` budgets on one database, as ``n`` processes would hold them."""
    async with contextlib.AsyncExitStack() as stack:
        budgets = []
        for i in range(n):
            pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
            stack.push_async_callback(pool.close)
            budgets.append(await stack.enter_async_context(SharedBudget(pool, url, holder=f"test:{i}")))
        yield budgets


def limiter(budget: SharedBudget, *, rate: float, concurrency: int, lease_s: float = 30.0) -> SharedLimiter:
    made = SharedLimiter(budget, KEY, rate=rate, concurrency=concurrency, lease_s=lease_s)
    budget._limiters[KEY] = made
    return made


async def slots(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch("SELECT slot, holder, expires_at, expires_at > clock_timestamp() AS held"
                                " FROM upstream_slots WHERE upstream = $1 ORDER BY slot", KEY)
    finally:
        await conn.close()


def test_starts_booked_by_four_processes_keep_the_rate(migrated_database_url):
    """Four processes, four tasks each, 80 requests: consecutive starts (database clock) are one spacing apart or
    more, so no one-second window holds more than the rate."""
    rate = 40

    async def go():
        async with processes(migrated_database_url, 4) as budgets:
            limiters = [limiter(b, rate=rate, concurrency=8) for b in budgets]
            starts = []

            async def task(lim: SharedLimiter):
                for _ in range(5):
                    async with lim.slot() as permit:
                        starts.append(permit.start)

            await asyncio.gather(*(task(lim) for lim in limiters for _ in range(4)))
            return starts, limiters[0].interval

    starts, interval = asyncio.run(go())
    starts.sort()
    assert len(starts) == 80
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= interval - 1e-6, min(gaps)
    assert max_in_window(starts, 1.0) <= rate


def test_in_flight_over_four_processes_never_exceeds_the_concurrency(migrated_database_url):
    """Six tasks per process for three slots in all: every process gets slots, never more than three in flight."""
    async def go():
        async with processes(migrated_database_url, 4) as budgets:
            limiters = [limiter(b, rate=10_000, concurrency=3) for b in budgets]
            in_flight, seen, holders = 0, [], set()

            async def task(lim: SharedLimiter):
                nonlocal in_flight
                for _ in range(4):
                    async with lim.slot() as permit:
                        in_flight += 1
                        seen.append(in_flight)
                        holders.add(permit.holder.split(":")[1])
                        await asyncio.sleep(0.02)
                        in_flight -= 1

            await asyncio.gather(*(task(lim) for lim in limiters for _ in range(6)))
            return seen, holders

    seen, holders = asyncio.run(go())
    assert len(seen) == 96
    assert max(seen) == 3  # never above, and the budget was used
    assert holders == {"0", "1", "2", "3"}  # every process got slots
    rows = asyncio.run(slots(migrated_database_url))
    assert [r["slot"] for r in rows] == [0, 1, 2] and not any(r["held"] for r in rows)  # all freed at the end


def test_a_finished_request_hands_its_slot_to_a_waiting_one_of_its_process(migrated_database_url):
    """More tasks than slots in one process: a request that ends passes its slot to a waiting task in one statement
    (instead of freeing it and taking it again), at most HANDOVERS times in a row; the concurrency still holds."""
    async def go():
        async with processes(migrated_database_url, 1) as (budget,):
            lim = limiter(budget, rate=10_000, concurrency=2)
            in_flight, seen, handovers = 0, [], []

            async def task():
                nonlocal in_flight
                for _ in range(5):
                    async with lim.slot() as permit:
                        in_flight += 1
                        seen.append(in_flight)
                        handovers.append(permit.handovers)
                        await asyncio.sleep(0.005)
                        in_flight -= 1

            await asyncio.gather(*(task() for _ in range(6)))
            return seen, handovers, lim.statements

    seen, handovers, statements = asyncio.run(go())
    assert len(seen) == 30 and max(seen) == 2
    assert max(handovers) == HANDOVERS and handovers.count(0) >= 30 // (HANDOVERS + 1)
    assert statements < 2 * 30
    rows = asyncio.run(slots(migrated_database_url))
    assert not any(r["held"] for r in rows)


def test_slot_of_a_killed_process_comes_back_when_its_lease_expires(migrated_database_url):
    """A process dies holding the only slot (its connections cut, nothing freed): another gets the slot, and its
    start is after the dead one's lease."""
    async def go():
        async with processes(migrated_database_url, 1) as (survivor,):
            pool = await asyncpg.create_pool(migrated_database_url, min_size=1, max_size=2)
            doomed = SharedBudget(pool, migrated_database_url, holder="doomed")
            held = await limiter(doomed, rate=100, concurrency=1, lease_s=1.5).acquire()
            pool.terminate()  # kill -9: no release
            lease = (await slots(migrated_database_url))[0]["expires_at"]
            permit = await limiter(survivor, rate=100, concurrency=1).acquire()
            return held, lease.timestamp(), permit

    held, lease_end, permit = asyncio.run(go())
    assert held.slot == permit.slot == 0
    assert lease_end == pytest.approx(held.start + 0.01 + 1.5, abs=0.01)  # lease: start + spacing + lease_s
    assert permit.start >= lease_end


def test_pause_holds_the_starts_of_every_process_even_those_already_booked(migrated_database_url):
    """Process B has one request going now and one booked a second ahead; process A is told 429 and pauses: B's
    booked request is given back and starts after the pause, as does every later one."""
    async def go():
        async with processes(migrated_database_url, 2) as (a, b):
            lim_a, lim_b = limiter(a, rate=1, concurrency=2), limiter(b, rate=1, concurrency=2)
            first = await lim_b.acquire()
            second = asyncio.create_task(lim_b.acquire())
            while sum(r["held"] for r in await slots(migrated_database_url)) < 2:  # booked, now sleeping
                await asyncio.sleep(0.01)
            booked = (await slots(migrated_database_url))[1]["expires_at"].timestamp() - 30.0 - lim_b.interval
            await lim_a.pause(0.5)
            until = lim_a._pause_end
            permit = await second
            await lim_b.release(first)
            await lim_b.release(permit)
            later = await lim_a.acquire()
            await lim_a.release(later)
            return first, booked, until, permit, later

    first, booked, until, permit, later = asyncio.run(go())
    assert first.start < booked < until  # the second start was booked inside what became the pause...
    assert permit.start >= until and later.start >= until  # ...and went out after it, like every later one
    assert permit.start > first.start + 1.0


def test_a_lost_listener_reconnects_and_hears_pauses_again(migrated_database_url):
    """Process B's listening connection dies (as in a PostgreSQL restart): B connects again and still hears the
    pause that process A announces afterwards, through the new connection."""
    async def go():
        async with processes(migrated_database_url, 2) as (a, b):
            lim_a, lim_b = limiter(a, rate=10, concurrency=2), limiter(b, rate=10, concurrency=2)
            lost = b._listener
            admin = await asyncpg.connect(migrated_database_url)
            try:
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", lost.get_server_pid())
            finally:
                await admin.close()
            for _ in range(200):  # it tries again after POLL_S
                if b._listener is not None and b._listener is not lost:
                    break
                await asyncio.sleep(0.05)
            relistened = b._listener is not None and b._listener is not lost and lost.is_closed()
            await lim_a.pause(5.0)
            for _ in range(100):
                if lim_b._pause_end >= lim_a._pause_end:
                    break
                await asyncio.sleep(0.02)
            return relistened, lim_a._pause_end, lim_b._pause_end

    relistened, until_a, until_b = asyncio.run(go())
    assert relistened
    assert until_b == until_a  # B heard A's pause (B books nothing: only the notification tells it)


def test_cancelled_waiters_leave_no_slot_held(migrated_database_url):
    async def go():
        async with processes(migrated_database_url, 2) as (a, b):
            lim_a, lim_b = limiter(a, rate=1000, concurrency=1), limiter(b, rate=1000, concurrency=1)
            held = await lim_a.acquire()
            waiting = [asyncio.create_task(lim_b.acquire()) for _ in range(3)]
            await asyncio.sleep(0.1)
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            await lim_a.release(held)
            async with lim_b.slot() as permit:
                assert permit.slot == 0
        return await slots(migrated_database_url)

    rows = asyncio.run(go())
    assert len(rows) == 1 and rows[0]["holder"] is None and not rows[0]["held"]
