"""``harvester run``: sample (or read) the coordinates, queue one job per distinct tile, process the queue.

Exits 0 when nothing is pending or in progress. Re-running with the same settings finds the same points and tiles
and does no new work; a larger ``HARVESTER_SAMPLES`` adds only the difference. SIGINT/SIGTERM stop the claims; jobs in
flight finish within a grace period or are released back to the queue; a second signal releases them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import time

import asyncpg
import numpy as np

from . import db
from .config import Settings
from .labels import LabelSource, OverpassLabels
from .labels.extract import ExtractLabels, require_extract
from .labels.overpass import MAX_RESPONSE_BYTES, OverpassClient
from .http import bounded_upstream
from .limits import SharedBudget
from .providers import client_session, make_provider, tile_upstream
from .queue import counts, enqueue
from .worker import Worker

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 5.0


def sampler_points(settings: Settings) -> tuple[str, np.ndarray]:
    """``(sampler_key, points)``: the coordinates of this run and the key that recognises them in a later run."""
    from .sampling import PopulationSampler, read_points_csv

    if settings.points is not None:
        digest = hashlib.sha256(settings.points.read_bytes()).hexdigest()[:16]
        return f"points:{digest}", read_points_csv(settings.points)
    sampler = PopulationSampler(settings.region, str(settings.population_raster) if settings.population_raster
                                else None)
    return f"{sampler.key}|seed={settings.seed}", sampler.sample(settings.samples, settings.seed)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset on release: nothing beyond asyncpg's own (which rolls back a transaction left open). The default
    also sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` after every statement: one more round
    trip per statement for state the worker never creates (no advisory locks, cursors, LISTEN or SET here)."""


async def _create_pool(dsn: str, *, max_size: int) -> asyncpg.Pool:
    try:
        return await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, reset=_keep_session)
    except (OSError, asyncpg.PostgresError) as exc:
        raise db.DatabaseError(f"cannot connect to DATABASE_URL ({db.redact_url(dsn)}): {exc}") from exc


def overpass_client(settings: Settings, budget: SharedBudget | None = None) -> OverpassClient:
    upstream = bounded_upstream("overpass", settings.overpass_url, rate=settings.overpass_rate,
                                concurrency=settings.overpass_concurrency, timeout=settings.request_timeout,
                                max_bytes=MAX_RESPONSE_BYTES, budget=budget)
    return OverpassClient(upstream, settings.overpass_url, query_timeout=settings.overpass_query_timeout)


async def harvest(settings: Settings, stop: asyncio.Event | None = None, *, overpass: OverpassClient | None = None,
                  grace_s: float | None = None, shared_budget: bool = True) -> dict[str, object]:
    """Run the whole harvest; return the final job counts. ``shared_budget=False`` (benchmarks only) holds the
    limits in this process alone, as before the shared budget."""
    stop = stop or asyncio.Event()
    sampler_key, points = await asyncio.to_thread(sampler_points, settings)
    # Connections are held only for single statements: a few dozen serve any concurrency without crowding the
    # server's max_connections when several workers share it.
    pool = await _create_pool(settings.database_url,
                              max_size=min(32, settings.tile_concurrency + 2 * settings.overpass_concurrency + 4))
    try:
        async with pool.acquire() as conn:
            if settings.labels == "extract":
                await require_extract(conn)  # nothing imported: stop before anything is queued
            added = await enqueue(conn, sampler_key=sampler_key, points=points, zooms=settings.zooms,
                                  provider=settings.tile_provider)
        log.info("queued %d new jobs for %d coordinates at zooms %s", added, len(points),
                 ",".join(map(str, settings.zooms)))
        budget_context = SharedBudget(pool, settings.database_url) if shared_budget else contextlib.nullcontext()
        async with client_session(settings) as session, budget_context as budget:
            labels: LabelSource = ExtractLabels(pool) if settings.labels == "extract" else \
                OverpassLabels(overpass or overpass_client(settings, budget), session)
            worker = Worker(settings, pool, session, make_provider(settings, tile_upstream(settings, budget)), labels)
            reporter = asyncio.create_task(_report(pool, worker))
            work = asyncio.create_task(worker.run(stop))
            stopped = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not work.done():
                    grace = settings.request_timeout + 5 if grace_s is None else grace_s
                    log.info("stopping: finishing the jobs in flight (up to %.0f s)", grace)
                    done, _ = await asyncio.wait({work}, timeout=grace)
                    if not done:
                        work.cancel()
                try:
                    await work
                except asyncio.CancelledError:
                    if not stop.is_set():
                        raise
                    log.info("stopped: unfinished jobs were released to the queue")
            finally:
                stopped.cancel()
                reporter.cancel()
        async with pool.acquire() as conn:
            return await counts(conn)
    finally:
        await pool.close()


async def _report(pool, worker: Worker) -> None:
    """A progress line every few seconds: states, samples/s of this process, ETA."""
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL_S)
        async with pool.acquire() as conn:
            c = await counts(conn)
        elapsed = time.monotonic() - worker.progress.started
        rate = worker.progress.stored / elapsed if elapsed > 0 else 0.0
        open_jobs = c["pending"] + c["in_progress"]
        eta = f"{open_jobs / rate:.0f} s" if rate > 0 else "unknown"
        log.info("progress: done=%d pending=%d in_progress=%d failed=%d skipped=%d | %.1f samples/s | ETA %s",
                 c["done"], c["pending"], c["in_progress"], c["failed"], c["skipped"], rate, eta)


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    hits = {"n": 0}

    def on_signal(signum: int) -> None:
        hits["n"] += 1
        log.warning("received %s: no new jobs will be taken", signal.Signals(signum).name)
        stop.set()
        if hits["n"] > 1:
            for task in asyncio.all_tasks(loop):
                if task.get_name().startswith("slot-"):
                    task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
