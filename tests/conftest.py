"""Shared fixtures: a real PostgreSQL with PostGIS, one fresh database per test cloned from a migrated template."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.databases import ADMIN_URL, TempDatabase, database_url

__all__ = ["ADMIN_URL", "REPO_ROOT", "SHARED_DATA", "database_url"]
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def template_database():
    """A migrated database used as the template of every test database; dropped at the end of the session."""
    with TempDatabase(prefix="tilesmith_tmpl", migrate=True) as url:
        yield url.rpartition("/")[2]


@pytest.fixture
def empty_database_url():
    """A new, empty database (no migrations), dropped after the test."""
    with TempDatabase() as url:
        yield url


@pytest.fixture
def migrated_database_url(template_database):
    """A fresh migrated database (cloned from the template), dropped after the test."""
    with TempDatabase(template=template_database) as url:
        yield url


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real imagery not present at {SHARED_DATA}")
    return SHARED_DATA
