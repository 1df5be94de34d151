"""The harvest worker: claims one area at a time, fetches its buildings once, then every claimed tile of it, and
stores each sample (image, mask, statistics, state) in one statement.

Bounded by design: at most ``slots`` areas in flight per process; every upstream request passes its
:class:`~harvester.http.Upstream`. The CPU work of a JPEG sample (decode, rasterize, PNG: about 1 ms) runs inline on
the event loop: handing it to threads made the loop wait for the GIL on every socket call and halved throughput. A PNG
or WebP tile goes to a thread: its decode (1.5-3 ms for a real 100-150 kB RGBA PNG) releases the GIL (README,
"Performance", for what real tiles cost against the fakes' small JPEGs). A job's lease is renewed by a heartbeat
while its area is in flight, so jobs of a crashed worker return to the queue when their lease expires.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import numpy as np
import shapely

from .config import Settings
from .db import DatabaseError
from .errors import TileUnavailable, UpstreamError
from .imagery import sniff_format, validate_tile
from .labels import Footprint, LabelSource
from .providers import TileProvider
from .queue import ClaimedArea, ClaimedJob, claim_area, queries
from .rasterize import encode_instances_png, encode_mask_png, rasterize_instances
from .splits import split_for
from .store import load_buildings, store_buildings, store_sample
from .tiles import Tile, lonlat_bounds

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 600.0
MAX_DATABASE_OUTAGE_S = 60.0
DATABASE_RETRY_S = 2.0
#: The log line of a failed attempt (args: job id, tile z, x, y, attempt number, error); tests read it.
ATTEMPT_FAILED = "job %d tile %s/%s/%s attempt %d failed: %s"
#: What a lost or restarting database raises: retried by the worker for up to MAX_DATABASE_OUTAGE_S.
DATABASE_LOST = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError,
                 asyncpg.exceptions.OperatorInterventionError, ConnectionError, OSError)


@dataclass(frozen=True)
class Sample:
    image: bytes
    image_format: str
    mask_png: bytes
    instances_png: bytes
    building_pixels: int
    building_count: int
    bounds: tuple[float, float, float, float]


def build_sample(body: bytes, content_type: str, footprints: list[Footprint], tile: Tile) -> Sample:
    """Validate the tile and rasterize the footprints onto its grid (pure; runs in a worker thread)."""
    valid = validate_tile(body, content_type)
    labels = tile_labels(footprints, tile)
    return Sample(valid.data, valid.image_format, encode_mask_png(labels.instances), encode_instances_png(
        labels.instances), int(np.count_nonzero(labels.instances)), labels.building_count, lonlat_bounds(tile))


@dataclass(frozen=True)
class TileLabels:
    instances: np.ndarray  # uint16 (256, 256): 0 background, k the k-th footprint of the tile; nonzero = the mask
    building_count: int  # footprints that intersect the tile


def tile_labels(footprints: Sequence[Footprint], tile: Tile) -> TileLabels:
    """The tile's instance map (its mask is where it is nonzero) from its area's footprints: those that intersect
    the tile, numbered 1, 2, ... in (osm_type, osm_id) order, so that the same stored footprints always give the same
    map (``harvester rebuild-instances`` relies on it)."""
    bounds = lonlat_bounds(tile)
    geoms = np.array([f.geometry for f in footprints], dtype=object)
    hits = np.flatnonzero(shapely.intersects(geoms, shapely.box(*bounds))) if len(geoms) else []
    ordered = sorted(hits, key=lambda i: (footprints[i].osm_type, footprints[i].osm_id))
    return TileLabels(rasterize_instances([footprints[i].geometry for i in ordered], tile), len(ordered))


def backoff_delay(attempts: int, base: float, retry_after: float | None) -> float:
    """Exponential backoff with jitter (0.5x-1.5x), never shorter than what the upstream asked for."""
    delay = min(MAX_BACKOFF_S, base * 2 ** max(0, attempts - 1)) * random.uniform(0.5, 1.5)
    return max(delay, retry_after or 0.0)


@dataclass
class Progress:
    stored: int = 0
    skipped: int = 0
    failed_attempts: int = 0
    started: float = field(default_factory=time.monotonic)


class Worker:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, session: aiohttp.ClientSession,
                 provider: TileProvider, labels: LabelSource, *, slots: int | None = None,
                 poll_interval: float = 0.5):
        self.settings = settings
        self.pool = pool
        self.session = session
        self.provider = provider
        self.labels = labels
        self.slots = slots or max(2, settings.tile_concurrency + 2 * settings.overpass_concurrency)
        self.poll_interval = poll_interval
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.progress = Progress()
        self._sql = queries()
        self._finished_area = asyncio.Event()  # wakes idle slots: a finished area may have ended the queue

    async def run(self, stop: asyncio.Event) -> None:
        """Process jobs until none is pending or in progress, or until ``stop`` is set (then drain and return)."""
        tasks = [asyncio.create_task(self._loop(stop), name=f"slot-{i}") for i in range(self.slots)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, stop: asyncio.Event) -> None:
        lost_since: float | None = None
        while not stop.is_set():
            try:
                if await self._step(stop):
                    return
                lost_since = None
            except DATABASE_LOST as exc:
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since > MAX_DATABASE_OUTAGE_S:
                    raise DatabaseError(f"lost the database connection for {now - lost_since:.0f} s "
                                        f"({type(exc).__name__}: {exc}); jobs in flight return to the queue after "
                                        "their lease; run again to resume") from None
                log.warning("database connection lost (%s: %s); retrying in %.0f s", type(exc).__name__, exc,
                            DATABASE_RETRY_S)
                await asyncio.sleep(DATABASE_RETRY_S)

    async def _step(self, stop: asyncio.Event) -> bool:
        """Claim and process one area, or wait; True when the queue is finished."""
        claim = asyncio.ensure_future(self._claim())
        try:
            area = await _uncancellable(claim)
        except asyncio.CancelledError:  # the server may have updated the rows: give them back
            if claim.done() and not claim.cancelled() and claim.exception() is None and claim.result():
                await _uncancellable(self._release([job.job_id for job in claim.result().jobs]))
            raise
        if area is not None:
            await self._process_area(area)
            self._finished_area.set()
            return False
        self._finished_area.clear()
        wait = await self._idle_wait()
        if wait is None:
            self._finished_area.set()
            return True
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._finished_area.wait())]
        await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        return False

    async def _claim(self) -> ClaimedArea | None:
        async with self.pool.acquire() as conn:
            return await claim_area(conn, self.worker_id, self.settings.lease_seconds)

    async def _idle_wait(self) -> float | None:
        """None when the queue is finished; else how long to wait before trying to claim again."""
        async with self.pool.acquire() as conn:
            await conn.execute(self._sql["requeue_expired"], self.settings.max_attempts)
            row = await conn.fetchrow(self._sql["open_jobs"])
        if row["pending"] == 0 and row["in_progress"] == 0:
            return None
        candidates = [self.poll_interval * 4]
        for key in ("next_due_s", "next_lease_s"):
            if row[key] is not None:
                candidates.append(max(float(row[key]), 0.0) + 0.05)
        return max(0.05, min(candidates))

    async def _process_area(self, area: ClaimedArea) -> None:
        pending = {job.job_id: job for job in area.jobs}
        heartbeat = asyncio.create_task(self._heartbeat(pending))
        try:
            try:
                footprints = await self._footprints(area)
            except UpstreamError as exc:
                log.warning("area %s/%s/%s: %s", area.tile.z, area.tile.x, area.tile.y, exc)
                # One retry time for the whole area, set in one statement: jobs due one by one would be claimed,
                # and would each ask Overpass, one by one.
                await self._fail(area.jobs, exc, pending)
                return
            results = await asyncio.gather(*(self._process_job(job, footprints, pending) for job in area.jobs),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        except asyncio.CancelledError:
            if pending:
                await _uncancellable(self._release(list(pending)))
            raise
        finally:
            heartbeat.cancel()

    async def _release(self, job_ids: list[int]) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(self._sql["release_jobs"], job_ids, self.worker_id)
        log.info("released %d unfinished jobs", len(job_ids))

    async def _footprints(self, area: ClaimedArea) -> list[Footprint]:
        if area.fetched:
            async with self.pool.acquire() as conn:
                return await load_buildings(conn, area.area_id)
        parsed = await self.labels.footprints(lonlat_bounds(area.tile))
        dropped = sum(parsed.dropped.values())
        async with self.pool.acquire() as conn:
            await store_buildings(conn, area.area_id, parsed.footprints, dropped, source=self.labels.name)
        return list(parsed.footprints)

    async def _process_job(self, job: ClaimedJob, footprints: list[Footprint], pending: dict) -> None:
        try:
            body, content_type = await self.provider.fetch(self.session, job.tile)
            if sniff_format(body) in ("png", "webp"):  # a long decode that releases the GIL: off the loop
                sample = await asyncio.to_thread(build_sample, body, content_type, footprints, job.tile)
            else:
                sample = build_sample(body, content_type, footprints, job.tile)
        except TileUnavailable as exc:
            await self._outcome(job, pending, "skip_job", str(exc))
            self.progress.skipped += 1
        except UpstreamError as exc:
            await self._fail([job], exc, pending)
        except Exception as exc:  # a bug or a library error on odd input: fail this attempt, keep the cause
            log.exception("job %d tile %s/%s/%s: unexpected error", job.job_id, job.tile.z, job.tile.x, job.tile.y)
            await self._fail([job], UpstreamError(f"internal error: {type(exc).__name__}: {exc}"), pending)
        else:
            await self._store(job, sample, pending)

    async def _store(self, job: ClaimedJob, sample: Sample, pending: dict) -> None:
        async with self.pool.acquire() as conn:
            stored = await store_sample(
                conn, job.job_id, self.worker_id, bounds=sample.bounds, split=split_for(job.lon, job.lat),
                image=sample.image, image_format=sample.image_format, mask_png=sample.mask_png,
                instances_png=sample.instances_png, building_pixels=sample.building_pixels, building_count=sample.building_count)
        pending.pop(job.job_id, None)
        if stored is None:
            log.warning("job %d: lease lost before the sample was stored; another worker owns it now", job.job_id)
        else:
            self.progress.stored += 1

    async def _fail(self, jobs: list[ClaimedJob], exc: UpstreamError, pending: dict) -> None:
        """A failed attempt of these jobs, in one statement: back to the queue after one backoff delay, or failed
        when their attempts are spent."""
        delay = backoff_delay(max(job.attempts for job in jobs), self.settings.backoff_base, exc.retry_after)
        async with self.pool.acquire() as conn:
            await conn.execute(self._sql["fail_attempt"], [job.job_id for job in jobs], self.worker_id,
                               self.settings.max_attempts, str(exc)[:1000], delay)
        for job in jobs:
            pending.pop(job.job_id, None)
            self.progress.failed_attempts += 1
            log.info(ATTEMPT_FAILED, job.job_id, job.tile.z, job.tile.x, job.tile.y, job.attempts, exc)

    async def _outcome(self, job: ClaimedJob, pending: dict, query: str, reason: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(self._sql[query], job.job_id, self.worker_id, reason[:1000])
        pending.pop(job.job_id, None)

    async def _heartbeat(self, pending: dict) -> None:
        interval = self.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            if pending:
                try:
                    async with self.pool.acquire() as conn:
                        await conn.execute(self._sql["heartbeat"], list(pending), self.worker_id,
                                           self.settings.lease_seconds)
                except DATABASE_LOST as exc:
                    log.warning("heartbeat: database connection lost (%s)", type(exc).__name__)


async def _uncancellable(coro):
    """Run ``coro`` (a coroutine or a task) to completion even if the caller is cancelled meanwhile, once or
    repeatedly; re-raise the cancellation afterwards. For the database writes that must not be lost on shutdown: a
    claim whose rows the server already updated, the release of unfinished jobs."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return result
