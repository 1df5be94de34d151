"""The job queue in PostgreSQL: enqueueing, claiming (``FOR UPDATE SKIP LOCKED``), leases and job outcomes.
What a job produces (samples, buildings) is written by :mod:`harvester.store`.

Named queries live in ``sql/queue.sql`` and are loaded once. Job states and their transitions are documented in
``migrations/0001_init.sql``. Every outcome query checks that the caller still holds the job (``worker`` and
``in_progress``), so a worker whose lease expired cannot overwrite the work of the one that took the job over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import asyncpg
import numpy as np

from .sql import queries as named_queries
from .tiles import Tile, area_tile, lonlat_bounds, tile_at

STATES = ("pending", "in_progress", "done", "failed", "skipped")


def queries() -> dict[str, str]:
    return named_queries("queue")


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    provider: str
    tile: Tile
    attempts: int
    lon: float  # the sampled coordinate the tile is harvested for
    lat: float


@dataclass(frozen=True)
class ClaimedArea:
    area_id: int
    tile: Tile
    fetched: bool
    jobs: tuple[ClaimedJob, ...]


async def enqueue(conn: asyncpg.Connection, *, sampler_key: str, points: np.ndarray, zooms: Sequence[int],
                  provider: str) -> int:
    """Record the points (idempotent per ``(sampler_key, idx)``) and queue one job per distinct tile.

    Returns the number of new jobs. A tile shared by several points is harvested once, for the first of them.
    """
    sql = queries()
    n = len(points)
    async with conn.transaction():
        await conn.execute(sql["insert_points"], sampler_key, list(range(n)), points[:, 0].tolist(),
                           points[:, 1].tolist())
        stored = await conn.fetch(sql["select_points"], sampler_key, n)
        areas: dict[tuple[int, int, int], Tile] = {}
        jobs: dict[tuple[int, int, int], tuple[int, Tile]] = {}
        for row in stored:
            area = area_tile(row["lon"], row["lat"], zooms)
            areas[(area.z, area.x, area.y)] = area
            for z in zooms:
                tile = tile_at(row["lon"], row["lat"], z)
                jobs.setdefault((tile.z, tile.x, tile.y), (row["point_id"], area))
        if not jobs:
            return 0
        area_list = list(areas.values())
        bounds = [lonlat_bounds(a) for a in area_list]
        await conn.execute(sql["insert_areas"], [a.z for a in area_list], [a.x for a in area_list],
                           [a.y for a in area_list], *([b[i] for b in bounds] for i in range(4)))
        area_ids = {(r["zoom"], r["tile_x"], r["tile_y"]): r["area_id"] for r in await conn.fetch(
            sql["select_areas"], [a.z for a in area_list], [a.x for a in area_list], [a.y for a in area_list])}
        keys = list(jobs)
        result = await conn.execute(
            sql["insert_jobs"], provider, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys],
            [jobs[k][0] for k in keys], [area_ids[(a.z, a.x, a.y)] for _, a in (jobs[k] for k in keys)])
    return int(result.split()[-1])


async def claim_area(conn: asyncpg.Connection, worker: str, lease_s: float) -> ClaimedArea | None:
    rows = await conn.fetch(queries()["claim_area"], worker, lease_s)
    if not rows:
        return None
    first = rows[0]
    jobs = tuple(ClaimedJob(r["job_id"], r["provider"], Tile(r["tile_x"], r["tile_y"], r["zoom"]), r["attempts"],
                            r["lon"], r["lat"]) for r in sorted(rows, key=lambda r: r["job_id"]))
    return ClaimedArea(first["area_id"], Tile(first["area_x"], first["area_y"], first["area_zoom"]),
                       first["fetched"], jobs)


async def counts(conn: asyncpg.Connection) -> dict[str, object]:
    """Jobs by state, overall and per zoom: the shape of ``harvester status --json``."""
    totals = {s: 0 for s in STATES}
    by_zoom: dict[str, dict[str, int]] = {}
    for r in await conn.fetch(queries()["counts"]):
        totals[r["state"]] += r["n"]
        by_zoom.setdefault(str(r["zoom"]), {s: 0 for s in STATES})[r["state"]] += r["n"]
    return {**totals, "by_zoom": dict(sorted(by_zoom.items(), key=lambda kv: int(kv[0])))}
