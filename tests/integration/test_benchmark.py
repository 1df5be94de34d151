"""``trainer benchmark`` end to end (the loader over a real PostgreSQL), and the persistent compilation cache: a
second start of the same command loads every program from the cache and compiles none."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_data_pipeline import _populate
from trainer import compile_cache
from trainer.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = ["--base-filters", "4", "--depth", "1", "--batch-size", "2", "--steps", "1"]


def _trainer(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO_ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600, check=False)


def _entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


def test_benchmark_json_with_loader_and_the_cache_on_the_second_start(migrated_database_url, tmp_path):
    asyncio.run(_populate(migrated_database_url, 50))  # 30 rows in split train
    cache = tmp_path / "jax-cache"
    env = {"DATABASE_URL": migrated_database_url, "TRAINER_COMPILATION_CACHE": str(cache)}
    first = _trainer("benchmark", *TINY, "--loader", "--loader-samples", "40", "--decode-workers", "2", "--json",
                     env=env)
    assert first.returncode == 0, first.stderr
    (line,) = first.stdout.splitlines()
    row = json.loads(line)
    assert row["backend"] == "cpu" and row["base_filters"] == 4 and row["batch_size"] == 2
    # base 4, depth 1 on 256 x 256, residual (the default): 61,341,696 MACs of the plain U-Net + 3,407,872 of the
    # projections by hand (tests/unit/test_flops.py), x 2 x 3
    assert row["residual"] is True and row["train_flops_per_image"] == 6 * (61_341_696 + 3_407_872)
    assert row["images_per_s"] > 0 and row["tflops_per_s"] == pytest.approx(
        row["images_per_s"] * row["train_flops_per_image"] / 1e12)
    assert row["peak_tflops"] is None and row["mfu"] is None  # unknown peak on CPU
    assert row["loader_samples_per_s"] > 0
    assert row["loader_to_step"] == pytest.approx(row["loader_samples_per_s"] / row["images_per_s"])
    written = _entries(cache)
    assert written and "0 programs loaded" in first.stderr

    second = _trainer("benchmark", *TINY, "--json", env=env)
    assert second.returncode == 0, second.stderr
    assert _entries(cache) == written  # nothing new compiled and written
    summary = [line for line in second.stderr.splitlines() if "compilation cache:" in line][-1]
    assert summary.endswith("0 compiled and written") and " 0 programs loaded" not in summary

    peak = _trainer("benchmark", *TINY, "--json", "--peak-tflops", "2", env=env)
    assert peak.returncode == 0, peak.stderr
    row = json.loads(peak.stdout)
    assert row["peak_tflops"] == 2 and row["mfu"] == pytest.approx(row["tflops_per_s"] / 2)


def test_cache_off_writes_nothing(tmp_path):
    home = tmp_path / "xdg"
    run = _trainer("benchmark", *TINY, "--compilation-cache", "off",
                   env={"XDG_CACHE_HOME": str(home), "TRAINER_COMPILATION_CACHE": str(tmp_path / "unused")})
    assert run.returncode == 0, run.stderr
    assert not home.exists() and not (tmp_path / "unused").exists()  # the flag wins over the variable


def test_cache_directory_resolution(monkeypatch, tmp_path):
    for name in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.resolve(None) == tmp_path / "tilesmith" / "jax"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax-own"))
    assert compile_cache.resolve(None) == tmp_path / "jax-own"
    monkeypatch.setenv(compile_cache.ENV, "OFF")
    assert compile_cache.resolve(None) is None
    assert compile_cache.resolve(str(tmp_path / "flag")) == tmp_path / "flag"
    with pytest.raises(ConfigError, match="--compilation-cache"):
        compile_cache.resolve(" ")


@pytest.mark.parametrize("to_device", [False, True])
def test_measure_loader_read_directly_or_through_prefetch_to_device(migrated_database_url, to_device):
    """``to_device``: the stream read as training reads it (prefetch_to_device's thread); both stop their threads."""
    import threading

    from trainer.benchmark import measure_loader

    asyncio.run(_populate(migrated_database_url, 50))  # 30 rows in split train
    measure = measure_loader(migrated_database_url, 4, 1, samples=40, pace_s=0.001, to_device=to_device)
    assert measure.samples_per_s > 0 and 0 <= measure.wait_fraction <= 1
    assert not [t for t in threading.enumerate() if t.name == "tilesmith-prefetch"]
