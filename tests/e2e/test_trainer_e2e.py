"""The trainer end to end on a synthetic world: samples in PostgreSQL -> ``trainer train`` -> ``trainer evaluate``,
each as the real command in its own process (``predict`` is covered by ``tests/integration/test_train.py``).

The world: textured, noisy ground with bright rectangular roofs and their shadows (see
``tests.integration.test_train.synthetic_sample``); masks are the same rectangles. A small U-Net trained for a
few dozen steps on a CPU must beat both trivial predictors by far on the held-out ``test`` split: all background
(IoU 0) and all building (IoU = the building share of the pixels).
"""

from __future__ import annotations

import json

import pytest

from tests.integration.test_train import insert_synthetic_world, run_trainer
from trainer.metrics import PixelCounts

pytestmark = pytest.mark.slow

SPLITS = {"train": 64, "val": 8, "test": 16}
# Sized for a 2-core CPU (well under 90 s idle): base 4, depth 3 (the 2.5 GFLOP/image of base 8 cut to about a
# quarter), 40 steps of 4 tiles (160 samples, 2.5 epochs), a high learning rate. It reaches a test IoU of about 0.76
# (deterministic on a given machine; base 8 gets 0.81 at 4x the compute). Most of the time left is compiling:
# ``evaluate`` runs at the batch size of training's validation, so it reuses the eval program that ``train``
# compiled (the two processes share the compilation cache).
BATCH = "4"
TRAIN_ARGS = ["--steps", "40", "--batch-size", BATCH, "--base-filters", "4", "--depth", "3", "--lr", "1e-2",
              "--eval-every", "20", "--checkpoint-every", "20", "--seed", "0"]


def test_trained_unet_beats_the_trivial_baselines(migrated_database_url, tmp_path):
    stats = insert_synthetic_world(migrated_database_url, SPLITS, seed=3)
    building, pixels = stats["building_pixels"], stats["pixels"]
    all_background = PixelCounts(tp=0, fp=0, fn=building, tn=pixels - building).scores()
    all_building = PixelCounts(tp=building, fp=pixels - building, fn=0, tn=0).scores()
    assert all_background["iou"] == 0.0
    assert all_building["iou"] == pytest.approx(building / pixels) and all_building["iou"] < 0.2

    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache")}
    workdir = tmp_path / "run"
    train = run_trainer("train", "--workdir", str(workdir), *TRAIN_ARGS, database_url=migrated_database_url,
                        env=env)
    assert train.returncode == 0, train.stderr[-3000:]

    evaluate = run_trainer("evaluate", "--workdir", str(workdir), "--json", "--batch-size", BATCH,
                           database_url=migrated_database_url, env=env)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    result = json.loads(evaluate.stdout)
    assert result["samples"] == SPLITS["test"]
    print(f"test IoU {result['iou']:.3f} F1 {result['f1']:.3f} object F1 {result['object_f1']:.3f}; baselines: "
          f"all background {all_background['iou']:.3f}, all building {all_building['iou']:.3f}")
    assert result["iou"] >= 0.6
    assert result["iou"] >= 10 * all_building["iou"]
    assert result["f1"] > max(all_background["f1"], all_building["f1"]) + 0.5
    for zoom in result["per_zoom"].values():
        assert zoom["iou"] >= 0.5
