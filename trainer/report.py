"""``trainer evaluate --report OUT``: a report a person opens in a browser, straight from disk (no server, nothing
from the network; one inline script only counts the images loaded, for a test to read).

``OUT/`` holds ``index.html`` (the metrics overall and per zoom, the curves, the tiles), ``curves.png`` (training loss
and validation IoU/F1 against step, from the work directory's ``metrics.jsonl``; matplotlib) and, for the best and
the worst tiles of the split by IoU, four small pictures each: the tile (``*-image.jpg``), the truth and the
prediction (white buildings on black, ``*-truth.png``, ``*-prediction.png``) and the confusion (``*-confusion.png``:
true positives, false positives, false negatives in three colours over the dimmed tile; :mod:`harvester.overlay`).

Tiles are ranked while the split streams through evaluation (:class:`TileRanking`): only the ``k`` best and ``k``
worst are held, whatever the split's size. A tile with no building in the truth nor in the prediction has IoU 1 by the
metrics' rule and says nothing about the model: it is not ranked. Ties: the best are those with more true positive
pixels, the worst those with more wrong pixels.
"""

from __future__ import annotations

import heapq
import html
import itertools
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from harvester.overlay import FN_COLOUR, FP_COLOUR, TP_COLOUR, confusion_picture, save_png

from .errors import ConfigError, TrainerError
from .evaluate import evaluate

log = logging.getLogger(__name__)

TILES_SHOWN = 6  # best and worst each
JPEG_QUALITY = 88
METRIC_COLUMNS = ("samples", "iou", "f1", "precision", "recall", "pixel_accuracy", "object_f1")


@dataclass(frozen=True)
class RankedTile:
    sample_id: int
    zoom: int
    iou: float
    tp: int
    fp: int
    fn: int
    image: np.ndarray  # uint8 [256, 256, 3]
    truth: np.ndarray  # bool [256, 256]
    predicted: np.ndarray  # bool [256, 256]


class TileRanking:
    """The ``k`` best and ``k`` worst tiles by IoU of the batches it observes (an ``observe`` hook of evaluate)."""

    def __init__(self, k: int = TILES_SHOWN):
        self.k = k
        self._best: list = []  # min-heaps of (key, tie, tile): the root is the first to go
        self._worst: list = []
        self._tie = itertools.count()
        self.ranked = 0

    def __call__(self, batch, outputs: dict) -> None:
        counts, predicted = np.asarray(outputs["counts"]), outputs["predicted"]
        for i in np.flatnonzero(batch.valid):
            tp, fp, fn, _tn = (int(c) for c in counts[i])
            if tp + fp + fn == 0:
                continue
            self.ranked += 1
            iou = tp / (tp + fp + fn)
            best_key, worst_key = (iou, tp), (-iou, fp + fn)
            keep_best = len(self._best) < self.k or best_key > self._best[0][0]
            keep_worst = len(self._worst) < self.k or worst_key > self._worst[0][0]
            if not (keep_best or keep_worst):
                continue
            tile = RankedTile(int(batch.sample_ids[i]), int(batch.zooms[i]), iou, tp, fp, fn,
                              np.array(batch.images[i]), np.asarray(batch.masks[i]) != 0,
                              np.array(predicted[i], dtype=bool))  # copies: the batch is not kept alive
            for heap, key, keep in ((self._best, best_key, keep_best), (self._worst, worst_key, keep_worst)):
                if keep:
                    entry = (key, next(self._tie), tile)
                    if len(heap) < self.k:
                        heapq.heappush(heap, entry)
                    else:
                        heapq.heapreplace(heap, entry)

    def best(self) -> list[RankedTile]:
        """Highest IoU first."""
        return [tile for _, _, tile in sorted(self._best, key=lambda e: (e[0], -e[1]), reverse=True)]

    def worst(self) -> list[RankedTile]:
        """Lowest IoU first."""
        return [tile for _, _, tile in sorted(self._worst, key=lambda e: (e[0], -e[1]), reverse=True)]


def evaluate_with_report(workdir: Path | str, database_url: str, *, report: Path | str, split: str = "test",
                         **options) -> dict:
    """:func:`trainer.evaluate.evaluate`, and its report written into the folder ``report``; returns the metrics."""
    out = Path(report)
    try:  # before the evaluation, which may take long: a folder that cannot be made is refused at once
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--report: cannot create the folder {out}: {exc.strerror or exc}") from None
    ranking = TileRanking()
    result = evaluate(workdir, database_url, split=split, observe=ranking, **options)
    try:
        index = write_report(out, result, ranking, workdir=Path(workdir), split=split)
    except OSError as exc:
        raise TrainerError(f"--report: cannot write the report into {out}: {exc}") from exc
    log.info("report: %s", index)
    return result


def write_report(out: Path, result: dict, ranking: TileRanking, *, workdir: Path, split: str) -> Path:
    """Write ``out/index.html`` and its pictures; return the page's path."""
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(workdir / "metrics.jsonl", out / "curves.png")
    sections = []
    for name, title, tiles in (("best", "Best tiles", ranking.best()), ("worst", "Worst tiles", ranking.worst())):
        rows = [_tile_row(out, f"{name}-{rank}", tile) for rank, tile in enumerate(tiles, 1)]
        body = "".join(rows) if rows else '<tr><td colspan="5">no tile with buildings in truth or prediction</td></tr>'
        sections.append(f"<h2>{title} by IoU</h2>\n<table class=\"tiles\">\n<tr><th></th><th>image</th>"
                        f"<th>truth</th><th>prediction</th><th>TP / FP / FN</th></tr>\n{body}</table>")
    page = _PAGE.format(
        title=html.escape(f"tilesmith evaluation: {workdir.name}, split {split}"),
        workdir=html.escape(str(workdir.resolve())), split=html.escape(split),
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        metrics=_metrics_table(result, split), ranked=ranking.ranked, k=ranking.k,
        tp=_swatch(TP_COLOUR), fp=_swatch(FP_COLOUR), fn=_swatch(FN_COLOUR), tiles="\n".join(sections),
    )
    index = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)
    return index


def plot_curves(metrics_log: Path, path: Path) -> Path:
    """Training loss and validation IoU/F1 against step, as a PNG (an empty-state figure when nothing was logged)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    train, val = _read_log(metrics_log)
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100, layout="constrained")
    try:
        if train:
            left.plot([r["step"] for r in train], [r["loss"] for r in train], color="#1f6fb4", lw=1.2)
        left.set(title="training loss", xlabel="step", ylabel="BCE + Dice")
        for key, colour in (("iou", "#0a8f5a"), ("f1", "#c46a00")):
            points = [(r["step"], r[key]) for r in val if key in r]
            if points:
                right.plot(*zip(*points), marker="o", ms=3, lw=1.2, color=colour, label=key.upper())
        right.set(title="validation", xlabel="step", ylim=(0, 1))
        if val:
            right.legend(loc="lower right")
        for axes, records, what in ((left, train, "training"), (right, val, "validation")):
            axes.grid(alpha=0.3)
            if not records:
                axes.text(0.5, 0.5, f"no {what} record in\n{metrics_log.name}", ha="center", va="center",
                          transform=axes.transAxes, color="#666666")
        tmp = path.with_name(f".{path.name}.tmp")
        figure.savefig(tmp, format="png")
        tmp.replace(path)
    finally:
        plt.close(figure)
    return path


def _read_log(metrics_log: Path) -> tuple[list[dict], list[dict]]:
    """The ``train`` records with a finite loss and the ``val`` records, by step; bad lines are skipped."""
    train, val = [], []
    try:
        lines = metrics_log.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        if record.get("kind") == "train" and np.isfinite(record.get("loss", np.nan)):
            train.append(record)
        elif record.get("kind") == "val":
            val.append(record)
    return sorted(train, key=lambda r: r["step"]), sorted(val, key=lambda r: r["step"])


def _tile_row(out: Path, stem: str, tile: RankedTile) -> str:
    Image.fromarray(tile.image).save(out / f"{stem}-image.jpg", format="JPEG", quality=JPEG_QUALITY)
    save_png(Image.fromarray(tile.truth).convert("1"), out / f"{stem}-truth.png")
    save_png(Image.fromarray(tile.predicted).convert("1"), out / f"{stem}-prediction.png")
    save_png(confusion_picture(tile.image, tile.truth, tile.predicted), out / f"{stem}-confusion.png")
    caption = (f"#{tile.sample_id}<br>z{tile.zoom}<br>IoU {tile.iou:.3f}<br>"
               f"TP {tile.tp}<br>FP {tile.fp}<br>FN {tile.fn}")
    cells = "".join(f'<td><img src="{stem}-{part}" width="256" height="256" alt="{part.split(".")[0]}"></td>'
                    for part in ("image.jpg", "truth.png", "prediction.png", "confusion.png"))
    return f'<tr><td class="caption">{caption}</td>{cells}</tr>\n'


def _metrics_table(result: dict, split: str) -> str:
    header = "".join(f"<th>{c}</th>" for c in ("", *METRIC_COLUMNS))
    rows = [(split, result)] + [(f"zoom {z}", m) for z, m in result["per_zoom"].items()]
    body = "".join(
        f"<tr><th>{html.escape(name)}</th>"
        + "".join(f"<td>{m[c]:d}</td>" if c == "samples" else f"<td>{m[c]:.4f}</td>" for c in METRIC_COLUMNS)
        + "</tr>\n" for name, m in rows)
    return f'<table class="metrics">\n<tr>{header}</tr>\n{body}</table>'


def _swatch(colour: tuple[int, int, int]) -> str:
    return f'<span class="swatch" style="background: rgb{tuple(colour)}"></span>'


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }}
table {{ border-collapse: collapse; }}
.metrics td, .metrics th {{ padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }}
.tiles td {{ padding: 3px; vertical-align: top; }}
.tiles th {{ font-weight: normal; color: #555; }}
.caption {{ font-size: 13px; min-width: 90px; }}
.swatch {{ display: inline-block; width: 14px; height: 14px; vertical-align: middle; margin: 0 4px 0 12px; }}
.muted {{ color: #666; font-size: 14px; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p class="muted">work directory {workdir}; split {split}; written {generated}</p>
<h2>Metrics</h2>
<p class="muted">Over all pixels of all samples (building class), overall and per zoom.</p>
{metrics}
<h2>Training</h2>
<img src="curves.png" alt="training loss and validation IoU against step">
<p class="muted">The {k} best and {k} worst of the {ranked} tiles with buildings in the truth or the prediction.
Colours: {tp}true positive {fp}false positive {fn}false negative</p>
{tiles}
<script>
window.addEventListener("load", function () {{
  var loaded = 0;
  for (var i = 0; i < document.images.length; i++) {{
    if (document.images[i].complete && document.images[i].naturalWidth > 0) loaded++;
  }}
  document.body.setAttribute("data-images-loaded", loaded + "/" + document.images.length);
}});
</script>
</body>
</html>
"""
