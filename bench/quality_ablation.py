"""Ablation of the issue-11 recipe at equal steps: one ``trainer train`` + ``trainer evaluate --json`` per row, each
row today's recipe plus the changes it names, all on the same Dubai database, the same seeds and the same number of
steps.

    python -m bench.quality_ablation [--database-url URL] [--steps 250] [--base-filters 8] [--batch-size 8]
                                     [--rows 5,11] [--seeds 0,1,2]

Without ``--database-url`` dubai-aerial is loaded into a fresh database ``tilesmith_real_dubai`` (that of
``bench.real_imagery``; dropped at the end unless ``--keep``). The split of each row is set in the database before it
trains: ``old`` = the split before issue 11 (Tile_1-6 train, all of Tile_7 val), ``new`` =
:func:`trainer.datasets.dubai_split` (images 4-9 of Tile_7 move to train); ``Tile_8`` is the test split of both.
Prints one JSON line per row and seed as it finishes, then a Markdown table: test IoU, F1, object F1 (buildings
separated by :func:`trainer.instances.separate_buildings`), steps, minutes, and the 1-minute load average of the
machine before and after the row. With several ``--seeds`` (the seed of initialisation, shuffling and augmentation)
each figure is the mean over the seeds, with its range: a difference between rows inside the ranges is noise.
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

import asyncpg

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.gpu_report import seed_list  # noqa: E402
from bench.real_imagery import DATABASES, drop_database, fresh_database, load  # noqa: E402

# (name, split, train flags, evaluate flags): each row is today's recipe with the changes it names.
PLAIN = ["--no-borders", "--no-residual", "--separation-weight", "0"]
ROWS = [
    ("today's recipe (split Tile_1-6 / Tile_7)", "old", PLAIN, []),  # 0
    ("split: Tile_7 images 4-9 train", "new", PLAIN, []),  # 1
    ("split + border output, BCE + Dice", "new", ["--borders", "--border-dice-weight", "1", "--no-residual",
                                                  "--separation-weight", "0"], []),  # 2
    ("split + separation weight 5", "new", ["--no-borders", "--no-residual", "--separation-weight", "5"], []),  # 3
    ("split + border output, BCE", "new", ["--borders", "--border-dice-weight", "0", "--no-residual",
                                           "--separation-weight", "0"], []),  # 4
    ("split + residual blocks", "new", ["--no-borders", "--residual", "--separation-weight", "0"], []),  # 5
    ("split + residual blocks + 8-fold TTA", "new", ["--no-borders", "--residual", "--separation-weight", "0"],
     ["--tta"]),  # 6
    ("split + residual + border output (BCE, prior bias)", "new", ["--borders", "--border-dice-weight", "0",
                                                                   "--residual", "--separation-weight", "0"], []),  # 7
    ("split + residual blocks + scale augmentation 1/1.5-1.5x", "new", ["--no-borders", "--residual",
                                                                       "--separation-weight", "0", "--zoom-augment",
                                                                       "1.5"], []),  # 8
    ("split + residual blocks + Lovasz hinge 1", "new", ["--no-borders", "--residual", "--separation-weight", "0",
                                                        "--lovasz-weight", "1"], []),  # 9
    ("split + residual blocks + Lovasz hinge 0.2", "new", ["--no-borders", "--residual", "--separation-weight", "0",
                                                          "--lovasz-weight", "0.2"], []),  # 10
    ("split + residual blocks + depth 5", "new", ["--no-borders", "--residual", "--separation-weight", "0",
                                                 "--depth", "5"], []),  # 11
    ("split + residual blocks + lr 1e-3", "new", ["--no-borders", "--residual", "--separation-weight", "0",
                                                 "--lr", "1e-3"], []),  # 12
    ("split + residual blocks + lr 1e-2", "new", ["--no-borders", "--residual", "--separation-weight", "0",
                                                 "--lr", "1e-2"], []),  # 13
    # the moving average of the parameters, and the same runs' own parameters (one training per seed for both rows)
    ("split + residual blocks + EMA 0.999", "new", ["--no-borders", "--residual", "--separation-weight", "0",
                                                   "--ema-decay", "0.999"], []),  # 14
    ("split + residual blocks + EMA 0.999: the same runs' own parameters", "new",
     ["--no-borders", "--residual", "--separation-weight", "0", "--ema-decay", "0.999"],
     ["--checkpoint", "latest", "--no-ema"]),  # 15
]


async def set_split(url: str, layout: str) -> dict[str, int]:
    """Put the Dubai samples in the ``old`` or ``new`` split layout (folder and image from the synthetic tile)."""
    from trainer.datasets import DUBAI_BLOCK, DUBAI_ORIGIN, dubai_split

    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT sample_id, tile_x, tile_y FROM dataset WHERE provider = 'dubai'")
        updates = []
        for r in rows:
            folder = (r["tile_y"] - DUBAI_ORIGIN.y) // DUBAI_BLOCK + 1
            image = (r["tile_x"] - DUBAI_ORIGIN.x) // DUBAI_BLOCK + 1
            split = dubai_split(folder, image) if layout == "new" else (
                "val" if folder == 7 else "test" if folder == 8 else "train")
            updates.append((split, r["sample_id"]))
        await conn.executemany("UPDATE samples SET split = $1 WHERE sample_id = $2", updates)
        counts = await conn.fetch("SELECT split, count(*) AS n FROM dataset WHERE provider = 'dubai' GROUP BY split")
    finally:
        await conn.close()
    return {r["split"]: r["n"] for r in counts}


def row_lr(train_flags: list[str], default: float) -> float:
    """The learning rate a row trains at: its own last ``--lr`` (passed after the bench's, so the one argparse keeps),
    else the bench's ``default``."""
    values = [train_flags[i + 1] for i, flag in enumerate(train_flags[:-1]) if flag == "--lr"]
    return float(values[-1]) if values else default


def _trainer(url: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO_ROOT, text=True, capture_output=True,
                          env={**os.environ, "DATABASE_URL": url}, check=False)
    if done.returncode != 0:
        raise SystemExit(f"trainer {args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def run_row(url: str, name: str, layout: str, train_flags: list[str], eval_flags: list[str], *, steps: int,
            base_filters: int, batch_size: int, lr: float, seed: int, workdirs: dict) -> dict:
    load_before = os.getloadavg()[0]
    splits = asyncio.run(set_split(url, layout))
    key = (layout, tuple(train_flags), seed)
    started = time.perf_counter()
    if key not in workdirs:  # rows differing only at evaluation share their training
        workdir = Path(tempfile.mkdtemp(prefix="quality-ablation-"))
        _trainer(url, "train", "--workdir", str(workdir), "--steps", str(steps), "--batch-size", str(batch_size),
                 "--base-filters", str(base_filters), "--lr", str(lr), "--eval-every", str(steps),
                 "--checkpoint-every", str(steps), "--seed", str(seed), *train_flags)
        workdirs[key] = (workdir, time.perf_counter() - started)
    workdir, train_s = workdirs[key]
    evaluated = time.perf_counter()
    test = json.loads(_trainer(url, "evaluate", "--workdir", str(workdir), "--split", "test", "--json", *eval_flags))
    return {"row": name, "split": layout, "splits": splits, "train_flags": train_flags, "eval_flags": eval_flags,
            "steps": steps, "base_filters": base_filters, "batch_size": batch_size, "seed": seed,
            "lr": row_lr(train_flags, lr),
            "iou": test["iou"], "f1": test["f1"], "precision": test["precision"], "recall": test["recall"],
            "object_f1": test["object_f1"], "test_samples": test["samples"],
            "train_minutes": train_s / 60, "evaluate_minutes": (time.perf_counter() - evaluated) / 60,
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def _figure(runs: list[dict], key: str) -> str:
    """The mean of ``key`` over the seeds' runs, with its range when there are several: ``0.583 (0.579-0.587)``."""
    values = [r[key] for r in runs]
    mean = f"{sum(values) / len(values):.3f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):.3f}-{max(values):.3f})"


def table(results: list[dict]) -> str:
    """One Markdown line per row (its seeds' runs together, in the order they ran)."""
    lines = ["| row | seeds | test IoU | F1 | object F1 | steps | train min | eval min | load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_row: dict[str, list[dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    for name, runs in by_row.items():
        seeds = ",".join(str(r["seed"]) for r in runs)
        train = sum(r["train_minutes"] for r in runs) / len(runs)
        evaluate = sum(r["evaluate_minutes"] for r in runs) / len(runs)
        lines.append(f"| {name} | {seeds} | {_figure(runs, 'iou')} | {_figure(runs, 'f1')} |"
                     f" {_figure(runs, 'object_f1')} | {runs[0]['steps']} | {train:.1f} | {evaluate:.1f} |"
                     f" {runs[0]['load_before']:.1f} -> {runs[-1]['load_after']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality_ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="a database with dubai-aerial loaded (default: load a fresh one)")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--base-filters", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rows", help="comma-separated row numbers to run (default: all)")
    parser.add_argument("--seeds", type=seed_list, default=(0,),
                        help="comma-separated seeds, each row trained once per seed (default 0)")
    parser.add_argument("--keep", action="store_true", help="keep the database it loaded")
    args = parser.parse_args(argv)
    url = args.database_url
    if url is None:
        url = fresh_database(DATABASES["dubai"])
        load("dubai", url, REPO_ROOT.parent / "shared" / "data" / "dubai-aerial")
    chosen = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    results, workdirs = [], {}
    try:
        for name, layout, train_flags, eval_flags in chosen:
            for seed in args.seeds:
                result = run_row(url, name, layout, train_flags, eval_flags, steps=args.steps,
                                 base_filters=args.base_filters, batch_size=args.batch_size, lr=args.lr, seed=seed,
                                 workdirs=workdirs)
                results.append(result)
                print(json.dumps(result, sort_keys=True), flush=True)
    finally:
        if args.database_url is None and not args.keep:
            drop_database(DATABASES["dubai"])
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
