"""The report's pieces without a database: the best/worst ranking kept while a split streams, and the curves."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
from PIL import Image

from trainer.report import TileRanking, plot_curves


def _batch(ids: list[int], counts: list[tuple[int, int, int]], valid: list[bool] | None = None):
    n = len(ids)
    images = np.zeros((n, 256, 256, 3), np.uint8)
    images[:, 0, 0, 0] = np.array(ids) % 256  # tells the tiles apart
    batch = SimpleNamespace(images=images, masks=np.zeros((n, 256, 256), np.uint8),
                            valid=np.array(valid if valid is not None else [True] * n), sample_ids=np.array(ids),
                            zooms=np.full(n, 18))
    full = [(tp, fp, fn, 65536 - tp - fp - fn) for tp, fp, fn in counts]
    return batch, {"counts": np.array(full, np.int32), "predicted": np.zeros((n, 256, 256), bool)}


def test_ranking_keeps_the_k_best_and_worst_of_a_stream():
    ranking = TileRanking(k=2)
    rng = np.random.default_rng(0)
    expected = {}
    for start in range(0, 40, 4):  # 10 batches of 4
        ids = list(range(start, start + 4))
        counts = [tuple(int(v) for v in rng.integers(1, 500, 3)) for _ in ids]
        ranking(*_batch(ids, counts))
        expected.update({i: c[0] / sum(c) for i, c in zip(ids, counts)})
    by_iou = sorted(expected, key=expected.get)
    assert [t.sample_id for t in ranking.best()] == by_iou[::-1][:2]
    assert [t.sample_id for t in ranking.worst()] == by_iou[:2]
    assert ranking.ranked == 40
    for tile in ranking.best() + ranking.worst():
        assert tile.image[0, 0, 0] == tile.sample_id % 256 and tile.iou == expected[tile.sample_id]
        assert tile.image.base is None or tile.image.base.shape == (256, 256, 3)  # a copy, not a view of a batch


def test_ranking_skips_padding_and_tiles_with_nothing_to_find_and_breaks_ties():
    ranking = TileRanking(k=2)
    ranking(*_batch([1, 2, 3, 4, 5], [(0, 0, 0), (10, 0, 0), (5, 0, 0), (0, 9, 1), (0, 3, 0)],
                    valid=[True, True, True, True, True]))
    ranking(*_batch([6, -1], [(0, 0, 50), (0, 0, 999)], valid=[True, False]))
    assert ranking.ranked == 5  # 1 (nothing to find, nothing found) and the padding row are not ranked
    assert [t.sample_id for t in ranking.best()] == [2, 3]  # IoU 1 both: more true positives first
    assert [t.sample_id for t in ranking.worst()] == [6, 4]  # IoU 0: more wrong pixels first


def test_curves_from_the_metrics_log(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0 / s}) for s in range(1, 41)]
    lines += [json.dumps({"kind": "val", "step": s, "iou": s / 50, "f1": s / 45}) for s in (10, 20, 30, 40)]
    lines += ["not json", json.dumps({"kind": "train", "step": 41, "loss": float("nan")})]
    log.write_text("\n".join(lines) + "\n")
    path = plot_curves(log, tmp_path / "curves.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (900, 320)
        pixels = np.asarray(png.convert("RGB")).astype(int)
    blue = (np.abs(pixels - (0x1F, 0x6F, 0xB4)).sum(axis=2) < 60).sum()  # the loss line
    green = (np.abs(pixels - (0x0A, 0x8F, 0x5A)).sum(axis=2) < 60).sum()  # the IoU line and markers
    assert blue > 200 and green > 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]  # no temporary left


def test_curves_without_a_log_still_make_a_picture(tmp_path):
    path = plot_curves(tmp_path / "missing.jsonl", tmp_path / "curves.png")
    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.shape == (320, 900, 3) and pixels.std() > 5  # axes and the "no record" notes
