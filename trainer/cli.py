"""``trainer`` command line: ``train``, ``evaluate``, ``predict`` (SPEC: Commands). Parses flags, nothing else.

Settings follow the SPEC's rule: ``DATABASE_URL`` from the environment, the ``--database-url`` flag winning over it.
A malformed flag or variable stops the program at start with one line on stderr naming it, exit status 2. Other
failures (no checkpoint, training diverged, database unreachable) print one ``trainer: error: ...`` line, exit 1;
Ctrl-C during training saves a checkpoint and exits 130; SIGTERM (``kill``, ``docker stop``, a cloud preemption
notice) does the same and exits 143. The database password is never printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

from harvester.splits import SPLITS

from .config import (CHECKPOINTS, DEFAULT_DATABASE_URL, DEFAULT_DECODE_WORKERS, DEFAULT_EPOCHS, OBJECT_MIN_AREA,
                     TRAIN_DEFAULTS, check_database_url, parse_zooms, redact_url, resolve_batch_size)
from . import compile_cache
from .errors import ConfigError, Terminated, TrainerError, raise_terminated

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
_NOISY_LOGGERS = ("jax", "orbax", "asyncio")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (naming the flag) and exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _ema_decay(text: str) -> float:
    value = _finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a decay in [0, 1) (0 = off), got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


BATCH_SIZE_HELP = ("samples per step, a multiple of the device count, or auto (default): 16 on CPU; on GPU by device "
                   "memory and width, 128 per device on an 80 GiB card at base 32")


def _batch_size(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else _positive_int(text)


def _zooms(text: str) -> tuple[int, ...]:
    try:
        return parse_zooms(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--zooms: ")) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trainer", description="Train, evaluate and apply a U-Net for building segmentation.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,predict,benchmark}")

    def cache_flag(sub):
        sub.add_argument("--compilation-cache", metavar="DIR|off", help="persistent XLA compilation cache; env "
                         f"{compile_cache.ENV} (default {compile_cache.default_dir()})")

    def common(sub, database: bool = True):
        cache_flag(sub)
        sub.add_argument("--workdir", required=True, type=Path, help="directory of checkpoints, config.json, "
                         "metrics.jsonl")
        if database:
            sub.add_argument("--database-url", metavar="URL", help="PostgreSQL URL of the dataset view; env "
                             f"DATABASE_URL (default {DEFAULT_DATABASE_URL})")

    train = commands.add_parser("train", help="train on split 'train', validate on 'val', checkpoint, resume")
    common(train)
    train.add_argument("--zooms", type=_zooms, help="comma-separated zoom levels to use (default: all)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, help="optimizer steps in all")
    length.add_argument("--epochs", type=_positive_int, help=f"passes over 'train' (default {DEFAULT_EPOCHS})")
    train.add_argument("--batch-size", type=_batch_size, default="auto", help=BATCH_SIZE_HELP)
    train.add_argument("--base-filters", type=_positive_int, default=32, help="U-Net width (default 32; 64 = paper)")
    train.add_argument("--depth", type=_positive_int, default=4, help="U-Net downsamplings (default 4)")
    train.add_argument("--lr", type=_positive_float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    train.add_argument("--seed", type=_int, default=0, help="seed of init, shuffling, augmentation (default 0)")
    train.add_argument("--eval-every", type=_positive_int, default=500, help="validate every N steps (default 500)")
    train.add_argument("--checkpoint-every", type=_positive_int, default=500,
                       help="save the latest checkpoint every N steps (default 500)")
    train.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                       help="activation dtype (default auto: bfloat16 on GPU, float32 on CPU)")
    train.add_argument("--no-augment", dest="augment", action="store_false", help="no flips/rotations/jitter")
    train.add_argument("--zoom-augment", type=float, default=1.0, metavar="MAX",
                       help="also rescale each sample by a factor from 1/MAX to MAX (e.g. 1.5; at most 2; default 1 = "
                       "off)")
    defaults = TRAIN_DEFAULTS
    train.add_argument("--borders", action=argparse.BooleanOptionalAction, default=defaults.borders,
                       help="second output: borders/gaps between buildings, used to split touching buildings "
                       f"(default {'on' if defaults.borders else 'off'})")
    train.add_argument("--border-weight", type=_non_negative_float, default=defaults.border_weight,
                       help=f"weight of the border output's loss (default {defaults.border_weight:g})")
    train.add_argument("--border-dice-weight", type=_non_negative_float, default=defaults.border_dice_weight,
                       help=f"weight of a Dice term on the border output (default {defaults.border_dice_weight:g})")
    train.add_argument("--separation-weight", type=_non_negative_float, default=defaults.separation_weight,
                       help="extra BCE weight of border/gap pixels, the U-Net paper's weight map "
                       f"(default {defaults.separation_weight:g})")
    train.add_argument("--lovasz-weight", type=_non_negative_float, default=defaults.lovasz_weight,
                       help="weight of the Lovasz hinge (an IoU surrogate) in the loss "
                       f"(default {defaults.lovasz_weight:g} = off)")
    train.add_argument("--residual", action=argparse.BooleanOptionalAction, default=defaults.residual,
                       help=f"residual U-Net blocks (default {'on' if defaults.residual else 'off'})")
    train.add_argument("--ema-decay", type=_ema_decay, default=defaults.ema_decay, metavar="DECAY",
                       help="keep a moving average of the parameters (e.g. 0.999; warmed up as min(DECAY, (1+t)/"
                       "(10+t))) and validate, save as best, evaluate and predict with it (default 0: off)")
    train.add_argument("--decode-workers", type=_positive_int, default=DEFAULT_DECODE_WORKERS,
                       help=f"worker processes fetching and decoding images (default {DEFAULT_DECODE_WORKERS}: the "
                       "CPU count, at most 16)")

    evaluate = commands.add_parser("evaluate", help="metrics of the best checkpoint over every sample of a split")
    common(evaluate)
    evaluate.add_argument("--split", choices=SPLITS, default="test", help="(default test)")
    evaluate.add_argument("--zooms", type=_zooms, help="comma-separated zoom levels (default: all)")
    evaluate.add_argument("--batch-size", type=_positive_int, help="samples per batch (default 16)")
    evaluate.add_argument("--decode-workers", type=_positive_int, default=2, help="image decoding worker processes "
                          "(default 2)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    evaluate.add_argument("--tta", action="store_true", help="8-fold test-time augmentation (8x the compute)")
    evaluate.add_argument("--min-area", type=_non_negative_int, default=OBJECT_MIN_AREA, metavar="PIXELS",
                          help="object_f1: buildings smaller than this, true or predicted, are not counted (default "
                          f"{OBJECT_MIN_AREA}, as SpaceNet scores; 0: every component)")
    evaluate.add_argument("--checkpoint", choices=CHECKPOINTS, default="best", help="best: the highest validation "
                          "IoU (the latest when no validation ran); latest: where training stopped (default best)")
    evaluate.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                          help="a run trained with --ema-decay: its moving average of the parameters (default); "
                          "--no-ema: the parameters themselves (with --checkpoint latest)")
    evaluate.add_argument("--report", type=Path, metavar="OUT", help="also write OUT/index.html: metrics, curves, "
                          "best and worst tiles (opens from disk)")

    predict = commands.add_parser("predict", help="predicted mask (and building polygons) of one tile")
    common(predict, database=False)
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="a 256x256 tile image")
    source.add_argument("--lon", type=_finite_float, help="longitude of a point in the tile (with --lat, --zoom)")
    predict.add_argument("--lat", type=_finite_float, help="latitude of a point in the tile")
    predict.add_argument("--zoom", type=_int, help="zoom level of the tile")
    predict.add_argument("--tile", help="Z/X/Y of --image, needed for --geojson")
    predict.add_argument("--out", type=Path, required=True, help="mask PNG to write (0 background, 255 building)")
    predict.add_argument("--geojson", type=Path, help="GeoJSON of the building polygons (EPSG:4326) to write")
    predict.add_argument("--overlay", type=Path, help="PNG to write: the input tile, predicted buildings outlined")
    predict.add_argument("--tta", action="store_true", help="8-fold test-time augmentation")
    predict.add_argument("--min-area", type=_non_negative_int, default=OBJECT_MIN_AREA, metavar="PIXELS",
                         help=f"--geojson: leave out buildings smaller than this (default {OBJECT_MIN_AREA}; 0: all)")

    bench = commands.add_parser("benchmark", help="train-step speed (images/s, TFLOP/s, MFU) and input-pipeline speed")
    cache_flag(bench)
    bench.add_argument("--database-url", metavar="URL", help="--loader: PostgreSQL URL of the dataset view; env "
                       f"DATABASE_URL (default {DEFAULT_DATABASE_URL})")
    bench.add_argument("--base-filters", type=_positive_int, nargs="+", default=[32], help="U-Net widths (default 32)")
    bench.add_argument("--depth", type=_positive_int, default=4, help="U-Net downsamplings (default 4)")
    bench.add_argument("--batch-size", type=_batch_size, default="auto", help=BATCH_SIZE_HELP)
    bench.add_argument("--steps", type=_positive_int, default=10, help="timed steps after one warm-up (default 10)")
    bench.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                       help="activation dtype (default auto: bfloat16 on GPU, float32 on CPU)")
    bench.add_argument("--peak-tflops", type=_positive_float, help="dense peak TFLOP/s of one device, for MFU "
                       "(default: from the device kind; H100/H200 989; unknown on CPU)")
    bench.add_argument("--loader", action="store_true", help="also time the input pipeline over split 'train' of "
                       "the database, and the ratio loader / step")
    bench.add_argument("--decode-workers", type=_positive_int, default=DEFAULT_DECODE_WORKERS,
                       help=f"--loader: decode worker processes (default {DEFAULT_DECODE_WORKERS})")
    bench.add_argument("--loader-samples", type=_positive_int, default=2000, help="--loader: samples to time "
                       "(default 2000)")
    bench.add_argument("--json", action="store_true", help="print one JSON object per model instead of a table")
    return parser


def _database_url(args: argparse.Namespace) -> str:
    if args.database_url is not None:
        return check_database_url(args.database_url, "--database-url")
    return check_database_url(os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL, "DATABASE_URL")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax logs every save and read-only open through absl


def _train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .train import train_and_evaluate

    epochs = args.epochs if args.epochs is not None or args.steps is not None else DEFAULT_EPOCHS
    url = _database_url(args)
    compile_cache.enable(args.compilation_cache)
    config = TrainConfig(
        database_url=url, zooms=args.zooms, steps=args.steps, epochs=epochs,
        batch_size=resolve_batch_size(args.batch_size, args.base_filters), base_filters=args.base_filters, depth=args.depth, learning_rate=args.lr,
        seed=args.seed, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        compute_dtype=args.compute_dtype, augment=args.augment, zoom_augment=args.zoom_augment,
        decode_workers=args.decode_workers,
        borders=args.borders, border_weight=args.border_weight, border_dice_weight=args.border_dice_weight,
        separation_weight=args.separation_weight, lovasz_weight=args.lovasz_weight,
        residual=args.residual, ema_decay=args.ema_decay,
    )
    if config.seed < 0:
        raise ConfigError(f"--seed: must be >= 0, got {config.seed}")
    summary = train_and_evaluate(config, args.workdir)
    best = summary["best_val_iou"]
    log.info("done: step %d of %d, best val IoU %s, checkpoints in %s", summary["step"], summary["total_steps"],
             f"{best:.4f}" if best is not None else "n/a", args.workdir)
    return EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_table

    url = _database_url(args)
    compile_cache.enable(args.compilation_cache)
    run, options = evaluate, {}
    if args.report is not None:  # the same metrics, and the report written
        from .report import evaluate_with_report as run

        options = {"report": args.report}
    result = run(args.workdir, url, split=args.split, zooms=args.zooms, batch_size=args.batch_size,
                 decode_workers=args.decode_workers, progress=not args.json, tta=args.tta, min_area=args.min_area,
                 checkpoint=args.checkpoint, ema=args.ema, **options)
    print(json.dumps(result, sort_keys=True) if args.json else format_table(result, args.split))
    return EXIT_OK


def _predict(args: argparse.Namespace) -> int:
    from .predict import predict

    if args.lon is not None and (args.lat is None or args.zoom is None):
        raise ConfigError("--lon: needs --lat and --zoom too")
    if args.image is not None and (args.lat is not None or args.zoom is not None):
        raise ConfigError("--lat/--zoom: only with --lon (not with --image)")
    compile_cache.enable(args.compilation_cache)
    summary = predict(args.workdir, args.out, image=args.image, tile=args.tile, lon=args.lon, lat=args.lat,
                      zoom=args.zoom, geojson=args.geojson, overlay=args.overlay, tta=args.tta,
                      min_area=args.min_area)
    written = [str(p) for p in (args.geojson, args.overlay) if p is not None]
    log.info("wrote %s%s: %s", args.out, "".join(f" and {p}" for p in written), summary)
    return EXIT_OK


def _benchmark(args: argparse.Namespace) -> int:
    from .benchmark import format_row, measure_loader, step_benchmark

    url = _database_url(args) if args.loader else None
    compile_cache.enable(args.compilation_cache)
    loader = None
    if url is not None:
        loader = measure_loader(url, resolve_batch_size(args.batch_size, min(args.base_filters)), args.decode_workers, samples=args.loader_samples).samples_per_s
    for base in args.base_filters:
        batch_size = resolve_batch_size(args.batch_size, base)
        row = step_benchmark(base, batch_size, args.steps, depth=args.depth, compute_dtype=args.compute_dtype,
                             peak_tflops=args.peak_tflops)
        if loader is not None:
            row.update(loader_samples_per_s=loader, loader_to_step=loader / row["images_per_s"])
        print(json.dumps(row, sort_keys=True) if args.json else format_row(row), flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    handler = {"train": _train, "evaluate": _evaluate, "predict": _predict, "benchmark": _benchmark}[args.command]
    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    previous = signal.signal(signal.SIGTERM, raise_terminated) if in_main_thread else None
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"trainer {args.command}: error: {_safe(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except TrainerError as exc:
        print(f"trainer {args.command}: error: {_safe(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except Terminated:
        print(f"trainer {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"trainer {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        compile_cache.log_summary()


def _safe(exc: BaseException) -> str:
    """The message on one line, any database URL in it with its password redacted."""
    return redact_url(" ".join(str(exc).split()))
