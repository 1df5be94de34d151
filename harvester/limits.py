"""Request budgets per upstream, behind one interface (:class:`Limiter`): at most ``concurrency`` requests in flight,
request starts spaced so that at most ``rate`` start in any one-second window, and pauses (after a 429) that hold
every request until they end.

- :class:`LocalLimiter` holds them in this process (a semaphore, an ``aiolimiter`` spacing, a monotonic pause
  deadline): for code paths without a database, such as ``trainer predict`` fetching one tile.
- :class:`SharedLimiter`, made by a :class:`SharedBudget`, holds them in PostgreSQL (migration 0004) for every
  ``harvester run`` on one database, on any machine:

  * rate: GCRA, one row per upstream. One statement books a start: ``tat = greatest(tat, clock_timestamp()) +
    spacing``, returning the start and the database clock; the process sleeps until the start, converted with the
    offset measured in that same statement (the database clock is the only clock). A start further ahead than
    ``book_ahead`` (after a pause) is not booked: the process sleeps and asks again.
  * concurrency: slot rows leased until the start + the request timeout + a margin; the same statement takes a free
    slot and books the start, or does neither (so a process waiting through a pause holds no slot). A request frees
    its slot when it ends; the slot of a killed process comes back when its lease expires.
  * pauses: a 429 moves ``tat`` to the pause's end, so every later booking waits; a NOTIFY tells every process at
    once, and a start booked before the pause that falls inside it is given back and booked again.
  * clocks: each statement returns ``clock_timestamp()``; the offset to the event loop's clock is the largest of
    the last few measured (each is late by the reply's trip), and a task that waited for its start and wakes more than
    ``LATE_S`` after it (a loaded machine) gives the start back and books another rather than send late.
  * waiting for a slot: one task per process asks the database at a time, woken by a NOTIFY when any process frees
    a slot (sent only while some worker found every slot held), or when the earliest lease expires, and at least
    every ``POLL_S``. A request that ends while another task
    of its process waits for a slot hands its slot over: one statement renews the lease for the waiting task and
    books its start (at most ``HANDOVERS`` times in a row, so other processes get their turn).

Processes with different settings share one budget: each booking moves ``tat`` on by the booker's own spacing (a
process with a higher rate uses more of it), and a process uses slots ``0 .. concurrency-1`` only, so the total in
flight never exceeds the largest concurrency among the running processes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
from aiolimiter import AsyncLimiter

from .db import DatabaseError

log = logging.getLogger(__name__)

#: Margin over 1/rate between two starts: at most ``rate`` arrive in any second even if each is delayed
#: differently on its way by up to 40 ms (see harvester/http.py, ``SendWindow``).
SPACING_MARGIN = 1.04
#: How far ahead of the database clock a start may be booked (at least one spacing).
BOOK_AHEAD_S = 1.0
#: A slot's lease: its start + the request timeout + this (the send window's wait, the end of the response).
LEASE_MARGIN_S = 3.0
#: The longest a task waiting for a slot goes without asking again (a missed notification, a lost listener).
POLL_S = 1.0
#: A request that waited for its start (the budget is saturated: the next start is booked right after it) and wakes
#: this late gives it back and books again (up to MAX_LATE times in a row): sent late, it would bunch with the next
#: start (the 4 % spacing margin absorbs 40 ms in all). A start not waited for follows an idle moment of the budget.
LATE_S = 0.015
MAX_LATE = 3
#: Offsets (database clock - loop clock) kept: the largest is the one read with the least delay.
OFFSETS_KEPT = 32
#: A slot passes from a finished request straight to a waiting one of the same process (one statement instead of
#: two) at most this many times in a row; then it is freed for every process.
HANDOVERS = 4
CHANNEL = "tilesmith_budget"


def spacing(rate: float) -> tuple[int, float]:
    """``(count, window)``: at most ``count`` starts in any ``window`` s for ``rate`` per second over any 1 s, with
    the margin. Whole requests: 2.5/s allows 2 in any 1 s; below 1/s, one per ``1/rate`` s."""
    count = max(1, math.floor(rate + 1e-9))
    return count, max(1.0, count / rate) * SPACING_MARGIN


class Limiter:
    """The interface: ``async with limiter.slot(): send one request``; ``await limiter.pause(s)`` after a 429."""

    async def acquire(self) -> object:
        """Wait for a free slot, a start time and the end of any pause; return the permit to release."""
        raise NotImplementedError

    async def release(self, permit: object) -> None:
        raise NotImplementedError

    async def pause(self, seconds: float) -> None:
        """Hold every request not yet sent for ``seconds`` (extends, never shortens, a pause in force)."""
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def slot(self):
        permit = await self.acquire()
        try:
            yield permit
        finally:
            await self.release(permit)


class LocalLimiter(Limiter):
    """This process only: requests spaced ``1/rate`` apart (a leaky bucket of capacity 1: no burst), at most
    ``concurrency`` in flight, pauses on the monotonic clock."""

    def __init__(self, name: str, *, rate: float, concurrency: int):
        self.name = name
        self._spacing = AsyncLimiter(1, 1 / rate)
        self._slots = asyncio.Semaphore(concurrency)
        self._paused_until = 0.0

    async def acquire(self) -> None:
        await self._slots.acquire()
        try:
            await self._spacing.acquire()
            while (delay := self._paused_until - time.monotonic()) > 0:
                await asyncio.sleep(delay)
        except BaseException:
            self._slots.release()
            raise

    async def release(self, permit: object) -> None:
        self._slots.release()

    async def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)
        log.warning("%s: pausing requests for %g s", self.name, seconds)


# -- shared ----------------------------------------------------------------------------------------------------------

_SETUP = """
INSERT INTO upstream_budget (upstream) VALUES ($1) ON CONFLICT DO NOTHING
"""
_SETUP_SLOTS = """
INSERT INTO upstream_slots (upstream, slot) SELECT $1, s FROM generate_series(0, $2 - 1) s ON CONFLICT DO NOTHING
"""
# One statement: a free slot and a start within book_ahead, both or neither. Locks are taken in one order by every
# statement, the rate row first, then slot rows (a slot row that fails its recheck may stay locked to the statement's
# end: taken after the rate row, it cannot close a cycle with a handover, which holds the rate row and waits for its
# own slot). SKIP LOCKED passes over a slot another process is taking; the rate row's lock serializes the bookings
# of all processes, and each sees the tat of the one before.
# $1 upstream, $2 concurrency, $3 spacing s, $4 book_ahead s, $5 holder, $6 lease after the start s, $7 how long a
# worker that found no free slot wants to hear of freed ones (NOTIFY costs every listener a message: only then).
_ACQUIRE = """
WITH budget AS (
    SELECT FROM upstream_budget WHERE upstream = $1 FOR UPDATE
), free AS (
    SELECT slot FROM upstream_slots
    WHERE upstream = $1 AND slot < $2 AND expires_at < clock_timestamp() AND EXISTS (SELECT FROM budget)
    ORDER BY slot LIMIT 1
    FOR UPDATE SKIP LOCKED
), booked AS (
    UPDATE upstream_budget SET tat = greatest(tat, clock_timestamp()) + make_interval(secs => $3)
    WHERE upstream = $1 AND EXISTS (SELECT FROM free) AND tat <= clock_timestamp() + make_interval(secs => $4)
    RETURNING tat
), taken AS (
    UPDATE upstream_slots s SET holder = $5, expires_at = (SELECT tat FROM booked) + make_interval(secs => $6)
    FROM free
    WHERE s.upstream = $1 AND s.slot = free.slot AND EXISTS (SELECT FROM booked)
    RETURNING s.slot
), wanted AS (
    UPDATE upstream_budget SET wanted_until = clock_timestamp() + make_interval(secs => $7)
    WHERE upstream = $1 AND NOT EXISTS (SELECT FROM free)
    RETURNING 1
)
SELECT (SELECT slot FROM taken) AS slot,
       extract(epoch FROM (SELECT tat FROM booked))::float8 - $3 AS start,
       EXISTS (SELECT FROM free) AS slot_free,
       EXISTS (SELECT FROM wanted) AS wanted,
       (SELECT extract(epoch FROM tat)::float8 FROM upstream_budget WHERE upstream = $1) AS tat,
       (SELECT extract(epoch FROM min(expires_at))::float8 FROM upstream_slots
        WHERE upstream = $1 AND slot < $2 AND expires_at > '-infinity') AS next_expiry,
       extract(epoch FROM clock_timestamp())::float8 AS now
"""
_RELEASE = """
WITH freed AS (
    UPDATE upstream_slots SET holder = NULL, expires_at = '-infinity'
    WHERE upstream = $1 AND slot = $2 AND holder = $3
    RETURNING 1
)
SELECT pg_notify('""" + CHANNEL + """', 'free ' || $1) FROM freed
WHERE EXISTS (SELECT FROM upstream_budget WHERE upstream = $1 AND wanted_until > clock_timestamp())
"""
# A slot handed from the request that held it ($7) to a waiting one ($5) of the same process, with a new start; or, if
# the start would be too far ahead (a pause) or the slot was lost, freed (a NOTIFY) or left alone.
_HANDOVER = """
WITH booked AS (
    UPDATE upstream_budget SET tat = greatest(tat, clock_timestamp()) + make_interval(secs => $3)
    WHERE upstream = $1 AND tat <= clock_timestamp() + make_interval(secs => $4)
      AND EXISTS (SELECT FROM upstream_slots WHERE upstream = $1 AND slot = $2 AND holder = $7)
    RETURNING tat
), taken AS (
    UPDATE upstream_slots SET holder = $5, expires_at = (SELECT tat FROM booked) + make_interval(secs => $6)
    WHERE upstream = $1 AND slot = $2 AND holder = $7 AND EXISTS (SELECT FROM booked)
    RETURNING slot
), freed AS (
    UPDATE upstream_slots SET holder = NULL, expires_at = '-infinity'
    WHERE upstream = $1 AND slot = $2 AND holder = $7 AND NOT EXISTS (SELECT FROM booked)
    RETURNING slot
)
SELECT (SELECT slot FROM taken) AS slot,
       extract(epoch FROM (SELECT tat FROM booked))::float8 - $3 AS start,
       (SELECT pg_notify('""" + CHANNEL + """', 'free ' || $1) FROM freed
        WHERE EXISTS (SELECT FROM upstream_budget WHERE upstream = $1 AND wanted_until > clock_timestamp())) AS notified,
       extract(epoch FROM clock_timestamp())::float8 AS now
"""
_PAUSE = """
WITH paused AS (
    UPDATE upstream_budget SET tat = greatest(tat, clock_timestamp() + make_interval(secs => $2))
    WHERE upstream = $1
    RETURNING extract(epoch FROM tat)::float8 AS until
)
SELECT until, pg_notify('""" + CHANNEL + """', 'pause ' || $1 || ' ' || until::text) FROM paused
"""


@dataclass(frozen=True)
class Permit:
    slot: int
    holder: str
    start: float  # database clock, epoch seconds
    handovers: int = 0  # times this slot went straight from one request to the next


class SharedBudget:
    """This process's view of the budgets in the database: a connection pool for the statements, and one listening
    connection that hears every process's pauses and freed slots (without it, waits fall back to polling)."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, holder: str | None = None):
        self.pool, self.dsn = pool, dsn
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._limiters: dict[str, SharedLimiter] = {}
        self._listener: asyncpg.Connection | None = None
        self._relisten: asyncio.Task | None = None
        self._closing = False
        self._offsets: collections.deque[float] = collections.deque(maxlen=OFFSETS_KEPT)

    def offset(self, db_now: float) -> float:
        """Database clock - loop clock, from a ``clock_timestamp()`` just read: every reading arrives late by its trip
        (and by any wait for the event loop), so the largest of the recent ones is the closest."""
        self._offsets.append(db_now - asyncio.get_running_loop().time())
        return max(self._offsets)

    async def __aenter__(self) -> SharedBudget:
        async with self.pool.acquire() as conn:
            if await conn.fetchval("SELECT to_regclass('upstream_slots') IS NULL"):
                raise DatabaseError("the database has no upstream budget tables (migration 0004): run "
                                    "`harvester migrate` first")
        if not await self._listen():
            self._relisten = asyncio.get_running_loop().create_task(self._listen_again())
        return self

    async def _listen(self) -> bool:
        """Open the connection that hears the other processes' pauses and freed slots; False (logged) when it
        cannot: waits then poll every ``POLL_S`` until it is back."""
        conn = None
        try:
            conn = await asyncpg.connect(self.dsn)
            await conn.add_listener(CHANNEL, self._notified)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("shared budget: cannot listen for other workers' pauses (%s); polling meanwhile", exc)
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=5)
            return False
        conn.add_termination_listener(self._listener_lost)
        self._listener = conn
        return True

    def _listener_lost(self, conn: asyncpg.Connection) -> None:
        """The listening connection closed under us (PostgreSQL restarted, the backend was terminated): listen
        again, polling meanwhile. Notifications sent in between are lost, so every waiter asks the database anew."""
        if self._closing or conn is not self._listener:
            return
        self._listener = None
        log.warning("shared budget: the connection that hears other workers' pauses was lost; reconnecting")
        self._relisten = asyncio.get_running_loop().create_task(self._listen_again())

    async def _listen_again(self) -> None:
        while not self._closing:
            await asyncio.sleep(POLL_S)
            if await self._listen():
                log.info("shared budget: listening for other workers' pauses again")
                for limiter in self._limiters.values():
                    limiter._wake.set()
                return

    async def __aexit__(self, *exc) -> None:
        self._closing = True
        if self._relisten is not None:
            self._relisten.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._relisten
        await self._close_listener()
        for key, limiter in self._limiters.items():
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await limiter.close()
            if limiter.permits:
                log.info("shared budget %s: %d requests, %d statements, %d late starts given back", key,
                         limiter.permits, limiter.statements, limiter.late)

    async def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=5)
            self._listener = None

    def limiter(self, name: str, url: str, *, rate: float, concurrency: int, timeout: float) -> SharedLimiter:
        """The budget of upstream ``name`` at ``url``'s host and port (two providers on different servers do not
        share one), for requests of at most ``timeout`` s."""
        key = f"{name}:{urlsplit(url).netloc or url}"
        limiter = SharedLimiter(self, key, rate=rate, concurrency=concurrency, lease_s=timeout + LEASE_MARGIN_S)
        self._limiters[key] = limiter
        return limiter

    def _notified(self, conn, pid: int, channel: str, payload: str) -> None:
        kind, _, rest = payload.partition(" ")
        key, _, until = rest.partition(" ")
        limiter = self._limiters.get(key)
        if limiter is None:
            return
        if kind == "pause":
            limiter.paused_until(float(until))
        limiter._wake.set()


class SharedLimiter(Limiter):
    """One upstream's budget in the database (see the module's docstring). ``statements`` counts what it sent."""

    def __init__(self, budget: SharedBudget, key: str, *, rate: float, concurrency: int, lease_s: float):
        self.budget, self.key = budget, key
        count, window = spacing(rate)
        self.interval = window / count
        self.book_ahead = max(BOOK_AHEAD_S, self.interval)
        self.concurrency, self.lease_s = concurrency, lease_s
        self.statements = 0
        self.late = 0  # starts given back because the task woke too late for them
        self.permits = 0
        self._local = asyncio.Semaphore(concurrency)  # never more permits asked for than the process may hold
        self._turn = asyncio.Lock()  # one task of this process asks the database for a slot at a time
        self._wake = asyncio.Event()
        self._pause_end = -math.inf  # database clock: the end of the latest pause heard of
        self._ready = False
        self._serial = itertools.count()
        self._wanting = 0  # tasks waiting for one of this process's `concurrency` permits
        self._batons: collections.deque[tuple[Permit, float]] = collections.deque()  # slots handed over, not taken

    async def _fetchrow(self, sql: str, *args) -> asyncpg.Record | None:
        async with self.budget.pool.acquire() as conn:
            if not self._ready:
                await conn.execute(_SETUP, self.key)
                await conn.execute(_SETUP_SLOTS, self.key, self.concurrency)
                self._ready = True
            self.statements += 1
            return await conn.fetchrow(sql, *args)

    def paused_until(self, until: float) -> None:
        self._pause_end = max(self._pause_end, until)

    async def acquire(self) -> Permit:
        loop = asyncio.get_running_loop()
        self._wanting += 1
        try:
            await self._local.acquire()
        finally:
            self._wanting -= 1
        try:
            late = 0
            while True:
                if self._batons:  # a slot handed over by a request that just ended
                    permit, offset = self._batons.popleft()
                else:
                    async with self._turn:
                        permit, offset = await self._book()
                delay = permit.start - offset - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self._pause_end > permit.start:
                    # A pause began after this start was booked and covers it: give it back, book again (after it).
                    await self._free(permit)
                elif delay > 0 and permit.start - offset - loop.time() < -LATE_S and late < MAX_LATE:
                    late += 1
                    self.late += 1
                    await self._free(permit)
                else:
                    self.permits += 1
                    return permit
        except BaseException:
            self._local.release()
            raise

    async def _book(self) -> tuple[Permit, float]:
        """A slot and a start (database clock), and the offset database clock - loop clock."""
        while True:
            self._wake.clear()
            holder = f"{self.budget.holder}:{next(self._serial)}"
            row = await self._fetchrow(_ACQUIRE, self.key, self.concurrency, self.interval, self.book_ahead, holder,
                                       self.lease_s, 2 * POLL_S)
            offset = self.budget.offset(row["now"])
            if row["slot"] is not None:
                return Permit(row["slot"], holder, row["start"]), offset
            if row["slot_free"]:  # the next start is further ahead than book_ahead (a pause): wait, then ask again
                await asyncio.sleep(max(0.0, row["tat"] - self.book_ahead - row["now"]))
                continue
            # Every slot is held: a notification or a local release wakes us, else the earliest lease's expiry.
            wait = POLL_S if row["next_expiry"] is None else min(POLL_S, max(0.0, row["next_expiry"] - row["now"]))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait + 0.001)

    async def _free(self, permit: Permit) -> None:
        task = asyncio.ensure_future(self._fetchrow(_RELEASE, self.key, permit.slot, permit.holder))
        try:
            await asyncio.shield(task)  # a cancelled request still frees its slot
        except asyncio.CancelledError:
            raise
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("%s: could not free slot %d (%s); it comes back when its lease expires", self.key,
                        permit.slot, exc)
        self._wake.set()

    async def _handover(self, permit: Permit) -> None:
        """Pass the slot to a waiting task of this process (as a baton), or free it."""
        holder = f"{self.budget.holder}:{next(self._serial)}"
        task = asyncio.ensure_future(self._fetchrow(_HANDOVER, self.key, permit.slot, self.interval, self.book_ahead,
                                                    holder, self.lease_s, permit.holder))

        def handed(done: asyncio.Future) -> None:  # runs even if the releasing task is cancelled meanwhile
            if not done.cancelled() and done.exception() is None and done.result()["slot"] is not None:
                row = done.result()
                self._batons.append((Permit(row["slot"], holder, row["start"], permit.handovers + 1),
                                     self.budget.offset(row["now"])))

        task.add_done_callback(handed)
        try:
            await asyncio.shield(task)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("%s: could not hand over slot %d (%s); it comes back when its lease expires", self.key,
                        permit.slot, exc)
        self._wake.set()

    async def release(self, permit: Permit) -> None:
        try:
            if self._wanting and permit.handovers < HANDOVERS:
                await self._handover(permit)
            else:
                await self._free(permit)
        finally:
            self._local.release()

    async def close(self) -> None:
        """Free the slots handed over that no task took (their tasks were cancelled)."""
        while self._batons:
            await self._free(self._batons.popleft()[0])

    async def pause(self, seconds: float) -> None:
        row = await self._fetchrow(_PAUSE, self.key, float(seconds))
        if row is not None:
            self.paused_until(row["until"])
        log.warning("%s: pausing every worker's requests for %g s", self.key, seconds)
