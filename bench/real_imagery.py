"""Real imagery through the trainer (issue 3, "Proof"): load or harvest a real data set into a fresh database, train
a small U-Net for a bounded time, evaluate it on ``test`` and print one line of figures next to the trivial baselines
(all background: IoU 0; all building: IoU = the building share of the test pixels).

    python -m bench.real_imagery dubai|kampala [--minutes 8] [--base-filters 8] [--depth 4] [--batch-size 8]
                                 [--train-args="--no-borders --no-residual"]

- ``dubai``: ``../shared/data/dubai-aerial`` loaded by :func:`trainer.datasets.load_dubai` (provider ``dubai``; split
  by image: Tile_8 test, images 1-3 of Tile_7 val, the rest train) into the database ``tilesmith_real_dubai``.
- ``kampala``: ``../shared/data/kampala-oam`` harvested through the whole harvester by
  :func:`bench.harvest_kampala.harvest_kampala` (provider ``xyz``, zooms 19, 20, 21), then
  :func:`bench.harvest_kampala.apply_block_splits` (5 zoom-19 blocks train, 1 val, 1 test), into
  ``tilesmith_real_kampala``.

The training budget is turned into ``trainer train --steps N``: a few train steps of the same model are timed first
(``trainer benchmark``) and N = budget / step time. The database is created fresh (dropped first if left over) and
dropped at the end unless ``--keep``; the work directory is a temporary one unless ``--workdir``. ``--train-args``
passes further flags to ``trainer train`` (the recipe: defaults otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.databases import TempDatabase
from trainer.data import split_stats

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DATABASES = {"dubai": "tilesmith_real_dubai", "kampala": "tilesmith_real_kampala"}
PROVIDERS = {"dubai": "dubai", "kampala": "xyz"}


def fresh_database(name: str) -> str:
    """Drop ``name`` if it is there, create it empty and migrate it; return its URL."""
    return TempDatabase(name=name, migrate=True).__enter__()


def drop_database(name: str) -> None:
    TempDatabase(name=name).__exit__()


def load(dataset: str, url: str, root: Path) -> dict:
    """Put the data set into ``url``; return what was done."""
    if dataset == "dubai":
        from trainer.datasets import load_dubai

        return {"added": load_dubai(url, root, provider="dubai")}
    from bench.harvest_kampala import apply_block_splits, harvest_kampala

    counts = harvest_kampala(url, root)
    return {"harvest": {k: v for k, v in counts.items() if k != "requests"}, "splits": asyncio.run(
        apply_block_splits(url))}


def baselines(building_share: float) -> dict[str, float]:
    """IoU and F1 of the trivial predictors on a split whose pixels are ``building_share`` building."""
    from trainer.metrics import PixelCounts

    pixels = 10**9
    building = round(building_share * pixels)
    background = PixelCounts(tp=0, fp=0, fn=building, tn=pixels - building).scores()
    everything = PixelCounts(tp=building, fp=pixels - building, fn=0, tn=0).scores()
    return {"all_background_iou": background["iou"], "all_building_iou": everything["iou"],
            "all_building_f1": everything["f1"]}


def calibrate_step_s(base_filters: int, depth: int, batch_size: int, steps: int = 3) -> float:
    """Seconds per train step of this model on this backend (``trainer benchmark``; after compile and warm-up)."""
    from trainer.benchmark import step_benchmark

    return step_benchmark(base_filters, batch_size, steps, depth=depth)["step_s"]


def _trainer(*args: str, url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": url}
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO_ROOT, env=env, text=True,
                          capture_output=True, check=False)


def run(dataset: str, minutes: float, *, base_filters: int, depth: int, batch_size: int, lr: float,
        root: Path | None = None, workdir: Path | None = None, keep: bool = False,
        train_args: tuple[str, ...] = (), steps: int | None = None) -> dict:
    root = root or SHARED_DATA / {"dubai": "dubai-aerial", "kampala": "kampala-oam"}[dataset]
    if not root.is_dir():
        raise SystemExit(f"error: {root} not found (see ../shared/data/README.md)")
    name = DATABASES[dataset]
    result: dict = {"dataset": dataset, "database": name, "base_filters": base_filters, "depth": depth,
                    "batch_size": batch_size, "lr": lr, "train_args": list(train_args)}
    url = fresh_database(name)
    try:
        started = time.perf_counter()
        result["load"] = load(dataset, url, root)
        result["load_s"] = round(time.perf_counter() - started, 1)
        stats = split_stats(url, PROVIDERS[dataset])
        result["splits"] = {k: v["samples"] for k, v in sorted(stats.items())}
        result["test_building_share"] = stats["test"]["building_share"]
        result["baselines"] = baselines(stats["test"]["building_share"])

        started = time.perf_counter()
        step_s = calibrate_step_s(base_filters, depth, batch_size) if steps is None else float("nan")
        result["calibration_s"] = round(time.perf_counter() - started, 1)
        # The run also compiles (about as long as the calibration), validates and checkpoints: leave room for it.
        steps = steps or max(10, int(minutes * 60 * 0.9 / step_s))
        every = max(5, steps // 4)
        result.update(step_s_calibrated=round(step_s, 3), steps=steps)

        with tempfile.TemporaryDirectory(prefix=f"real-{dataset}-") as tmp:
            run_dir = workdir or Path(tmp) / "run"
            started = time.perf_counter()
            train = _trainer("train", "--workdir", str(run_dir), "--steps", str(steps), "--batch-size",
                             str(batch_size), "--base-filters", str(base_filters), "--depth", str(depth),
                             "--lr", str(lr), "--eval-every", str(every), "--checkpoint-every", str(every),
                             "--seed", "0", *train_args, url=url)
            result["train_s"] = round(time.perf_counter() - started, 1)
            if train.returncode != 0:
                raise SystemExit(f"trainer train failed ({train.returncode}):\n{train.stderr[-3000:]}")
            started = time.perf_counter()
            evaluate = _trainer("evaluate", "--workdir", str(run_dir), "--split", "test", "--json", url=url)
            result["evaluate_s"] = round(time.perf_counter() - started, 1)
            if evaluate.returncode != 0:
                raise SystemExit(f"trainer evaluate failed ({evaluate.returncode}):\n{evaluate.stderr[-3000:]}")
            result["test"] = json.loads(evaluate.stdout)
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
            result["val_iou_curve"] = [(m["step"], round(m["iou"], 4)) for m in metrics if m.get("kind") == "val"]
    finally:
        if keep:
            result["note"] = f"database {name} kept"
        else:
            drop_database(name)
    return result


def one_line(r: dict) -> str:
    t, b = r["test"], r["baselines"]
    return (f"{r['dataset']}: test IoU {t['iou']:.3f} F1 {t['f1']:.3f} object F1 {t['object_f1']:.3f} "
            f"on {t['samples']} samples | baselines: all-background IoU {b['all_background_iou']:.3f}, "
            f"all-building IoU {b['all_building_iou']:.3f} (F1 {b['all_building_f1']:.3f}) | "
            f"U-Net base {r['base_filters']} depth {r['depth']} batch {r['batch_size']} lr {r['lr']}: "
            f"{r['steps']} steps, train {r['train_s']:.0f} s (+ load {r['load_s']:.0f} s, calibration "
            f"{r['calibration_s']:.0f} s, evaluate {r['evaluate_s']:.0f} s) | splits {r['splits']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.real_imagery", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=("dubai", "kampala"))
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget (default 8)")
    parser.add_argument("--base-filters", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--root", type=Path, help="the data set's folder (default ../shared/data/<name>)")
    parser.add_argument("--workdir", type=Path, help="keep checkpoints and metrics here (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument("--json", action="store_true", help="also print the whole result as JSON")
    parser.add_argument("--steps", type=int, help="train this many steps instead of a time budget")
    parser.add_argument("--train-args", default="", help='further `trainer train` flags, e.g. "--no-borders"')
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    r = run(args.dataset, args.minutes, base_filters=args.base_filters, depth=args.depth,
            batch_size=args.batch_size, lr=args.lr, root=args.root, workdir=args.workdir, keep=args.keep,
            train_args=tuple(args.train_args.split()), steps=args.steps)
    if args.json:
        print(json.dumps(r, sort_keys=True))
    print(one_line(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
