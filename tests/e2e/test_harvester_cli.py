"""The harvester's command line end to end: migrate, run a few hundred samples over several zooms against the local
fakes, status, export; every sample checked against the footprints and the jobs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.fakes.servers import FakeUpstreams
from tests.fakes.world import World
from tests.integration.harvest_checks import check_database


def _cli(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harvester", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_cli_harvest_status_export(empty_database_url, tmp_path):
    world = World(seed=11)
    with FakeUpstreams(world) as up:
        env = {**os.environ, **up.env(), "DATABASE_URL": empty_database_url, "HARVESTER_REGION": "dep:75,92,93,94",
               "HARVESTER_SAMPLES": "150", "HARVESTER_ZOOMS": "16,17,18", "HARVESTER_TILE_PROVIDER": "ign",
               "HARVESTER_TILE_RATE": "400", "HARVESTER_TILE_CONCURRENCY": "16", "HARVESTER_OVERPASS_RATE": "200",
               "HARVESTER_OVERPASS_CONCURRENCY": "4", "HARVESTER_SEED": "3"}
        for _ in range(2):  # migrate is idempotent
            result = _cli("migrate", env=env)
            assert result.returncode == 0, result.stderr
        result = _cli("run", env=env)
        assert result.returncode == 0, result.stderr
        assert "progress:" in result.stderr or "finished:" in result.stderr

        status = json.loads(_cli("status", "--json", env=env).stdout)
        assert set(status) == {"pending", "in_progress", "done", "failed", "skipped", "by_zoom"}
        assert set(status["by_zoom"]) == {"16", "17", "18"}
        assert status["pending"] == status["in_progress"] == status["failed"] == 0
        assert status["done"] + status["skipped"] >= 300
        assert sum(z["done"] for z in status["by_zoom"].values()) == status["done"]
        states = asyncio.run(check_database(empty_database_url, world))
        assert states["done"] == status["done"]
        tiles = [r for r in up.requests("ign") if r.status == 200]
        assert len(tiles) == status["done"] + status["skipped"]  # each tile fetched once
        table = _cli("status", env=env).stdout
        assert "done" in table and "16" in table

        out = tmp_path / "export"
        result = _cli("export", "--zoom", "17", "--out", str(out), "--batch-size", "32", env=env)
        assert result.returncode == 0, result.stderr
        files = sorted(out.glob("z17_*.npz"))
        assert files and all(f.name.split("_")[1] in ("train", "val", "test") for f in files)
        total = 0
        for f in files:
            with np.load(f) as batch:
                images, masks = batch["images"], batch["masks"]
                assert images.dtype == np.uint8 and images.shape[1:] == (256, 256, 3)
                assert masks.dtype == np.uint8 and masks.shape[1:] == (256, 256) and masks.max() <= 1
                assert len(images) == len(masks) <= 32
                total += len(images)
        assert total == status["by_zoom"]["17"]["done"]
