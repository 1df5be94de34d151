"""Least privilege (migrations/0002_roles.sql): a login in ``tilesmith_reader`` reads the ``dataset`` view, PostGIS
functions included, and nothing else; creating the cluster-wide role survives databases migrated at the same time.

Each test logs in as its own role (trust authentication on 127.0.0.1), dropped after the test.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import mercantile
import pytest

from harvester import db, store
from tests.conftest import ADMIN_URL, database_url

READER = "tilesmith_reader"
BASE_TABLES = ("samples", "jobs", "sample_points", "areas", "buildings", "schema_migrations")
# Relations that PostGIS itself makes readable by PUBLIC (every role): its spatial reference table and catalog views.
POSTGIS_PUBLIC = {"spatial_ref_sys", "geometry_columns", "geography_columns"}
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _new_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def reader_login(migrated_database_url):
    """``(database URL, user)`` of a new login role in tilesmith_reader, dropped after the test."""
    user = _new_name("tilesmith_test_reader")
    asyncio.run(_execute(ADMIN_URL, f'CREATE ROLE "{user}" LOGIN IN ROLE {READER}'))
    try:
        yield migrated_database_url, user
    finally:
        # The login holds no privileges of its own; DROP OWNED clears anything a test left in the database (a temp
        # table, a grant) so that DROP ROLE cannot fail on a dependency. The database itself goes afterwards.
        asyncio.run(_execute(migrated_database_url, f'DROP OWNED BY "{user}"'))
        asyncio.run(_execute(ADMIN_URL, f'DROP ROLE "{user}"'))


async def _insert_sample(url: str) -> int:
    tile = mercantile.tile(2.35, 48.85, 17)
    conn = await asyncpg.connect(url)
    try:
        return await store.insert_external_sample(
            conn, provider="test", zoom=tile.z, tile_x=tile.x, tile_y=tile.y, lon=2.35, lat=48.85,
            image=b"\x89PNG not decoded here", image_format="png", mask_png=b"\x89PNG", building_pixels=0,
            building_count=0, split="train",
        )
    finally:
        await conn.close()


async def _fetch_as(url: str, user: str, query: str, *args):
    conn = await asyncpg.connect(url, user=user)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def test_reader_reads_dataset_with_postgis_functions(reader_login):
    url, user = reader_login
    sample_id = asyncio.run(_insert_sample(url))
    rows = asyncio.run(_fetch_as(url, user, "SELECT sample_id, split, zoom, image, mask FROM dataset"))
    assert [(r["sample_id"], r["split"], r["zoom"]) for r in rows] == [(sample_id, "train", 17)]
    (row,) = asyncio.run(_fetch_as(
        url, user,
        "SELECT ST_AsText(footprint) AS wkt, ST_SRID(footprint) AS srid,"
        " ST_AsText(ST_Centroid(ST_Transform(footprint, 3857))) AS centre FROM dataset",  # 3857: spatial_ref_sys
    ))
    assert row["wkt"].startswith("POLYGON((2.34") and row["srid"] == 4326 and row["centre"].startswith("POINT(")


@pytest.mark.parametrize("table", BASE_TABLES)
def test_reader_cannot_read_base_tables(reader_login, table):
    url, user = reader_login
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match=f"permission denied for table {table}"):
        asyncio.run(_fetch_as(url, user, f"SELECT * FROM {table} LIMIT 1"))


@pytest.mark.parametrize("statement", [
    "INSERT INTO samples (sample_id) VALUES (1)",
    "UPDATE jobs SET state = 'pending'",
    "DELETE FROM sample_points",
    "TRUNCATE areas CASCADE",
    "SELECT nextval('jobs_job_id_seq')",
    "CREATE TABLE public.scratch (i integer)",
    "CREATE TABLE scratch (i integer)",
    "CREATE VIEW scratch AS SELECT 1",
    "CREATE SCHEMA scratch",
    "ALTER VIEW dataset RENAME TO scratch",
    "DROP VIEW dataset",
])
def test_reader_cannot_write_or_create(reader_login, statement):
    url, user = reader_login
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        asyncio.run(_fetch_as(url, user, statement))


@pytest.mark.parametrize("statement", [
    "INSERT INTO dataset (sample_id, split) VALUES (1, 'train')",
    "UPDATE dataset SET split = 'test'",
    "DELETE FROM dataset",
])
def test_reader_cannot_write_through_the_view(reader_login, statement):
    """A join view is not automatically updatable, and PostgreSQL says so (SQLSTATE 55000) before it checks
    privileges, for every role; that the reader holds no write privilege on it is checked in the catalog below."""
    url, user = reader_login
    asyncio.run(_insert_sample(url))
    with pytest.raises((asyncpg.InsufficientPrivilegeError, asyncpg.ObjectNotInPrerequisiteStateError)):
        asyncio.run(_fetch_as(url, user, statement))
    assert len(asyncio.run(_fetch_as(url, user, "SELECT sample_id FROM dataset"))) == 1


def test_reader_privileges_are_select_on_dataset_only(reader_login):
    url, user = reader_login
    rows = asyncio.run(_fetch_as(
        url, user,
        "SELECT c.relname, p.privilege FROM pg_class c CROSS JOIN unnest($1::text[]) AS p(privilege)"
        " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
        "   AND has_table_privilege($2, c.oid, p.privilege)",
        list(TABLE_PRIVILEGES), READER,
    ))
    granted = {(r["relname"], r["privilege"]) for r in rows}
    assert granted == {("dataset", "SELECT")} | {(name, "SELECT") for name in POSTGIS_PUBLIC}
    (row,) = asyncio.run(_fetch_as(
        url, user,
        "SELECT has_schema_privilege($1, 'public', 'CREATE') AS create_in_public,"
        "       has_schema_privilege($1, 'public', 'USAGE') AS use_public,"
        "       has_database_privilege($1, current_database(), 'CREATE') AS create_schema,"
        "       bool_or(has_sequence_privilege($1, c.oid, 'USAGE') OR has_sequence_privilege($1, c.oid, 'UPDATE'))"
        "         AS use_sequences"
        " FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'S'",
        READER,
    ))
    assert dict(row) == {"create_in_public": False, "use_public": True, "create_schema": False,
                         "use_sequences": False}
    (role,) = asyncio.run(_fetch_as(url, user, "SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb,"
                                               " rolbypassrls FROM pg_roles WHERE rolname = $1", READER))
    assert not any(role.values()), dict(role)


def test_views_and_tables_belong_to_the_migrating_role(migrated_database_url):
    async def owners():
        conn = await asyncpg.connect(migrated_database_url)
        try:
            return await conn.fetch(
                "SELECT c.relname, pg_get_userbyid(c.relowner) AS owner, current_user AS migrator FROM pg_class c"
                " WHERE c.relnamespace = 'public'::regnamespace AND c.relname = ANY($1::text[])",
                ["dataset", *BASE_TABLES])
        finally:
            await conn.close()

    rows = asyncio.run(owners())
    assert len(rows) == len(BASE_TABLES) + 1 and all(r["owner"] == r["migrator"] for r in rows)


def test_reader_connects_where_public_may_not(empty_database_url):
    """The migration grants CONNECT itself (a cloned template does not carry database grants, so migrate here)."""
    user = _new_name("tilesmith_test_reader")
    name = empty_database_url.rpartition("/")[2]

    async def scenario():
        await db.migrate(empty_database_url)
        await _execute(empty_database_url, f'REVOKE CONNECT ON DATABASE "{name}" FROM PUBLIC')
        await _execute(ADMIN_URL, f'CREATE ROLE "{user}" LOGIN IN ROLE {READER}')
        outsider = _new_name("tilesmith_test_outsider")
        await _execute(ADMIN_URL, f'CREATE ROLE "{outsider}" LOGIN')
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for database"):
                await asyncpg.connect(empty_database_url, user=outsider)
            return await _fetch_as(empty_database_url, user, "SELECT count(*) AS n FROM dataset")
        finally:
            await _execute(ADMIN_URL, f'DROP ROLE "{outsider}"')

    try:
        assert [r["n"] for r in asyncio.run(scenario())] == [0]
    finally:
        asyncio.run(_execute(ADMIN_URL, f'DROP ROLE IF EXISTS "{user}"'))


def test_role_creation_waits_for_a_concurrent_creator(template_database, tmp_path):
    """Two databases migrated at once, both creating the role: the second waits for the first's transaction, then
    finds the role made (unique_violation, caught) and grants to it. Runs 0002 under a fresh role name."""
    role = _new_name("tilesmith_test_role")
    sql = (Path(db.MIGRATIONS_DIR) / "0002_roles.sql").read_text().replace(READER, role)
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "0099_roles_race.sql").write_text(sql)
    first, second = _new_name("tilesmith_test"), _new_name("tilesmith_test")

    async def scenario():
        holder = await asyncpg.connect(database_url(first))
        try:
            async with holder.transaction():
                await holder.execute(sql)  # creates the role, uncommitted
                migrating = asyncio.create_task(db.migrate(database_url(second), migrations))
                await _wait_for_lock_wait(second)
                assert not migrating.done()
            applied = await asyncio.wait_for(migrating, timeout=30)
        finally:
            await holder.close()
        grants = await _fetch_as(database_url(second), "postgres",
                                  "SELECT has_table_privilege($1, 'dataset', 'SELECT') AS can_read,"
                                  " (SELECT rolcanlogin FROM pg_roles WHERE rolname = $1) AS can_login", role)
        return applied, dict(grants[0])

    try:
        for name in (first, second):
            asyncio.run(_execute(ADMIN_URL, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"'))
        applied, grants = asyncio.run(scenario())
        assert applied == ["0099"] and grants == {"can_read": True, "can_login": False}
        assert asyncio.run(db.migrate(database_url(second), migrations)) == []
    finally:
        for name in (first, second):
            asyncio.run(_execute(ADMIN_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        asyncio.run(_execute(ADMIN_URL, f'DROP ROLE IF EXISTS "{role}"'))


async def _wait_for_lock_wait(database: str, timeout: float = 20.0) -> None:
    """Until a backend of ``database`` waits on a lock (here: the uncommitted role row of the other transaction)."""
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
                                   " AND wait_event_type = 'Lock'", database):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no migration of {database} waited on the concurrent role creation")
    finally:
        await conn.close()
