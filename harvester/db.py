"""PostgreSQL access: connections and the plain-SQL migrations of ``migrations/``.

Migrations are applied in file-name order, each in its own transaction, recorded in ``schema_migrations``, under a
session advisory lock so that several processes may run ``harvester migrate`` at once.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import asyncpg

from .errors import HarvesterError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(os.environ.get("HARVESTER_MIGRATIONS_DIR", Path(__file__).resolve().parents[1] / "migrations"))
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Arbitrary constant shared by every harvester process: the key of the migration advisory lock.
_MIGRATION_LOCK_KEY = 0x7469_6C65_736D


class DatabaseError(HarvesterError):
    """The database cannot be reached or is not in the expected state."""


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[str, Path]]:
    """``(version, path)`` of every migration, in order. Refuses names that do not follow ``NNNN_name.sql``."""
    if not directory.is_dir():
        raise DatabaseError(f"migrations folder {directory} not found; set HARVESTER_MIGRATIONS_DIR")
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise DatabaseError(f"migration file {path.name} must be named NNNN_lowercase_name.sql")
        found.append((match.group(1), path))
    return found


async def connect(dsn: str, **kwargs) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn, **kwargs)
    except (OSError, asyncpg.PostgresError) as exc:
        raise DatabaseError(f"cannot connect to DATABASE_URL ({redact_url(dsn)}): {exc}") from exc


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    try:
        return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
    except (OSError, asyncpg.PostgresError) as exc:
        raise DatabaseError(f"cannot connect to DATABASE_URL ({redact_url(dsn)}): {exc}") from exc


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the migrations not applied yet; return their versions. Idempotent and safe to run concurrently."""
    files = migration_files(directory)
    conn = await connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            applied = []
            for version, path in files:
                if version in done:
                    continue
                log.info("applying migration %s", path.name)
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, path.name
                    )
                applied.append(version)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)
    finally:
        await conn.close()


def redact_url(url: str | None) -> str:
    """The URL with its password replaced by ``***`` (``postgresql://u:***@host/db``): what every log line and error
    message of the harvester and the trainer shows of a database URL."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url or "")
