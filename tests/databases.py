"""Temporary PostgreSQL databases for the tests and the benchmarks, on the server of ``TEST_DATABASE_ADMIN_URL``
(default: the local one, user postgres): created with a unique name, dropped (connections and all) afterwards.

    with TempDatabase(template=name) as url: ...          # a copy of a migrated template (tests)
    async with TempDatabase(migrate=True) as url: ...     # empty, then migrated by ``harvester migrate``'s code
"""

from __future__ import annotations

import asyncio
import os
import uuid

import asyncpg

ADMIN_URL = os.environ.get("TEST_DATABASE_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def database_url(name: str, admin_url: str = ADMIN_URL) -> str:
    """The URL of database ``name`` on the admin URL's server, as the admin user."""
    return f"{admin_url.rpartition('/')[0]}/{name}"


async def admin(sql: str, admin_url: str = ADMIN_URL) -> None:
    """One statement on the maintenance database (CREATE/DROP DATABASE, roles)."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def fetch(url: str, sql: str, *args) -> list[asyncpg.Record]:
    """The rows of one query on ``url`` (its own connection; for tests outside an event loop)."""
    async def go():
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


class TempDatabase:
    def __init__(self, *, prefix: str = "tilesmith_test", template: str | None = None, migrate: bool = False,
                 admin_url: str = ADMIN_URL, name: str | None = None):
        self.name = name or f"{prefix}_{uuid.uuid4().hex[:12]}"
        self.template, self.migrate, self.admin_url = template, migrate, admin_url
        self.url = database_url(self.name, admin_url)

    async def __aenter__(self) -> str:
        template = f' TEMPLATE "{self.template}"' if self.template else ""
        await admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)', self.admin_url)
        await admin(f'CREATE DATABASE "{self.name}"{template}', self.admin_url)
        if self.migrate:
            from harvester import db

            await db.migrate(self.url)
        return self.url

    async def __aexit__(self, *exc) -> None:
        await admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)', self.admin_url)

    def __enter__(self) -> str:
        return asyncio.run(self.__aenter__())

    def __exit__(self, *exc) -> None:
        asyncio.run(self.__aexit__())
