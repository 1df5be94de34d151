"""The data `bench/gpu_report.py --prepare` makes here for a GPU host, and what that host loads from it: the Dubai
masks reduced to the building colour, and Kampala harvested here (PostGIS) and loaded there into a plain table
(no PostGIS) that the trainer's input pipeline reads as it reads the harvested database."""

from __future__ import annotations

import asyncio
import io
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import gpu_report
from tests.databases import ADMIN_URL, admin
from tests.processes import alive, children, wait_gone
from trainer.data import SampleStream

DUBAI_BUILDING_RGB = (60, 16, 152)  # shared/data/README.md
REPO_ROOT = Path(__file__).resolve().parents[2]


def building(path) -> np.ndarray:
    with Image.open(path) as f:
        return (np.asarray(f.convert("RGB")) == DUBAI_BUILDING_RGB).all(axis=-1)


def test_dubai_masks_travel_as_their_building_pixels(shared_data, tmp_path):
    source = shared_data / "dubai-aerial"
    if not source.is_dir():
        pytest.skip(f"dubai-aerial not present at {source}")
    one = tmp_path / "one" / "Tile_8"
    for kind in ("images", "masks"):
        (one / kind).mkdir(parents=True)
    for name, kind in (("image_part_001.jpg", "images"), ("image_part_001.png", "masks")):
        (one / kind / name).write_bytes((source / "Tile_8" / kind / name).read_bytes())

    gpu_report.copy_dubai(tmp_path / "one", tmp_path / "out")

    out = tmp_path / "out" / "Tile_8"
    assert (out / "images" / "image_part_001.jpg").read_bytes() == (one / "images" / "image_part_001.jpg").read_bytes()
    original, compact = one / "masks" / "image_part_001.png", out / "masks" / "image_part_001.png"
    assert building(original).any()
    np.testing.assert_array_equal(building(compact), building(original))
    assert compact.stat().st_size < original.stat().st_size / 3
    # what the GPU host cuts from it: the same crops and building pixels as from the original mask
    crops = gpu_report.dubai_crops(out / "images" / "image_part_001.jpg", compact)
    expected = building(original)
    assert [(top, left, pixels) for top, left, _, _, pixels in crops] == [
        (top, left, int(expected[top:top + 256, left:left + 256].sum())) for top, left, _, _, _ in crops]


def test_lossless_webp_keeps_every_pixel():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (256, 256, 4), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(png, "PNG")
    webp = gpu_report.lossless_webp(png.getvalue())
    with Image.open(io.BytesIO(webp)) as back:
        assert back.format == "WEBP"
        np.testing.assert_array_equal(np.asarray(back.convert("RGB")), rgba[..., :3])


@pytest.fixture(scope="module")
def kampala_export(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    root = SHARED_DATA / "kampala-oam"
    if not (root / "labels.geojson").is_file():
        pytest.skip(f"kampala-oam not present at {root}")
    folder = tmp_path_factory.mktemp("gpu-data") / "kampala"
    return root, folder, gpu_report.export_kampala(root, folder)


@pytest.fixture
def kampala_database(kampala_export):
    _, folder, _ = kampala_export
    name = f"tilesmith_test_gpu_kampala_{os.getpid()}"
    try:
        yield gpu_report.load_samples(ADMIN_URL, folder, name,
                                      split_of=lambda split: "train" if split == "val" else split)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.mark.slow
def test_kampala_harvested_here_is_read_there_as_harvested(kampala_export, kampala_database):
    root, folder, count = kampala_export
    assert count == 147

    samples = json.loads((folder / "samples.json").read_text())
    assert sorted({s["split"] for s in samples}) == ["test", "train", "val"]
    assert sum(s["split"] == "test" for s in samples) == 21
    by_tile = {}
    for i, s in enumerate(samples):
        # every tile's pixels as the source file holds them (PNG tiles travel as lossless WebP, JPEGs unchanged)
        source = (root / f"OAM-{s['tile_x']}-{s['tile_y']}-{s['zoom']}.png").read_bytes()
        with Image.open(io.BytesIO(source)) as f:
            expected = np.asarray(f.convert("RGB"))
        assert s["image_format"] == ("jpeg" if source[:2] == b"\xff\xd8" else "webp")
        by_tile[(s["zoom"], s["tile_x"], s["tile_y"])] = (i, expected)
        assert (folder / f"{i}.instances").is_file()  # harvested samples carry their instance maps

    for split, count in (("train", 126), ("test", 21)):
        with SampleStream(kampala_database, split, None, 8, shuffle=False, pad_last=True, decode_workers=1,
                          borders=True) as stream:
            assert len(stream) == count
            seen = 0
            for batch in stream.epoch(0):
                for k in np.flatnonzero(batch.valid):
                    s = samples[int(batch.sample_ids[k]) - 1]  # sample ids follow the export's order
                    i, expected = by_tile[(s["zoom"], s["tile_x"], s["tile_y"])]
                    np.testing.assert_array_equal(batch.images[k], expected)
                    assert int(batch.masks[k].sum()) == s["building_pixels"]
                    seen += 1
            assert seen == count and stream.skipped == 0


@pytest.mark.slow
def test_the_quality_run_trains_and_measures_a_recipe(kampala_database):
    """The GPU session's quality run, at toy sizes on the CPU: a recipe trained once per seed, its test metrics at the
    end and along the run, with the small predictions left out, and on its own training crops."""
    recipes = gpu_report.recipe_options(["today"])  # the residual recipes add TTA: tested with `evaluate --tta`
    # a run that fails (here: an option TrainConfig does not know) is reported, the others go on
    broken = [("broken", {**dict(recipes)["today"], "no_such_option": 1})]
    failures = []
    # seed 1 named with the recipe (NAME@SEED) instead of by --seeds
    row, other = gpu_report.quality_run({"grid": kampala_database},
                                        broken + gpu_report.recipe_options(["today", "today@1"]), base=4, depth=2,
                                        batch=4, steps=4, workers=1, lr=1e-3, curve_every=2, seeds=(0,),
                                        failures=failures)
    assert [(f["recipe"], f["seed"]) for f in failures] == [("broken", 0)] and "no_such_option" in failures[0]["error"]

    assert (row["seed"], other["seed"], other["recipe"]) == (0, 1, "today")
    # another initialisation, order and augmentation: another model
    assert any(row[key] != other[key] for key in ("test_iou", "test_precision", "train_iou", "train_pixel_accuracy"))
    assert row["recipe"] == "today" and row["options"]["residual"] is False and "tta_test_iou" not in row
    assert row["steps"] == 4 and row["train_samples"] == 126 and row["test_samples"] == 21
    assert row["train_s"] > 0 and 0 <= row["data_wait_fraction"] < 1
    assert row["first_step_s"] > 0 and row["eval_s"] > 0  # the compile and the evaluations are not in train_s
    assert row["first_step_s"] + row["train_s"] + row["eval_s"] == pytest.approx(row["seconds"])
    assert [point["step"] for point in row["curve"]] == [2]  # every 2 steps before the last
    assert row["curve"][0]["samples"] == 21  # the whole test split
    assert 0 <= row["test_iou"] <= 1 and 0 <= row["test_object_f1"] <= 1
    assert 0 <= row["train_iou"] <= 1 and "train_object_f1" not in row  # the training crops' pixels only
    for area in gpu_report.MIN_AREAS:
        assert 0 <= row[f"test_object_f1_min_area_{area}"] <= 1
    assert set(row["eval_passes_s"]) == {"train", "test"} and row["curve"][0]["seconds"] > 0

    # --parallel 2: the same two runs at once (seeds 0 and 1 by --seeds), each in a process of its own: the same
    # models, the rows in order; the failed runs reported as one at a time
    failures = []
    rows = gpu_report.quality_run({"grid": kampala_database}, broken + recipes, base=4, depth=2, batch=4, steps=4,
                                  workers=2, lr=1e-3, curve_every=2, seeds=(0, 1), parallel=2, failures=failures)
    assert sorted((f["recipe"], f["seed"]) for f in failures) == [("broken", 0), ("broken", 1)]  # as they end
    assert all("no_such_option" in f["error"] for f in failures)
    assert [r["seed"] for r in rows] == [0, 1] and {r["recipe"] for r in rows} == {"today"}
    for alone, together in zip((row, other), rows):
        for key in ("test_iou", "test_precision", "test_object_f1", "train_iou", "train_pixel_accuracy"):
            assert together[key] == alone[key], key
        assert together["curve"][0]["iou"] == alone["curve"][0]["iou"]


@pytest.mark.slow
def test_a_run_whose_process_dies_is_reported_and_the_others_finish(kampala_database):
    """--parallel: a run killed without a word (SIGKILL, a crash) closes its pipe: it is reported as failed at once,
    not waited for, and the other run finishes."""
    killed = []

    def kill_the_first_run():
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for process in multiprocessing.active_children():
                if process.name == "run-0" and process.pid:
                    os.kill(process.pid, signal.SIGKILL)
                    killed.append(process.pid)
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_first_run)
    killer.start()
    failures = []
    try:
        rows = gpu_report.quality_run({"grid": kampala_database}, gpu_report.recipe_options(["today"]), base=4,
                                      depth=2, batch=4, steps=2, workers=2, lr=1e-3, seeds=(0, 1), parallel=2,
                                      failures=failures)
    finally:
        killer.join()
    assert killed
    assert failures == [{"recipe": "today", "seed": 0, "error": "its process died (exit code -9)"}]
    assert [row["seed"] for row in rows] == [1]
    broken = [("broken", {"residual": False, "no_such_option": 1})]
    with pytest.raises(RuntimeError, match="no_such_option"):  # without a list of failures, a failure raises
        gpu_report.quality_run({"grid": kampala_database}, broken, base=4, depth=2, batch=4, steps=2, workers=2,
                               lr=1e-3, parallel=2)
    with pytest.raises(TypeError, match="no_such_option"):  # one at a time: the error itself
        gpu_report.quality_run({"grid": kampala_database}, broken, base=4, depth=2, batch=4, steps=2, workers=2,
                               lr=1e-3)


def run_processes(pid: int, skip: int | None) -> list[int]:
    """The descendants of ``pid``, leaving out ``skip`` and its own (the server's)."""
    found = [child for child in children(pid) if child != skip]
    return found + [d for child in found for d in run_processes(child, skip)]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [1, 2])
def test_sigterm_stops_the_run_its_workers_and_its_postgres(shared_data, parallel):
    """What ``timeout`` in bench/gpu_session.sh sends: the run ends with 143 and one line, its embedded PostgreSQL is
    stopped and its data deleted, its decode workers leave (the default action left the server running); with
    ``--parallel 2``, the runs' processes and their decode workers leave too."""
    data = shared_data / "dubai-aerial"
    if not data.is_dir():
        pytest.skip(f"dubai-aerial not present at {data}")
    root = Path(tempfile.mkdtemp(prefix="gr", dir="/tmp"))  # short: the server's socket lives in its data folder
    log = root / "log"
    postmaster = None
    try:
        with log.open("w") as out:
            run = subprocess.Popen([sys.executable, "bench/gpu_report.py", "--quality", "--quick", "--data", str(data),
                                    "--parallel", str(parallel), "--recipes", "today,residual"],
                                   cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(root)})
        deadline = time.monotonic() + 180
        # postgres up, the data loaded, the training streams' decode workers started (the steps still compiling):
        # the server and, per run, its decode workers (and with --parallel, the runs' processes)
        while True:
            assert run.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            if "postgres up" in log.read_text():
                pgdata = next(root.glob("tilesmith-gpu-report-*/pgdata"))
                postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
                others = [pid for pid in children(run.pid) if pid != postmaster]
                if parallel == 1 and others or sum(bool(children(pid)) for pid in others) >= parallel > 1:
                    break
            time.sleep(0.1)
        workers = run_processes(run.pid, postmaster)
        assert alive(postmaster) and workers
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 143
        output = log.read_text()
        assert "gpu_report: terminated (SIGTERM)" in output and "Traceback" not in output
        assert "leaked" not in output  # the runs' processes ran their exit handlers (multiprocessing's own)
        assert wait_gone([postmaster, *workers]) == []
        assert not pgdata.exists()
    finally:
        if run.poll() is None:
            run.kill()
        if postmaster is not None and alive(postmaster):  # a failed run must not leave its server behind
            os.kill(postmaster, signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)
