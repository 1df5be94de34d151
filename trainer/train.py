"""Training: ``train_and_evaluate(config, workdir)``, the loop over the compiled steps of ``steps``.

Resuming: the latest checkpoint's step gives the position in the data, ``(epoch, batch) = divmod(step,
batches_per_epoch)``, and ``SampleStream.epoch(epoch, start_batch=batch)`` replays the same order (same seed).
Divergence: every ``log_every`` steps, and before any checkpoint, the losses and parameter norms of the steps since
the last check are fetched; a NaN or inf stops training with :class:`TrainingDiverged` before anything is saved, so
the last checkpoint is one whose every step was checked.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .checkpoints import Checkpoints
from .config import TrainConfig, read_model_config, write_config
from .data import SampleStream, prefetch_to_device
from .errors import CheckpointError, DataError, TrainingDiverged
from .model import default_compute_dtype
from .steps import (StepSpec, abstract_train_state, batch_sharded, compile_eval_step, compiled_functions,
                    evaluate_stream, evaluation_params, learning_rate_schedule, make_mesh)

log = logging.getLogger(__name__)

DATA_WAIT_WARNING = 0.10  # warn when the step waited for its next batch more than this share of the time
DATA_WAIT_WARN_EVERY_S = 300.0


class _Speed:
    """Model FLOP utilisation from images/s: FLOPs counted from the layer shapes, peak from the device kind."""

    def __init__(self, config: TrainConfig, devices: int):
        from .flops import peak_tflops, train_flops_per_image

        device = jax.devices()[0]
        self.peak = peak_tflops(device.device_kind, jax.default_backend())
        self.flops = train_flops_per_image(config.base_filters, config.depth, residual=config.residual,
                                           outputs=2 if config.borders else 1) if self.peak else None
        self.devices = devices

    def mfu(self, images_per_s: float) -> dict:
        """``{"tflops_per_s", "mfu"}`` where the device's peak is known (GPU), else ``{}``."""
        if not self.peak:
            return {}
        tflops = self.flops * images_per_s / 1e12
        return {"tflops_per_s": tflops, "mfu": tflops / (self.peak * self.devices)}

# ---------------------------------------------------------------------------------------------------- loop


class _Log:
    """``metrics.jsonl`` of the work directory: one JSON object a line (``kind`` = ``train`` or ``val``)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():  # drop what a crashed run logged past the checkpoint we resume from
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def _check_resumable(workdir: Path, config: TrainConfig) -> None:
    """A work directory holding checkpoints must have been made for the same network."""
    saved = read_model_config(workdir)
    for key in ("base_filters", "depth", "borders", "residual"):
        if saved[key] != getattr(config, key):
            raise CheckpointError(
                f"--workdir: {workdir} holds checkpoints of a U-Net with {key}={saved[key]}, not {getattr(config, key)}; "
                "use another --workdir or the same value"
            )
    if (saved["ema_decay"] > 0) != (config.ema_decay > 0):  # the moving average is part of the optimizer state
        raise CheckpointError(
            f"--workdir: {workdir} holds checkpoints of a run with --ema-decay {saved['ema_decay']:g}, not "
            f"{config.ema_decay:g}: a moving average of the parameters is kept by both or by neither; use another "
            "--workdir or the same on/off"
        )
    for key in ("batch_size", "seed", "zooms"):
        if saved.get(key) != config.public()[key]:
            log.warning("resuming with %s=%s (was %s): the data order differs from the interrupted run",
                        key, config.public()[key], saved.get(key))


def train_and_evaluate(config: TrainConfig, workdir: Path | str, *, stop_after: int | None = None) -> dict:
    """Train on ``train``, validate on ``val``, checkpoint into ``workdir``; resume from it when it holds a checkpoint.

    ``stop_after``: leave after this many steps of this process (checkpointed), as a preemptible job would.
    Returns a summary: ``{"step", "total_steps", "best_val_iou", "last_val"}``.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(config.batch_size)
    log.info("config: %s", json.dumps(config.public(), sort_keys=True))
    # The border targets cost the workers about as much as decoding: derived only when the loss uses them.
    train_stream = SampleStream(config.database_url, "train", config.zooms, config.batch_size, seed=config.seed,
                                shuffle=True, pad_last=False, decode_workers=config.decode_workers,
                                prefetch=config.prefetch, borders=config.uses_border_targets)
    val_stream = SampleStream(config.database_url, "val", config.zooms, config.batch_size, shuffle=False,
                              pad_last=True, decode_workers=config.decode_workers, prefetch=config.prefetch)
    with train_stream, val_stream, Checkpoints(workdir) as checkpoints:
        steps_per_epoch = train_stream.num_batches()
        if steps_per_epoch == 0:
            raise DataError(f"split 'train' holds {len(train_stream)} samples (zooms {config.zooms or 'all'}), "
                            f"fewer than one batch of {config.batch_size}; lower --batch-size or harvest more")
        total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
        tx, graphdef, init, step_fn = compiled_functions(StepSpec.of(config, total_steps), mesh)
        schedule = learning_rate_schedule(config, total_steps)

        if checkpoints.latest_step() is not None:
            _check_resumable(workdir, config)
            _, abstract = abstract_train_state(config.base_filters, config.depth, config.compute_dtype, tx, mesh,
                                               borders=config.borders, residual=config.residual)
            state = checkpoints.restore_latest(abstract)
            log.info("resuming from step %d of %s", int(state.step), checkpoints.root / "latest")
        else:
            state = init()
        start_step = int(state.step)
        write_config(config, workdir, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                     devices=len(mesh.devices.flat), compute_dtype=str(jnp.dtype(default_compute_dtype(
                         config.compute_dtype))), train_samples=len(train_stream), val_samples=len(val_stream))
        metrics_log = _Log(workdir / "metrics.jsonl", start_step)
        if len(val_stream) == 0:
            log.warning("split 'val' is empty: no validation, no best checkpoint (evaluate will use the latest)")

        eval_fn = compile_eval_step(graphdef, mesh)
        last_step = total_steps if stop_after is None else min(total_steps, start_step + stop_after)
        summary = {"step": start_step, "total_steps": total_steps, "best_val_iou": checkpoints.best_iou(),
                   "last_val": None}
        if start_step >= last_step:
            log.info("nothing to do: the checkpoint is at step %d of %d", start_step, total_steps)
            return summary

        pending: list[tuple[int, dict]] = []  # (step, metrics on the device) not yet checked
        clock = {"time": time.perf_counter(), "steps": 0, "wait": 0.0, "warned": -math.inf}
        speed = _Speed(config, len(mesh.devices.flat))
        bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="train", dynamic_ncols=True,
                   mininterval=1.0)

        def check_and_log(step: int) -> None:
            """Fetch the pending step metrics; stop on NaN/inf; append one averaged line to metrics.jsonl."""
            if not pending:
                return
            fetched = jax.device_get([m for _, m in pending])
            for (s, _), m in zip(pending, fetched):
                bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(float(m[k]))]
                if bad:
                    good = checkpoints.latest_step()
                    raise TrainingDiverged(
                        f"training diverged at step {s}: {', '.join(f'{k}={float(m[k])}' for k in bad)}; "
                        f"the last good checkpoint (step {good if good is not None else 'none'}) is left in "
                        f"{checkpoints.root / 'latest'}; lower --lr (now {config.learning_rate:g})"
                    )
            now = time.perf_counter()
            elapsed = max(now - clock["time"], 1e-9)
            images_per_s = clock["steps"] * config.batch_size / elapsed
            record = {"kind": "train", "step": step, "lr": float(schedule(step - 1)), "samples_per_s": images_per_s,
                      "data_wait_fraction": clock["wait"] / elapsed, **speed.mfu(images_per_s)}
            for key in fetched[0]:
                record[key] = float(np.mean([m[key] for m in fetched]))
            metrics_log.write(record)
            postfix = {"loss": f"{record['loss']:.4f}", "images_per_s": f"{images_per_s:.1f}"}
            if record.get("mfu") is not None:
                postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
            bar.set_postfix(postfix)
            if record["data_wait_fraction"] > DATA_WAIT_WARNING and now - clock["warned"] > DATA_WAIT_WARN_EVERY_S:
                log.warning("the train step waited for data %.0f %% of the time over the last %d steps (%.1f "
                            "images/s): the input pipeline is the bottleneck; raise --decode-workers (now %d) if "
                            "cores are free", 100 * record["data_wait_fraction"], clock["steps"], images_per_s,
                            config.decode_workers)
                clock["warned"] = now
            pending.clear()
            clock.update(time=now, steps=0, wait=0.0)

        def validate(step: int) -> None:
            if len(val_stream) == 0:
                return
            params = evaluation_params(state, ema=config.ema_decay > 0)  # the moving average, where kept
            result = evaluate_stream(eval_fn, params, val_stream, mesh)
            metrics_log.write({"kind": "val", "step": step, **{k: v for k, v in result.items() if k != "per_zoom"}})
            saved = checkpoints.save_best(step, params, result["iou"])
            log.info("step %d: val iou %.4f f1 %.4f object_f1 %.4f%s", step, result["iou"], result["f1"],
                     result["object_f1"], " (best so far)" if saved else "")
            summary["last_val"] = result

        step = start_step
        epoch, first_batch = divmod(step, steps_per_epoch)
        # One stream through the epochs: the workers decode the next epoch while this one ends. An epoch shortened
        # by skipped samples ends early; the next one still starts at its batch 0.
        batches = prefetch_to_device((batch for _, batch in train_stream.batches(epoch, start_batch=first_batch)),
                                     size=2, sharding=batch_sharded(mesh))
        try:
            with bar, logging_redirect_tqdm():  # log lines printed above the bar, not through it
                while step < last_step:
                    waited = time.perf_counter()
                    batch = next(batches)
                    clock["wait"] += time.perf_counter() - waited
                    arrays = {k: batch[k] for k in ("images", "masks", "borders", "valid")}
                    state, step_metrics = step_fn(state, arrays)
                    step += 1
                    pending.append((step, step_metrics))
                    clock["steps"] += 1
                    bar.update()
                    finished = step == last_step
                    do_eval = step % config.eval_every == 0 or step == total_steps
                    do_save = step % config.checkpoint_every == 0 or finished
                    if step % config.log_every == 0 or do_eval or do_save:
                        check_and_log(step)
                    if do_eval:
                        validate(step)
                    if do_save:
                        checkpoints.save_latest(step, state)
        except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (trainer.errors.Terminated)
            check_and_log(step)
            if step > (checkpoints.latest_step() or 0):
                try:
                    checkpoints.save_latest(step, state)
                except RuntimeError:  # interrupted inside a step: its input state was already donated
                    log.exception("could not checkpoint step %d; resuming will start from step %s", step,
                                  checkpoints.latest_step())
                    raise type(interrupt)() from None
            log.warning("interrupted at step %d; checkpoint saved, run the same command to resume", step)
            raise
        finally:
            batches.close()
        summary.update(step=step, best_val_iou=checkpoints.best_iou())
        return summary
