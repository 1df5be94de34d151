"""Labels from an OSM extract: ``harvester import-osm`` and ``HARVESTER_LABELS=extract``, through the real command
line, against real PostgreSQL/PostGIS, the fake upstreams and ``.osm.pbf`` files written from the fake world."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg
import numpy as np
import pytest

from harvester.decode import decode_mask
from tests.databases import TempDatabase, fetch
from tests.fakes.pbf import REPLICATION_SEQUENCE, objects_in, write_extract
from tests.fakes.servers import FakeUpstreams
from tests.fakes.world import World
from tests.integration.harvest_checks import check_database

REGION = (2.30, 48.84, 2.34, 48.86)
MARGIN = 0.01  # the extract reaches past the sampled box: an area tile around a point near its edge does too


def _cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harvester", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _env(url: str, up: FakeUpstreams | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "DATABASE_URL": url, "HARVESTER_REGION": "bbox:" + ",".join(map(str, REGION)),
           "HARVESTER_SAMPLES": "40", "HARVESTER_ZOOMS": "17,18", "HARVESTER_SEED": "5",
           "HARVESTER_TILE_PROVIDER": "xyz", "HARVESTER_TILE_RATE": "500", "HARVESTER_TILE_CONCURRENCY": "8",
           "HARVESTER_OVERPASS_RATE": "200", "HARVESTER_OVERPASS_CONCURRENCY": "2"}
    if up is not None:
        env.update(up.env())
    env.update(extra)
    return env


def _db_env(url: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": url}


def _grown(bounds, margin=MARGIN):
    w, s, e, n = bounds
    return (w - margin, s - margin, e + margin, n + margin)


@pytest.fixture(scope="module")
def world():
    return World(seed=7)


@pytest.fixture(scope="module")
def extract(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("extract") / "paris.osm.pbf"
    counts = write_extract(world, _grown(REGION), path)
    return path, counts


def _labels(url: str) -> tuple[dict, dict, set]:
    """Per area its (osm_type, osm_id) set, per tile its mask, and the label sources stored."""
    ids: dict = {}
    for r in fetch(url, "SELECT a.zoom, a.tile_x, a.tile_y, b.osm_type, b.osm_id FROM areas a"
                        " LEFT JOIN buildings b USING (area_id)"):
        ids.setdefault((r["zoom"], r["tile_x"], r["tile_y"]), set())
        if r["osm_id"] is not None:
            ids[(r["zoom"], r["tile_x"], r["tile_y"])].add((r["osm_type"], r["osm_id"]))
    masks = {(r["zoom"], r["tile_x"], r["tile_y"]): decode_mask(r["mask"])
             for r in fetch(url, "SELECT zoom, tile_x, tile_y, mask FROM dataset")}
    sources = {r["source"] for r in fetch(url, "SELECT DISTINCT source FROM buildings")}
    return ids, masks, sources


@pytest.mark.slow
def test_extract_and_overpass_give_the_same_labels(migrated_database_url, template_database, world, extract):
    path, counts = extract
    with FakeUpstreams(world) as up, TempDatabase(template=template_database) as extract_url:
        result = _cli("run", env=_env(migrated_database_url, up, HARVESTER_LABELS="overpass"))
        assert result.returncode == 0, result.stderr
        assert up.requests("overpass")
        overpass_states = asyncio.run(check_database(migrated_database_url, world))

        result = _cli("import-osm", str(path), env=_db_env(extract_url))
        assert result.returncode == 0, result.stderr
        assert f"kept {counts['footprints']} footprints" in result.stdout
        up.clear()
        result = _cli("run", env=_env(extract_url, up, HARVESTER_LABELS="extract"))
        assert result.returncode == 0, result.stderr
        assert not up.requests("overpass")  # not one query, not one status request
        extract_states = asyncio.run(check_database(extract_url, world))
        extract_ids, extract_masks, extract_sources = _labels(extract_url)

    assert extract_states == overpass_states and overpass_states["done"] > 40
    overpass_ids, overpass_masks, overpass_sources = _labels(migrated_database_url)
    assert (overpass_sources, extract_sources) == ({"overpass"}, {"extract"})
    assert extract_ids == overpass_ids and sum(map(len, extract_ids.values())) > 100
    assert extract_masks.keys() == overpass_masks.keys()
    for tile, mask in overpass_masks.items():
        assert np.array_equal(mask, extract_masks[tile]), tile
    # The written file held decoys: tagged nodes, roads, building=no, building:part, type=building relations.
    decoys = {(o.type, o.id) for o in objects_in(world, _grown(REGION)) if not o.is_footprint}
    assert decoys and not decoys & set().union(*extract_ids.values())


def _active(url: str) -> tuple[list, int]:
    return ([tuple(r) for r in fetch(url, "SELECT extract_id, file_name, kept FROM osm_extracts ORDER BY 1")],
            fetch(url, "SELECT count(*) FROM osm_buildings")[0][0])


def test_bad_files_stop_with_one_line_and_keep_the_previous_import(migrated_database_url, extract, tmp_path):
    path, counts = extract
    env = _db_env(migrated_database_url)
    assert _cli("import-osm", str(path), env=env).returncode == 0
    before = _active(migrated_database_url)
    assert before[1] == counts["footprints"]

    data = path.read_bytes()
    truncated = tmp_path / "truncated.osm.pbf"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    text = tmp_path / "notes.osm.pbf"
    text.write_text("this is not an OSM extract\n" * 100)
    for bad in (tmp_path / "missing.osm.pbf", truncated, text):
        result = _cli("import-osm", str(bad), env=env)
        assert result.returncode == 2, (bad, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in result.stderr, result.stderr
        assert _active(migrated_database_url) == before

    status = _cli("status", env=env)
    assert status.returncode == 0, status.stderr
    assert f"OSM extract: {path.name}" in status.stdout and f"sequence {REPLICATION_SEQUENCE}" in status.stdout
    assert f"{counts['footprints']} footprints kept" in status.stdout


def test_run_with_extract_labels_and_nothing_imported_stops_before_queueing(migrated_database_url):
    result = _cli("run", env=_env(migrated_database_url, HARVESTER_LABELS="extract",
                                  HARVESTER_TILE_URL="http://127.0.0.1:9/{z}/{x}/{y}.png",
                                  HARVESTER_OVERPASS_URL="http://127.0.0.1:9/api/interpreter"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "HARVESTER_LABELS" in lines[-1] and "harvester import-osm" in lines[-1]
    assert fetch(migrated_database_url, "SELECT count(*) FROM jobs")[0][0] == 0
    assert fetch(migrated_database_url, "SELECT count(*) FROM sample_points")[0][0] == 0


@pytest.mark.slow
def test_reimport_swaps_atomically_for_readers(migrated_database_url, tmp_path):
    """A reader polling during a re-import sees the old extract's footprints or the new one's, never a mixture."""
    box = (2.30, 48.84, 2.36, 48.87)
    old, new = tmp_path / "old.osm.pbf", tmp_path / "new.osm.pbf"
    write_extract(World(seed=1), box, old)
    write_extract(World(seed=2, buildings_per_km2=1500), box, new)  # bigger: the import takes a while
    env = _db_env(migrated_database_url)
    assert _cli("import-osm", str(old), env=env).returncode == 0
    probe = (2.32, 48.85, 2.34, 48.86)

    async def snapshot(conn) -> tuple[str, int, frozenset]:
        # One statement, as a harvest's lookup is: its snapshot is taken once its tables are locked, so it reads
        # the old table or the new one (a transaction whose snapshot predates the swap would see the new table
        # empty: PostgreSQL's DDL is not MVCC-safe; the README says so).
        name, kept, total, ids = await conn.fetchrow(
            "SELECT e.file_name, e.kept, b.total, b.ids FROM"
            " (SELECT file_name, kept FROM osm_extracts ORDER BY extract_id DESC LIMIT 1) e,"
            " (SELECT count(*) AS total, array_agg(osm_id) FILTER (WHERE ST_Intersects(geom,"
            "  ST_MakeEnvelope($1, $2, $3, $4, 4326))) AS ids FROM osm_buildings) b", *probe)
        assert total == kept, (name, total, kept)
        return name, total, frozenset(ids or ())

    async def poll() -> list[tuple[str, int, frozenset]]:
        conn = await asyncpg.connect(migrated_database_url)
        try:
            first = await snapshot(conn)
            proc = subprocess.Popen([sys.executable, "-m", "harvester", "import-osm", str(new)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            seen = [first]
            while proc.poll() is None:
                seen.append(await snapshot(conn))
                await asyncio.sleep(0.005)
            assert proc.returncode == 0, proc.stderr.read()
            seen.append(await snapshot(conn))
            return seen
        finally:
            await conn.close()

    seen = asyncio.run(poll())
    states = {(name, total, ids) for name, total, ids in seen}
    by_name = {name for name, _, _ in states}
    assert seen[0][0] == "old.osm.pbf" and seen[-1][0] == "new.osm.pbf"
    assert len(states) == 2 and by_name == {"old.osm.pbf", "new.osm.pbf"}, [(n, t) for n, t, _ in states]
    assert len(seen) > 10  # many reads happened during the import
