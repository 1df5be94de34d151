"""``trainer train`` / ``evaluate`` on samples inserted in a real migrated database, with a tiny U-Net.

Covers: checkpoints written; a resumed run continues at the right step with the same data order (identical losses
and parameters to an uninterrupted run); a ``trainer train`` killed with SIGKILL resumes to the end; corrupt rows are
skipped, counted and logged; NaN detection exits non-zero with a clear message and leaves the last good
checkpoint; ``evaluate --json`` counts every sample of a split whose size the batch size does not divide; the
2-device data-parallel path (in a subprocess, since XLA_FLAGS must be set before jax is imported).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import mercantile
import numpy as np
import pytest
from PIL import Image

from harvester.store import insert_external_sample

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = ["--base-filters", "4", "--depth", "2"]


# ------------------------------------------------------------------------------------------- synthetic world


def synthetic_sample(rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """An aerial-looking tile: textured ground with bright rectangular roofs (and their shadows); mask = the roofs."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi, 2)
    base = rng.uniform(60, 110, 3) * np.array([0.9, 1.1, 0.8])
    ground = base + 18 * np.sin(2 * np.pi * (1.5 * xx + phase[0]))[..., None] \
        + 14 * np.cos(2 * np.pi * (2.0 * yy + phase[1]))[..., None]
    image = ground + rng.normal(0, 14, (size, size, 3))
    mask = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(0, 7)):
        h, w = rng.integers(10, 42, 2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        image[y + 3:y + h + 3, x + 3:x + w + 3] *= 0.55  # shadow towards the south-east
        roof = rng.uniform(175, 240) * rng.uniform(0.85, 1.0, 3)
        image[y:y + h, x:x + w] = roof + rng.normal(0, 6, (h, w, 3))
        mask[y:y + h, x:x + w] = 1
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


async def _insert(database_url: str, splits: dict[str, int], zooms: tuple[int, ...], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    conn = await asyncpg.connect(database_url)
    stats = {"building_pixels": 0, "pixels": 0, "rows": {s: 0 for s in splits}}
    try:
        index = 0
        for split, count in splits.items():
            for i in range(count):
                zoom = zooms[i % len(zooms)]
                tile = mercantile.Tile(x=70_000 + index, y=45_000, z=zoom)
                index += 1
                lon, lat = mercantile.ul(tile.x, tile.y, tile.z)
                image, mask = synthetic_sample(rng)
                await insert_external_sample(
                    conn, provider="synthetic", zoom=zoom, tile_x=tile.x, tile_y=tile.y, lon=lon, lat=lat,
                    image=_jpeg(image), image_format="jpeg", mask_png=_png(mask),
                    building_pixels=int(mask.sum()), building_count=0, split=split,
                )
                stats["rows"][split] += 1
                if split == "test":
                    stats["building_pixels"] += int(mask.sum())
                    stats["pixels"] += mask.size
    finally:
        await conn.close()
    return stats


def insert_synthetic_world(database_url: str, splits: dict[str, int], zooms: tuple[int, ...] = (17, 18),
                           seed: int = 0) -> dict:
    """Insert synthetic samples per split; returns row counts and the building share of ``test``."""
    return asyncio.run(_insert(database_url, splits, zooms, seed))


# ------------------------------------------------------------------------------------------- helpers


def run_trainer(*args: str, database_url: str, env: dict | None = None, timeout: float = 300
                ) -> subprocess.CompletedProcess:
    environment = {**os.environ, "DATABASE_URL": database_url, **(env or {})}
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO_ROOT, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def _latest_steps(workdir: Path) -> list[int]:
    latest = workdir / "checkpoints" / "latest"
    return sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit()) if latest.is_dir() else []


def _train_losses(workdir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _restore_latest_params(workdir: Path):
    from trainer.checkpoints import Checkpoints
    from trainer.evaluate import saved_train_config
    from trainer.steps import abstract_train_state, create_optimizer, make_mesh

    config = saved_train_config(workdir, "postgresql://unused")
    mesh = make_mesh()
    tx = create_optimizer(config, 1)
    _, abstract = abstract_train_state(config.base_filters, config.depth, config.compute_dtype, tx, mesh,
                                       borders=config.borders, residual=config.residual)
    with Checkpoints(workdir, read_only=True) as checkpoints:
        return checkpoints.restore_latest(abstract)


# ------------------------------------------------------------------------------------------- fixtures

SPLITS = {"train": 12, "val": 3, "test": 7}  # 12 train = 3 batches of 4; 7 test: not a multiple of 4


def tiny_config(database_url: str, **overrides):
    from trainer.config import TrainConfig

    fields = dict(database_url=database_url, steps=4, batch_size=4, base_filters=4, depth=2, eval_every=2,
                  checkpoint_every=2, log_every=1, decode_workers=1, prefetch=2)
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def trained(template_database, tmp_path_factory):
    """A database with a small synthetic world, and a work directory trained on it for 4 steps (run "A")."""
    from tests.databases import TempDatabase
    from trainer.train import train_and_evaluate

    with TempDatabase(prefix="tilesmith_train", template=template_database) as url:
        stats = insert_synthetic_world(url, SPLITS, seed=1)
        workdir = tmp_path_factory.mktemp("run_a")
        summary = train_and_evaluate(tiny_config(url), workdir)
        yield {"url": url, "workdir": workdir, "stats": stats, "summary": summary}


def cli(*args: str) -> int:
    """``trainer ARGS`` in this process: its exit status (argparse's exit included)."""
    from trainer.cli import main

    try:
        return main(list(args))
    except SystemExit as exc:
        return exc.code


# ------------------------------------------------------------------------------------------- training


def test_training_writes_checkpoints_config_and_metrics(trained):
    workdir = trained["workdir"]
    assert trained["summary"]["step"] == 4
    assert _latest_steps(workdir) == [2, 4]
    assert [p.name for p in (workdir / "checkpoints" / "best").iterdir() if p.name.isdigit()]
    config = json.loads((workdir / "config.json").read_text())
    assert config["base_filters"] == 4 and config["resolved"]["total_steps"] == 4
    assert config["resolved"]["steps_per_epoch"] == 3 and config["resolved"]["train_samples"] == 12
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val] == [2, 4] and all(r["samples"] == 3 for r in val)
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    train = [r for r in records if r["kind"] == "train"]
    assert all(r["samples_per_s"] > 0 and 0 <= r["data_wait_fraction"] <= 1 for r in train)
    assert all("mfu" not in r for r in train)  # no known peak on CPU: no MFU rather than a made-up one


def test_resume_continues_at_the_right_step_with_the_same_data_order(trained, tmp_path):
    from trainer.train import train_and_evaluate

    config = tiny_config(trained["url"])
    first = train_and_evaluate(config, tmp_path, stop_after=2)  # "preempted" after 2 steps (mid epoch 0)
    assert first["step"] == 2 and _latest_steps(tmp_path) == [2]
    second = train_and_evaluate(config, tmp_path)  # resumes at epoch 0 batch 2, then epoch 1
    assert second["step"] == 4 and _latest_steps(tmp_path) == [2, 4]
    uninterrupted = _train_losses(trained["workdir"])
    resumed = _train_losses(tmp_path)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):  # same batches and augmentations: the same losses as the uninterrupted run
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5), step
    a, b = _restore_latest_params(trained["workdir"]), _restore_latest_params(tmp_path)
    assert int(a.step) == int(b.step) == 4
    for x, y in zip(jax_leaves(a.params), jax_leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    # nothing left to do: a third run returns at once
    assert train_and_evaluate(config, tmp_path)["step"] == 4


def test_sigkilled_run_resumes_from_its_checkpoint_to_the_end(trained, tmp_path):
    """Issue 4: ``trainer train`` killed (SIGKILL: no handler runs) right after its first checkpoint; the same
    command resumes from the last complete checkpoint and ends at the right step, metrics.jsonl without gap or
    duplicate."""
    import signal
    import time

    workdir, total = tmp_path / "run", 24
    args = ["train", "--workdir", str(workdir), "--steps", str(total), "--batch-size", "4", *TINY,
            "--eval-every", str(total), "--checkpoint-every", "2", "--decode-workers", "1"]
    env = {**os.environ, "DATABASE_URL": trained["url"]}  # the session's compilation cache: the 2nd run reuses it
    with open(tmp_path / "first.err", "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=REPO_ROOT, env=env,
                                   stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 240
            while not _latest_steps(workdir) and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait(30)
    assert process.returncode == -signal.SIGKILL, (tmp_path / "first.err").read_text()[-3000:]
    killed_at = max(_latest_steps(workdir))
    assert 2 <= killed_at < total

    resumed = run_trainer(*args, database_url=trained["url"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {killed_at} " in resumed.stderr
    assert max(_latest_steps(workdir)) == total
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(2, total + 1, 2))  # logged at every checkpoint: continuous, each once
    assert [r["step"] for r in records if r["kind"] == "val"] == [total]
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    assert int(_restore_latest_params(workdir).step) == total


def test_sigterm_checkpoints_the_step_reached_stops_the_workers_and_exits_143(trained, tmp_path):
    """A ``kill``, ``docker stop`` or a cloud preemption notice (SIGTERM) stops ``trainer train`` as Ctrl-C does:
    the step it reached is checkpointed (not only the last periodic checkpoint), its decode workers exit with it,
    and the exit status says why."""
    import signal

    from tests.processes import children, wait_gone

    workdir, total = tmp_path / "run", 2000
    args = ["train", "--workdir", str(workdir), "--steps", str(total), "--batch-size", "4", *TINY,
            "--eval-every", str(total), "--checkpoint-every", "3", "--decode-workers", "2"]
    env = {**os.environ, "DATABASE_URL": trained["url"]}
    process = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # the signal to it alone, as `kill PID` sends it
    try:
        deadline = time.monotonic() + 240
        while not _latest_steps(workdir) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        workers = children(process.pid)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == 143, stderr[-3000:]
    assert "trainer train: terminated (SIGTERM)" in stderr
    interrupted = re.search(r"interrupted at step (\d+); checkpoint saved", stderr)
    assert interrupted, stderr[-3000:]
    step = int(interrupted.group(1))
    assert 3 <= step < total and max(_latest_steps(workdir)) == step  # the step reached, checkpointed
    assert len(workers) >= 2 and wait_gone(workers) == []  # the decode workers (and any helper) exited with it


async def _corrupt_one_image(url: str, split: str) -> int:
    """Truncate the stored JPEG of the second sample of ``split`` (format still 'jpeg'); return its sample_id."""
    conn = await asyncpg.connect(url)
    try:
        sample_id, image = await conn.fetchrow("SELECT sample_id, image FROM samples WHERE split = $1"
                                               " ORDER BY sample_id LIMIT 1 OFFSET 1", split)
        await conn.execute("UPDATE samples SET image = $1 WHERE sample_id = $2", image[:300], sample_id)
        return sample_id
    finally:
        await conn.close()


def _skip_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping sample ")]


def test_a_corrupt_train_row_is_skipped_counted_and_logged_and_training_completes(migrated_database_url, tmp_path,
                                                                                 caplog):
    """Issue 4: a train row whose image does not decode, among good ones, is skipped with a warning naming its
    ``sample_id`` (once per epoch that reaches it) and training completes (the in-process compiled step of
    ``trained`` is reused when it ran first: same model and schedule)."""
    from trainer.train import train_and_evaluate

    url = migrated_database_url
    insert_synthetic_world(url, {"train": 9, "val": 3}, seed=4)  # 9 rows: 2 batches of 4 even without the bad one
    bad = asyncio.run(_corrupt_one_image(url, "train"))
    caplog.set_level("WARNING", logger="trainer")
    summary = train_and_evaluate(tiny_config(url), tmp_path)
    assert summary["step"] == 4 and _latest_steps(tmp_path) == [2, 4]
    skips = _skip_messages(caplog)
    assert skips and all(m.startswith(f"skipping sample {bad}: jpeg") for m in skips), skips  # once per epoch
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    assert [r["samples"] for r in records if r["kind"] == "val"] == [3, 3]


def test_a_step_waiting_for_data_is_logged_and_warned(trained, tmp_path, caplog, monkeypatch):
    """Batches that arrive 2 s apart, for a step of a few ms: the share of time spent waiting for data is logged in
    metrics.jsonl and a warning names the input pipeline (same model and schedule as ``trained``: no new compile)."""
    import trainer.train as train_module

    real = train_module.prefetch_to_device

    def slow(batches, **kwargs):
        for item in real(batches, **kwargs):
            time.sleep(2.0)
            yield item

    monkeypatch.setattr(train_module, "prefetch_to_device", slow)
    caplog.set_level("WARNING", logger="trainer")
    train_module.train_and_evaluate(tiny_config(trained["url"]), tmp_path, stop_after=2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    waits = [r["data_wait_fraction"] for r in records if r["kind"] == "train"]
    assert len(waits) == 2 and max(waits) > 0.5
    warned = [r.getMessage() for r in caplog.records if "waited for data" in r.getMessage()]
    assert len(warned) == 1 and "--decode-workers" in warned[0]  # at most one warning every 5 minutes


def test_a_corrupt_val_row_is_skipped_at_every_validation(migrated_database_url, tmp_path, caplog):
    from trainer.train import train_and_evaluate

    url = migrated_database_url
    insert_synthetic_world(url, {"train": 8, "val": 3}, seed=4)
    bad = asyncio.run(_corrupt_one_image(url, "val"))
    caplog.set_level("WARNING", logger="trainer")
    summary = train_and_evaluate(tiny_config(url), tmp_path)
    assert summary["step"] == 4
    assert [m.split()[2] for m in _skip_messages(caplog)] == [f"{bad}:"] * 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in records if r["kind"] == "val"] == [2, 2]  # 3 rows, the corrupt one not counted


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(trained, tmp_path, capsys, monkeypatch):
    """A NaN loss at step 3 (injected into the real, already compiled step) stops `trainer train` with exit 1."""
    import shutil

    import jax.numpy as jnp

    from trainer import train as train_module

    workdir = tmp_path / "run"
    shutil.copytree(trained["workdir"], workdir)
    shutil.rmtree(workdir / "checkpoints" / "latest" / "4")  # as if run A had stopped after step 2
    compiled = train_module.compiled_functions

    def poisoned(spec, mesh):
        tx, graphdef, init, step = compiled(spec, mesh)

        def step_with_nan(state, batch):
            state, metrics = step(state, batch)
            if int(state.step) == 3:
                metrics = {**metrics, "loss": jnp.float32(jnp.nan)}
            return state, metrics

        return tx, graphdef, init, step_with_nan

    monkeypatch.setattr(train_module, "compiled_functions", poisoned)
    code = cli("train", "--workdir", str(workdir), "--database-url", trained["url"], "--steps", "4",
               "--batch-size", "4", "--base-filters", "4", "--depth", "2", "--eval-every", "2",
               "--checkpoint-every", "2")
    err = capsys.readouterr().err
    assert code == 1
    assert "training diverged at step 3: loss=nan" in err and "last good checkpoint (step 2)" in err
    assert "--lr" in err
    assert _latest_steps(workdir) == [2]
    assert not (workdir / "checkpoints" / "latest" / "4").exists()
    state = _restore_latest_params(workdir)
    assert int(state.step) == 2 and all(np.isfinite(x).all() for x in jax_leaves(state.params))


def test_two_devices_data_parallel(trained, tmp_path):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache")}
    common = ["--steps", "2", "--base-filters", "4", "--depth", "2", "--eval-every", "2"]
    refused = run_trainer("train", "--workdir", str(tmp_path / "odd"), "--batch-size", "3", *common,
                          database_url=trained["url"], env=env)
    assert refused.returncode == 2
    assert "--batch-size: 3 is not a multiple of the 2 local cpu devices" in refused.stderr
    with_password = trained["url"].replace("://postgres@", "://postgres:hunter2@")  # trust auth ignores it
    done = run_trainer("train", "--workdir", str(tmp_path / "dp"), "--batch-size", "4", *common,
                       database_url=with_password, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hunter2" not in done.stderr + done.stdout
    assert "hunter2" not in (tmp_path / "dp" / "config.json").read_text()
    config = json.loads((tmp_path / "dp" / "config.json").read_text())
    assert config["resolved"]["devices"] == 2
    losses = _train_losses(tmp_path / "dp")
    assert sorted(losses) == [2] and np.isfinite(losses[2])


# ------------------------------------------------------------------------------------------- evaluate


def test_evaluate_json_counts_every_sample(trained, capsys):
    code = cli("evaluate", "--workdir", str(trained["workdir"]), "--database-url", trained["url"], "--json",
               "--batch-size", "4")
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)  # exactly one JSON object on stdout
    assert set(result) == {"iou", "f1", "precision", "recall", "pixel_accuracy", "samples", "per_zoom",
                           "object_f1"}
    assert result["samples"] == SPLITS["test"] == trained["stats"]["rows"]["test"]
    assert set(result["per_zoom"]) == {"17", "18"}
    assert sum(z["samples"] for z in result["per_zoom"].values()) == SPLITS["test"]
    for metrics in [result, *result["per_zoom"].values()]:
        assert {"iou", "f1", "precision", "recall", "pixel_accuracy", "samples", "object_f1"} <= set(metrics)
        assert all(0.0 <= metrics[k] <= 1.0 for k in ("iou", "f1", "precision", "recall", "pixel_accuracy"))


def test_evaluate_table_and_split_and_zooms(trained, capsys):
    code = cli("evaluate", "--workdir", str(trained["workdir"]), "--database-url", trained["url"], "--split", "val",
               "--zooms", "17", "--batch-size", "4")
    out = capsys.readouterr().out
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split() == ["zoom", "samples", "iou", "f1", "precision", "recall", "pixel_accuracy", "object_f1"]
    assert lines[2].split()[:2] == ["val", "2"]  # val rows 0 and 2 are zoom 17
    assert lines[3].split()[0] == "z17" and len(lines) == 4


def test_evaluate_with_tta_counts_every_sample(trained, capsys):
    args = ("evaluate", "--workdir", str(trained["workdir"]), "--database-url", trained["url"], "--json",
            "--batch-size", "4")
    assert cli(*args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert cli(*args, "--tta") == 0
    tta = json.loads(capsys.readouterr().out)
    assert tta["samples"] == plain["samples"] == SPLITS["test"]
    assert 0.0 <= tta["iou"] <= 1.0 and 0.0 <= tta["object_f1"] <= 1.0


def test_evaluate_min_area_changes_the_object_count_only(trained, capsys):
    args = ("evaluate", "--workdir", str(trained["workdir"]), "--database-url", trained["url"], "--json",
            "--batch-size", "4")
    assert cli(*args) == 0  # the default: buildings under 20 pixels, true or predicted, left out
    plain = json.loads(capsys.readouterr().out)
    assert cli(*args, "--min-area", "0") == 0  # every component counted
    every = json.loads(capsys.readouterr().out)
    # larger than any tile: no building left on either side, nothing to find and nothing found
    assert cli(*args, "--min-area", str(256 * 256 + 1)) == 0
    none_kept = json.loads(capsys.readouterr().out)
    assert none_kept["object_f1"] == 1.0 and 0.0 <= every["object_f1"] <= 1.0
    for other in (every, none_kept):
        assert {k: other[k] for k in ("iou", "f1", "samples")} == {k: plain[k] for k in ("iou", "f1", "samples")}
    assert cli(*args, "--min-area", "-1") == 2
    assert "--min-area" in capsys.readouterr().err


def test_a_workdir_from_before_issue_11_still_evaluates_as_the_model_it_was(trained, tmp_path, capsys):
    """config.json written before the border output and residual blocks existed: read as the plain U-Net."""
    from trainer.train import train_and_evaluate

    workdir = tmp_path / "old"
    train_and_evaluate(tiny_config(trained["url"], steps=2, borders=False, residual=False), workdir)
    config = json.loads((workdir / "config.json").read_text())
    for key in ("borders", "residual", "border_weight", "border_dice_weight", "separation_weight", "lovasz_weight",
                "ema_decay"):
        del config[key]
    (workdir / "config.json").write_text(json.dumps(config))
    assert cli("evaluate", "--workdir", str(workdir), "--database-url", trained["url"], "--json") == 0
    assert json.loads(capsys.readouterr().out)["samples"] == SPLITS["test"]
    # resuming it with the other network is refused with a line naming the setting
    from trainer.errors import CheckpointError

    with pytest.raises(CheckpointError, match="borders=False"):
        train_and_evaluate(tiny_config(trained["url"], steps=4, borders=True, residual=False), workdir)


def test_a_run_with_ema_validates_saves_and_evaluates_its_moving_average(trained, tmp_path, capsys):
    from trainer.errors import CheckpointError
    from trainer.evaluate import restore_params, saved_train_config
    from trainer.steps import make_mesh
    from trainer.train import train_and_evaluate

    workdir = tmp_path / "ema"
    # one validation, at the last step: the best checkpoint is that step's
    train_and_evaluate(tiny_config(trained["url"], ema_decay=0.5, eval_every=4), workdir)
    state = _restore_latest_params(workdir)
    assert int(state.step) == 4 and int(state.opt_state[-1].count) == 4
    config = saved_train_config(workdir, trained["url"])
    assert config.ema_decay == 0.5
    mesh = make_mesh()
    _, best = restore_params(workdir, config, mesh)  # what evaluate and predict use
    _, latest_raw = restore_params(workdir, config, mesh, checkpoint="latest", ema=False)
    for b, e, r, p in zip(jax_leaves(best), jax_leaves(state.opt_state[-1].ema), jax_leaves(latest_raw),
                          jax_leaves(state.params)):
        np.testing.assert_array_equal(b, e)  # the best checkpoint holds the moving average
        np.testing.assert_array_equal(r, p)  # --checkpoint latest --no-ema: the parameters themselves
    assert any(not np.array_equal(e, p) for e, p in zip(jax_leaves(state.opt_state[-1].ema),
                                                        jax_leaves(state.params)))
    args = ("evaluate", "--workdir", str(workdir), "--database-url", trained["url"], "--json", "--batch-size", "4")
    assert cli(*args, "--checkpoint", "latest", "--no-ema") == 0
    assert json.loads(capsys.readouterr().out)["samples"] == SPLITS["test"]
    assert cli(*args, "--no-ema") == 2  # the best checkpoint has no raw parameters: one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-ema" in err[0] and "--checkpoint latest" in err[0]
    # the moving average lives in the optimizer state: resuming without it is refused, naming the flag
    with pytest.raises(CheckpointError, match="--ema-decay 0.5"):
        train_and_evaluate(tiny_config(trained["url"], steps=6), workdir)


def test_evaluation_matching_on_threads_gives_the_same_metrics(trained):
    from trainer.data import SampleStream
    from trainer.evaluate import restore_params, saved_train_config
    from trainer.steps import compile_eval_step, evaluate_stream, make_mesh

    config = saved_train_config(trained["workdir"], trained["url"])
    mesh = make_mesh(4)
    graphdef, params = restore_params(trained["workdir"], config, mesh)
    eval_fn = compile_eval_step(graphdef, mesh)
    with SampleStream(trained["url"], "test", None, 4, shuffle=False, pad_last=True, decode_workers=1) as stream:
        one, three = (evaluate_stream(eval_fn, params, stream, mesh, match_threads=n, min_area=0) for n in (1, 3))
    assert one == three and one["samples"] == SPLITS["test"]


def test_evaluate_without_checkpoint_is_a_clear_error(trained, tmp_path, capsys):
    (tmp_path / "config.json").write_text((trained["workdir"] / "config.json").read_text())
    code = cli("evaluate", "--workdir", str(tmp_path), "--database-url", trained["url"])
    assert code == 1
    assert "no checkpoint in" in capsys.readouterr().err
    assert cli("evaluate", "--workdir", str(tmp_path / "nothing"), "--database-url", trained["url"]) == 2
    assert "config.json not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- predict


def test_predict_from_an_image_with_geojson(trained, tmp_path):
    rng = np.random.default_rng(5)
    image, _ = synthetic_sample(rng)
    (tmp_path / "tile.png").write_bytes(_png(image))
    out, geojson = tmp_path / "mask.png", tmp_path / "buildings.geojson"
    assert cli("predict", "--workdir", str(trained["workdir"]), "--image", str(tmp_path / "tile.png"),
               "--tile", "18/132800/90200", "--out", str(out), "--geojson", str(geojson)) == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 255}
    collection = json.loads(geojson.read_text())
    assert collection["type"] == "FeatureCollection"
    bounds = mercantile.bounds(132800, 90200, 18)
    for feature in collection["features"]:
        for lon, lat in feature["geometry"]["coordinates"][0]:
            assert bounds.west - 1e-9 <= lon <= bounds.east + 1e-9 and bounds.south - 1e-9 <= lat <= bounds.north + 1e-9


def test_predict_refusals(trained, tmp_path, capsys):
    big = tmp_path / "big.png"
    big.write_bytes(_png(np.zeros((300, 200, 3), np.uint8)))
    workdir = str(trained["workdir"])
    assert cli("predict", "--workdir", workdir, "--image", str(big), "--out", str(tmp_path / "m.png")) == 1
    assert "is 200x300 pixels" in capsys.readouterr().err
    tile = tmp_path / "tile.png"
    tile.write_bytes(_png(np.zeros((256, 256, 3), np.uint8)))
    assert cli("predict", "--workdir", workdir, "--image", str(tile), "--out", str(tmp_path / "m.png"),
               "--geojson", str(tmp_path / "b.geojson")) == 2
    assert "--geojson: the tile of --image is unknown" in capsys.readouterr().err
    assert cli("predict", "--workdir", workdir, "--lon", "2.35", "--out", str(tmp_path / "m.png")) == 2
    assert "--lon: needs --lat and --zoom" in capsys.readouterr().err


def test_predict_from_lon_lat_fetches_the_tile(trained, tmp_path, monkeypatch):
    """--lon/--lat/--zoom: the tile comes from the configured provider (an xyz server on 127.0.0.1 here)."""
    import http.server
    import threading

    image, _ = synthetic_sample(np.random.default_rng(6))
    body = _png(image)
    requested = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            requested.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HARVESTER_TILE_PROVIDER", "xyz")
        monkeypatch.setenv("HARVESTER_TILE_URL", f"http://127.0.0.1:{server.server_port}/{{z}}/{{x}}/{{y}}.png")
        out, geojson = tmp_path / "mask.png", tmp_path / "b.geojson"
        assert cli("predict", "--workdir", str(trained["workdir"]), "--lon", "2.3522", "--lat", "48.8566",
                   "--zoom", "17", "--out", str(out), "--geojson", str(geojson)) == 0
    finally:
        server.shutdown()
    tile = mercantile.tile(2.3522, 48.8566, 17)
    assert requested == [f"/17/{tile.x}/{tile.y}.png"]
    assert json.loads(geojson.read_text())["properties"]["tile"] == f"17/{tile.x}/{tile.y}"
    assert np.asarray(Image.open(out)).shape == (256, 256)


# ------------------------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("args, env, expected", [
    (["train", "--workdir", "w", "--steps", "0"], {}, "argument --steps: expected a positive integer, got '0'"),
    (["train", "--workdir", "w", "--steps", "3", "--epochs", "1"], {}, "argument --epochs: not allowed with"),
    (["train", "--workdir", "w", "--zooms", "17,x"], {}, "argument --zooms: expected comma-separated"),
    (["train", "--workdir", "w", "--lr", "nan"], {}, "argument --lr: expected a finite number"),
    (["train", "--workdir", "w"], {"DATABASE_URL": "mysql://user:hunter2@db/tiles"}, "DATABASE_URL: expected"),
    (["train", "--workdir", "w", "--database-url", "nope://u:hunter2@h/d"], {}, "--database-url: expected"),
    (["evaluate", "--workdir", "w", "--split", "holdout"], {}, "argument --split: invalid choice"),
    (["train", "--workdir", "w", "--database-url", "postgresql://u@127.0.0.1:9/d", "--zoom-augment", "0.5"], {},
     "--zoom-augment: must be a number from 1 (off) to 2, got 0.5"),
    (["train", "--workdir", "w", "--lovasz-weight", "-1"], {}, "argument --lovasz-weight: expected a number >= 0"),
    (["predict", "--workdir", "w", "--image", "t.png", "--out", "m.png", "--min-area", "x"], {},
     "argument --min-area: expected an integer, got 'x'"),
])
def test_malformed_settings_exit_2_with_one_line(args, env, expected, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = cli(*args)
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and len(err.strip().splitlines()) == 1
    assert "hunter2" not in err


# ------------------------------------------------------------------------------------------- geo helpers (pure)


def test_tile_pixels_map_to_the_tile_bounds():
    from trainer.predict import pixels_to_lonlat

    tile = mercantile.Tile(132800, 90200, 18)
    bounds = mercantile.bounds(tile)
    corners = pixels_to_lonlat(np.array([[0.0, 0.0], [256.0, 256.0]]), tile)
    np.testing.assert_allclose(corners, [[bounds.west, bounds.north], [bounds.east, bounds.south]], atol=1e-9)


def test_mask_to_geojson_gives_one_polygon_per_building():
    from shapely.geometry import shape

    from trainer.predict import mask_to_geojson

    mask = np.zeros((256, 256), bool)
    mask[10:20, 30:50] = True
    mask[100:140, 100:104] = True
    tile = mercantile.Tile(66400, 45100, 17)
    collection = mask_to_geojson(mask, tile)
    assert sorted(f["properties"]["pixels"] for f in collection["features"]) == [160, 200]
    bounds = mercantile.bounds(tile)
    first = shape(next(f["geometry"] for f in collection["features"] if f["properties"]["pixels"] == 200))
    west, south, east, north = first.bounds
    pixel_deg = (bounds.east - bounds.west) / 256
    assert west == pytest.approx(bounds.west + 30 * pixel_deg) and east == pytest.approx(bounds.west + 50 * pixel_deg)
    assert north < bounds.north and south > bounds.south and first.is_valid
    kept = mask_to_geojson(mask, tile, min_area=161)["features"]  # predict --geojson --min-area 161
    assert [f["properties"]["pixels"] for f in kept] == [200]


def test_geojson_splits_touching_buildings_where_the_model_predicts_a_border_between_them():
    from shapely.geometry import shape

    from trainer.predict import mask_to_geojson

    mask = np.zeros((256, 256), bool)
    mask[40:60, 40:80] = True  # two 20x20 squares side by side: one blob in the mask
    border = np.zeros((256, 256), bool)
    border[40:60, 59:61] = True  # the model's border between them
    tile = mercantile.Tile(66400, 45100, 17)
    assert len(mask_to_geojson(mask, tile)["features"]) == 1
    assert len(mask_to_geojson(mask, tile, np.zeros_like(border))["features"]) == 1
    apart = mask_to_geojson(mask, tile, border)["features"]
    assert sorted(f["properties"]["pixels"] for f in apart) == [400, 400]  # the border shared out, nothing lost
    polygons = [shape(f["geometry"]) for f in apart]
    assert all(p.is_valid and len(p.exterior.coords) == 5 for p in polygons)  # squares stay 4 corners
    assert polygons[0].intersection(polygons[1]).area == pytest.approx(0, abs=1e-18)
