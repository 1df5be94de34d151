"""``trainer evaluate --report`` and ``trainer predict --overlay`` on a U-Net trained on a synthetic world in a real
database: the report's pictures decode, have the right sizes, are not blank and show what the database and the model
say; the page opens from disk in headless Chromium with every image loaded; the overlay outlines the prediction."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from harvester.overlay import FN_COLOUR, FP_COLOUR, OUTLINE_COLOUR, TP_COLOUR
from tests.databases import fetch
from tests.integration.test_train import SPLITS, cli, trained  # noqa: F401 (a fixture)
from harvester.decode import decode_image, decode_mask
from trainer.report import TILES_SHOWN

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[dict] = []
        self.captions: list[str] = []
        self._in_caption = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        self._in_caption = tag == "td" and attrs.get("class") == "caption" or (self._in_caption and tag == "br")
        if tag == "td" and attrs.get("class") == "caption":
            self.captions.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_caption = False

    def handle_data(self, data):
        if self._in_caption:
            self.captions[-1] += data + " "


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli("evaluate", "--workdir", str(trained["workdir"]), "--database-url", trained["url"], "--json",
                   "--batch-size", "4", "--report", str(out))
    assert code == 0
    page = _Page()
    page.feed((out / "index.html").read_text())
    return {"out": out, "result": json.loads(stdout.getvalue()), "page": page}


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _tiles(report) -> list[dict]:
    """The tiles of the page in order (best ones, then worst ones): their caption figures and pictures."""
    images = [i["src"] for i in report["page"].images if i["src"] != "curves.png"]
    tiles = []
    for k, caption in enumerate(report["page"].captions):
        numbers = dict(re.findall(r"(#|z|IoU|TP|FP|FN) ?([\d.]+)", caption))
        srcs = images[4 * k:4 * k + 4]
        tiles.append({"sample_id": int(numbers["#"]), "zoom": int(numbers["z"]), "iou": float(numbers["IoU"]),
                      "tp": int(numbers["TP"]), "fp": int(numbers["FP"]), "fn": int(numbers["FN"]),
                      "kind": srcs[0].split("-")[0], "srcs": srcs})
    return tiles


def test_the_report_holds_the_metrics_the_curves_and_the_best_and_worst_tiles(trained, report):
    out, result = report["out"], report["result"]
    assert result["samples"] == SPLITS["test"]  # --json still prints the metrics alone on stdout
    page = (out / "index.html").read_text()
    assert f"{result['iou']:.4f}" in page and all(f"zoom {z}" in page for z in result["per_zoom"])
    # one folder, relative paths, nothing from the network
    srcs = [i["src"] for i in report["page"].images]
    assert all("/" not in s and ":" not in s for s in srcs)
    assert sorted(srcs) == sorted(p.name for p in out.iterdir() if p.name != "index.html")
    assert "http" not in page.replace("http-equiv", "")

    curves = _png(out / "curves.png")
    assert curves.shape == (320, 900, 3) and curves.std() > 20
    assert (curves < 128).all(axis=2).sum() > 2000  # axes, text and lines drawn on the white figure

    tiles = _tiles(report)
    best, worst = [t for t in tiles if t["kind"] == "best"], [t for t in tiles if t["kind"] == "worst"]
    assert 1 <= len(best) == len(worst) <= TILES_SHOWN
    assert [t["iou"] for t in best] == sorted((t["iou"] for t in best), reverse=True)
    assert [t["iou"] for t in worst] == sorted(t["iou"] for t in worst)
    assert best[0]["iou"] >= worst[0]["iou"]


def test_the_tiles_show_the_stored_sample_its_truth_and_a_consistent_confusion(trained, report):
    out = report["out"]
    for tile in _tiles(report):
        image, truth, prediction, confusion = (_png(out / s) for s in tile["srcs"])
        for picture in (image, truth, prediction, confusion):
            assert picture.shape == (256, 256, 3)
        (row,) = fetch(trained["url"], "SELECT image, mask, zoom FROM dataset WHERE sample_id = $1", tile["sample_id"])
        stored = decode_image(row["image"]).astype(int)
        assert row["zoom"] == tile["zoom"]
        assert np.abs(image.astype(int) - stored).mean() < 3 and image.std() > 10  # the tile (as a JPEG)
        truth, predicted = truth[..., 0] == 255, prediction[..., 0] == 255
        assert np.array_equal(truth, decode_mask(row["mask"]) == 1)
        tp, fp, fn = (int(x.sum()) for x in (truth & predicted, ~truth & predicted, truth & ~predicted))
        assert (tp, fp, fn) == (tile["tp"], tile["fp"], tile["fn"])
        assert tile["iou"] == pytest.approx(tp / (tp + fp + fn), abs=5e-4)
        for colour, where in ((TP_COLOUR, truth & predicted), (FP_COLOUR, ~truth & predicted),
                              (FN_COLOUR, truth & ~predicted)):
            assert np.array_equal((confusion == colour).all(axis=2), where)
        rest = confusion[~(truth | predicted)]
        assert (rest[:, 0] == rest[:, 2]).all() and rest.std() > 5  # the dimmed grey tile under the colours


def test_the_prediction_shown_is_the_models(trained, report):
    from trainer.predict import Predictor

    model = Predictor(trained["workdir"])
    for tile in _tiles(report)[:3]:
        (row,) = fetch(trained["url"], "SELECT image FROM dataset WHERE sample_id = $1", tile["sample_id"])
        shown = _png(report["out"] / tile["srcs"][2])[..., 0] == 255
        assert (model(decode_image(row["image"]))[0] == shown).mean() > 0.999  # batch size may move a logit across 0


def test_the_page_renders_from_disk_in_headless_chromium_with_every_image(report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium package is not installed (scripts/test.sh installs it)")
    url = (report["out"] / "index.html").resolve().as_uri()

    def run(*args: str) -> subprocess.CompletedProcess:
        profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
        return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                               "--virtual-time-budget=10000", *args, url],
                              capture_output=True, text=True, timeout=120)

    dom = run("--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = len(report["page"].images)
    assert images == 1 + 4 * len(_tiles(report))
    assert f'data-images-loaded="{images}/{images}"' in dom.stdout

    shot = tmp_path / "shot.png"
    done = run(f"--screenshot={shot}", "--window-size=1280,1600")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    picture = _png(shot)
    assert picture.shape == (1600, 1280, 3)
    assert picture.std() > 30 and len(np.unique(picture.reshape(-1, 3), axis=0)) > 1000  # text, curves, tiles


def test_predict_overlay_outlines_the_predicted_buildings(trained, tmp_path):
    (row,) = fetch(trained["url"], "SELECT image FROM dataset WHERE split = 'test' ORDER BY building_pixels DESC"
                                   " LIMIT 1")
    tile = decode_image(row["image"])
    source = tmp_path / "tile.png"
    Image.fromarray(tile).save(source)
    mask_path, overlay_path = tmp_path / "mask.png", tmp_path / "overlay.png"
    assert cli("predict", "--workdir", str(trained["workdir"]), "--image", str(source), "--out", str(mask_path),
               "--overlay", str(overlay_path)) == 0
    mask = _png(mask_path)[..., 0] == 255
    overlay = _png(overlay_path)
    assert overlay.shape == (256, 256, 3)
    assert 0 < mask.sum() < mask.size  # the model draws some buildings, not everything
    border = mask & ~ndimage.binary_erosion(mask, border_value=1)
    assert (overlay[border] == OUTLINE_COLOUR).all()
    assert np.array_equal(overlay[~mask], tile[~mask])
    assert cli("predict", "--workdir", str(trained["workdir"]), "--image", str(source), "--out", str(mask_path),
               "--overlay", str(tmp_path / "missing" / "o.png")) == 2
