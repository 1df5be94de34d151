"""A whole harvest against real PostgreSQL and the local fake upstreams (XYZ, IGN WMTS, Google, Overpass)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from harvester.config import load_settings
from harvester.run import harvest
from tests.fakes.servers import FakeUpstreams
from tests.fakes.world import World

from .harvest_checks import check_database

PARIS_BOX = "bbox:2.30,48.84,2.37,48.88"


def settings_for(url: str, up: FakeUpstreams, **env: str):
    base = {"DATABASE_URL": url, "HARVESTER_REGION": PARIS_BOX, "HARVESTER_SAMPLES": "30",
            "HARVESTER_ZOOMS": "17,18,19", "HARVESTER_TILE_PROVIDER": "xyz", "HARVESTER_TILE_RATE": "500",
            "HARVESTER_TILE_CONCURRENCY": "8", "HARVESTER_OVERPASS_RATE": "200",
            "HARVESTER_OVERPASS_CONCURRENCY": "2", "HARVESTER_REQUEST_TIMEOUT": "10",
            "HARVESTER_BACKOFF_BASE": "0.05", **up.env()}
    base.update(env)
    return load_settings(base)


async def _jobs(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT count(*) FROM jobs")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def world():
    return World(seed=7)


@pytest.mark.parametrize("provider", ["xyz", "ign", "google"])
def test_harvest_stores_exact_samples_and_reruns_do_nothing(migrated_database_url, world, provider):
    with FakeUpstreams(world) as up:
        settings = settings_for(migrated_database_url, up, HARVESTER_TILE_PROVIDER=provider)
        final = asyncio.run(harvest(settings))
        states = asyncio.run(check_database(migrated_database_url, world))
        jobs = asyncio.run(_jobs(migrated_database_url))
        assert final["done"] == states["done"] == jobs > 40  # 30 points x 3 zooms, minus shared tiles
        assert final["failed"] == final["skipped"] == 0
        assert set(final["by_zoom"]) == {"17", "18", "19"}
        tile_requests = len(up.requests(provider))
        areas = asyncio.run(_count(migrated_database_url, "SELECT count(*) FROM areas"))
        queries = [r for r in up.requests("overpass") if r.path.endswith("/interpreter")]
        assert len(queries) == areas  # one Overpass query per area (coordinate), not per tile

        # Same settings again: no new job, no upstream request.
        up.clear()
        again = asyncio.run(harvest(settings))
        assert again == final
        assert not up.requests(provider) and not up.requests("overpass")

        # A larger sample adds only the difference.
        bigger = settings_for(migrated_database_url, up, HARVESTER_TILE_PROVIDER=provider, HARVESTER_SAMPLES="40")
        more = asyncio.run(harvest(bigger))
        assert more["done"] > final["done"]
        sessions = 1 if provider == "google" else 0  # each process opens one Google session
        assert len(up.requests(provider)) == more["done"] - final["done"] + sessions
        asyncio.run(check_database(migrated_database_url, world))
        assert tile_requests == jobs + sessions


async def _count(url: str, sql: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def test_rebuild_instances_restores_the_harvested_maps(migrated_database_url, world):
    """Samples stored before migration 0005 (instances NULL) get the same maps back from their stored footprints;
    an external data set's sample (no footprints) stays NULL."""
    from harvester.cli import main
    from harvester.store import insert_external_sample

    with FakeUpstreams(world) as up:
        asyncio.run(harvest(settings_for(migrated_database_url, up, HARVESTER_SAMPLES="12")))

    async def forget_instances():
        conn = await asyncpg.connect(migrated_database_url)
        try:
            harvested = dict(await conn.fetch("SELECT sample_id, instances FROM samples"))
            external = await insert_external_sample(
                conn, provider="dubai", zoom=18, tile_x=1, tile_y=2, lon=0.0, lat=0.0, image=b"\xff\xd8\xff",
                image_format="jpeg", mask_png=b"", building_pixels=0, building_count=0)
            await conn.execute("UPDATE samples SET instances = NULL")
            return harvested, external
        finally:
            await conn.close()

    harvested, external = asyncio.run(forget_instances())
    assert len(harvested) > 20 and all(v is not None for v in harvested.values())
    assert main(["rebuild-instances", "--batch-size", "7", "--database-url", migrated_database_url]) == 0
    rebuilt = dict(asyncio.run(_fetch_pairs(migrated_database_url)))
    assert rebuilt.pop(external) is None
    assert rebuilt == harvested  # byte for byte: the same footprints, the same order, the same encoder
    assert main(["rebuild-instances", "--database-url", migrated_database_url]) == 0  # nothing left: no change
    assert dict(asyncio.run(_fetch_pairs(migrated_database_url))) == {**harvested, external: None}


async def _fetch_pairs(url: str):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch("SELECT sample_id, instances FROM samples")
    finally:
        await conn.close()
