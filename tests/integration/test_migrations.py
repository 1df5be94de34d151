"""Migrations: an empty database migrated twice ends in the declared schema, and a second run applies nothing."""

import asyncio

import asyncpg

from harvester import db


async def _schema(url):
    conn = await asyncpg.connect(url)
    try:
        tables = {r["table_name"] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
        cols = {r["column_name"]: r["data_type"] for r in await conn.fetch(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'dataset'")}
        gist = {r["indexname"] for r in await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE indexdef LIKE '%USING gist%'")}
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
        footprint_type = await conn.fetchval(
            "SELECT type || ',' || srid FROM geometry_columns WHERE f_table_name = 'samples'")
        return tables, cols, gist, versions, footprint_type
    finally:
        await conn.close()


def test_migrate_empty_database_twice(empty_database_url):
    first = asyncio.run(db.migrate(empty_database_url))
    assert first == [v for v, _ in db.migration_files()]
    before = asyncio.run(_schema(empty_database_url))
    second = asyncio.run(db.migrate(empty_database_url))
    assert second == []
    tables, cols, gist, versions, footprint_type = asyncio.run(_schema(empty_database_url))
    assert (tables, cols, gist, versions) == before[:4]
    assert {"sample_points", "areas", "buildings", "jobs", "samples", "dataset", "schema_migrations"} <= tables
    assert cols == {
        "sample_id": "bigint", "provider": "text", "zoom": "integer", "tile_x": "integer", "tile_y": "integer",
        "lon": "double precision", "lat": "double precision", "footprint": "USER-DEFINED", "split": "text",
        "image": "bytea", "image_format": "text", "mask": "bytea", "building_pixels": "integer",
        "building_count": "integer", "harvested_at": "timestamp with time zone", "instances": "bytea",
    }
    assert {"sample_points_geom_idx", "areas_bounds_idx", "buildings_geom_idx", "samples_footprint_idx"} <= gist
    assert footprint_type == "POLYGON,4326"


def test_tile_images_are_stored_without_compression(migrated_database_url):
    """Already-compressed tiles are not run through pglz again (migration 0006): a compressible body is stored as
    many bytes as it has, out of line; the mask keeps PostgreSQL's default."""
    async def stored_size() -> tuple[str, int, int]:
        conn = await asyncpg.connect(migrated_database_url)
        try:
            storage = await conn.fetchval("SELECT attstorage::text FROM pg_attribute WHERE attrelid = 'samples'::regclass"
                                          " AND attname = 'image'")
            body = b"\x89PNG" + b"\x00" * 100_000  # would shrink to a few hundred bytes under pglz
            size = await conn.fetchval("SELECT pg_column_size($1::bytea)", body)  # a parameter: never compressed
            await conn.execute("CREATE TEMP TABLE probe (LIKE samples INCLUDING ALL)")  # its storage settings too
            await conn.execute("INSERT INTO probe (sample_id, footprint, split, image, image_format, mask,"
                               " building_pixels, building_count) VALUES (1, ST_MakeEnvelope(0, 0, 1, 1, 4326),"
                               " 'train', $1, 'png', '\\x00', 0, 0)", body)
            stored = await conn.fetchval("SELECT pg_column_size(image) FROM probe")
            return storage, size, stored
        finally:
            await conn.close()

    storage, size, stored = asyncio.run(stored_size())
    assert storage == "e"  # EXTERNAL
    assert stored >= size - 8  # the whole body, uncompressed


def test_concurrent_migrations_apply_once(empty_database_url):
    async def run_many():
        return await asyncio.gather(*(db.migrate(empty_database_url) for _ in range(4)))

    results = asyncio.run(run_many())
    applied = [v for r in results for v in r]
    assert sorted(applied) == [v for v, _ in db.migration_files()]
