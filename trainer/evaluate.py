"""``trainer evaluate``: metrics of a trained U-Net over EVERY sample of a split (SPEC: Commands).

The best checkpoint of the work directory is used (highest validation IoU), the latest when no validation ever ran
(``--checkpoint latest``: the latest in any case); no checkpoint at all is a :class:`CheckpointError`. A run trained
with ``--ema-decay`` is evaluated with its moving average of the parameters (``--no-ema``: the latest checkpoint's
own parameters). The split is streamed in id order with the last batch padded
(``pad_last=True``): padding rows are masked out of every count, no sample is dropped, and the number of samples
evaluated is checked against the split's size (less the rows that do not decode, which are logged). Metrics are
micro-averaged over all pixels of all samples, overall and per zoom (:mod:`trainer.metrics`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import jax

from .checkpoints import Checkpoints
from .config import OBJECT_MIN_AREA, TrainConfig, read_model_config
from .data import SampleStream
from .errors import ConfigError, DataError
from .steps import (abstract_train_state, compile_eval_step, create_optimizer, evaluate_stream, evaluation_params,
                    make_mesh)

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
JSON_KEYS = ("iou", "f1", "precision", "recall", "pixel_accuracy", "samples", "per_zoom", "object_f1")


def saved_train_config(workdir: Path, database_url: str) -> TrainConfig:
    """The :class:`TrainConfig` a work directory was trained with (read from its config.json)."""
    saved = read_model_config(workdir)
    fields = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__ and k != "database_url"}
    if fields.get("zooms") is not None:
        fields["zooms"] = tuple(fields["zooms"])
    return TrainConfig(**{**fields, "database_url": database_url})


def restore_params(workdir: Path, config: TrainConfig, mesh, *, checkpoint: str = "best", ema: bool = True
                   ) -> tuple:
    """``(graphdef, params)`` of the best checkpoint of ``workdir`` (else the latest), or of the latest
    (``checkpoint="latest"``), placed on ``mesh``. A run trained with ``--ema-decay`` is evaluated with its moving
    average of the parameters (what its best checkpoint holds); ``ema=False`` takes the latest checkpoint's own
    parameters instead."""
    kept = config.ema_decay > 0
    if not ema and kept and checkpoint != "latest":
        raise ConfigError("--no-ema: the best checkpoint holds only the moving average of the parameters; add "
                          "--checkpoint latest to evaluate the parameters themselves")
    total_steps = read_model_config(workdir).get("resolved", {}).get("total_steps") or 1
    tx = create_optimizer(config, total_steps)  # only its state's structure matters, to read a full train state
    graphdef, abstract_state = abstract_train_state(config.base_filters, config.depth, config.compute_dtype, tx, mesh,
                                                    borders=config.borders, residual=config.residual)
    with Checkpoints(workdir, read_only=True) as checkpoints:
        params, kind, step = checkpoints.restore_params(
            abstract_state.params, abstract_state, which=checkpoint,
            from_state=lambda state: evaluation_params(state, ema=kept and ema))
    log.info("using the %s checkpoint (step %d) of %s%s", kind, step, workdir,
             ", the moving average of its parameters" if kept and ema else "")
    return graphdef, params


def evaluate(workdir: Path | str, database_url: str, *, split: str = "test", zooms: tuple[int, ...] | None = None,
             batch_size: int | None = None, decode_workers: int = 2, progress: bool = True,
             observe: Callable | None = None, tta: bool = False, min_area: int = OBJECT_MIN_AREA,
             checkpoint: str = "best", ema: bool = True) -> dict:
    """``{iou, f1, precision, recall, pixel_accuracy, object_f1, samples, per_zoom}`` over every sample of ``split``.

    ``observe(batch, outputs)`` sees every batch evaluated (see :func:`trainer.steps.evaluate_stream`). ``tta``: the
    mean prediction over the 8 symmetries of the square (:func:`trainer.augment.tta`). ``min_area``: predicted
    buildings of fewer pixels are not counted by ``object_f1``. ``checkpoint``, ``ema``: which parameters (see
    :func:`restore_params`)."""
    workdir = Path(workdir).resolve()
    config = saved_train_config(workdir, database_url)
    devices = jax.local_devices()
    if batch_size is None:  # the smallest multiple of the device count that is >= the default
        batch_size = -(-DEFAULT_BATCH_SIZE // len(devices)) * len(devices)
    mesh = make_mesh(batch_size)
    graphdef, params = restore_params(workdir, config, mesh, checkpoint=checkpoint, ema=ema)
    eval_fn = compile_eval_step(graphdef, mesh, tta)
    with SampleStream(database_url, split, zooms, batch_size, shuffle=False, pad_last=True,
                      decode_workers=decode_workers) as stream:
        if len(stream) == 0:
            raise DataError(f"split {split!r} holds no sample (zooms {list(zooms) if zooms else 'all'}): "
                            "nothing to evaluate")
        result = evaluate_stream(eval_fn, params, stream, mesh, progress=progress, observe=observe,
                                 min_area=min_area)
    return {key: result[key] for key in JSON_KEYS}


def format_table(result: dict, split: str) -> str:
    """A readable table: one row for the whole split, one per zoom."""
    columns = ("samples", "iou", "f1", "precision", "recall", "pixel_accuracy", "object_f1")
    header = f"{'zoom':<6}" + "".join(f"{c:>15}" for c in columns)
    rows = [(f"{split}", result)] + [(f"z{z}", m) for z, m in result["per_zoom"].items()]
    lines = [header, "-" * len(header)]
    for name, metrics in rows:
        cells = "".join(f"{metrics[c]:>15d}" if c == "samples" else f"{metrics[c]:>15.4f}" for c in columns)
        lines.append(f"{name:<6}{cells}")
    return "\n".join(lines)
