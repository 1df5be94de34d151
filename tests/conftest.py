"""Shared fixtures: a real PostgreSQL with PostGIS, one fresh database per test cloned from a migrated template."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.databases import ADMIN_URL, TempDatabase, database_url

__all__ = ["ADMIN_URL", "REPO_ROOT", "SHARED_DATA", "database_url"]
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
JAX_CACHE = "JAX_COMPILATION_CACHE_DIR"
_JAX_CACHE_KEY = pytest.StashKey[str]()


def pytest_configure(config):
    """One JAX compilation cache for the whole run, new and empty: shared by the xdist workers (they inherit the
    environment) and by the trainer processes the tests start, so a program that recurs across tests (the tiny U-Nets'
    initialisation and train step) compiles once. Every program is kept, however quick to compile: the small ones
    of eager operations recur too (10-12 % off the model and augmentation unit tests here). Tests of the cache itself
    name their own directory. A cache the caller already set is used as it is; none is ever written under the home
    directory."""
    if hasattr(config, "workerinput") or os.environ.get(JAX_CACHE):
        return
    config.stash[_JAX_CACHE_KEY] = os.environ[JAX_CACHE] = tempfile.mkdtemp(prefix="tilesmith-tests-jax-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
    directory = config.stash.get(_JAX_CACHE_KEY, None)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


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
