"""Training, in the named stages of flax's ``examples/imagenet``: ``create_train_state``, ``train_step``,
``eval_step``, ``train_and_evaluate(config, workdir)``.

One idiom throughout: the functional NNX API. The U-Net is split once into a static ``graphdef`` and its parameters
(an ``nnx.State``); the steps are pure functions of a :class:`TrainState` pytree, compiled with ``jax.jit`` and
``nnx.merge`` inside (no ``nnx.jit`` and no in-place mutation). GroupNorm keeps no batch statistics, so parameters
are the whole model state.

Data parallel: a 1-D ``jax.sharding.Mesh`` over the local devices (axis ``data``); each batch is sharded along it,
parameters and optimizer state are replicated; XLA inserts the gradient all-reduce. Randomness (initialisation,
augmentation) uses the ``rbg`` PRNG: it compiles in a fraction of a second where threefry takes many seconds on
XLA:CPU, and is XLA's native generator on GPU. The augmentation key of a step is ``fold_in(key(seed), step)``, so a
resumed run draws the same augmentations as an uninterrupted one.

Resuming: the latest checkpoint's step gives the position in the data, ``(epoch, batch) = divmod(step,
batches_per_epoch)``, and ``SampleStream.epoch(epoch, start_batch=batch)`` replays the same order (same seed).
Divergence: every ``log_every`` steps, and before any checkpoint, the losses and parameter norms of the steps since
the last check are fetched; a NaN or inf stops training with :class:`TrainingDiverged` before anything is saved, so
the last checkpoint is one whose every step was checked.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .augment import augment_batch
from .checkpoints import Checkpoints
from .config import TrainConfig, read_model_config, write_config
from .data import SampleStream, prefetch_to_device
from .errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from .losses import bce_dice_loss
from .metrics import SegmentationMetrics, confusion_counts
from .model import UNet, default_compute_dtype, prng_key

log = logging.getLogger(__name__)

DATA_AXIS = "data"
FINAL_LR_FRACTION = 0.01  # the cosine decay ends at 1% of the peak learning rate


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken so far
    params: nnx.State  # the U-Net's parameters (float32)
    opt_state: optax.OptState  # gradient clipping + AdamW state


# ---------------------------------------------------------------------------------------------------- devices


def make_mesh(batch_size: int | None = None, devices: list | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every local device); ``batch_size`` must split evenly over them."""
    devices = devices or jax.local_devices()
    if batch_size is not None and batch_size % len(devices):
        raise ConfigError(
            f"--batch-size: {batch_size} is not a multiple of the {len(devices)} local "
            f"{jax.default_backend()} devices (data parallel splits each batch evenly)"
        )
    return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


# ---------------------------------------------------------------------------------------------------- state


def learning_rate_schedule(config: TrainConfig | StepSpec, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_fraction`` of the steps, then cosine decay to 1%."""
    warmup = int(total_steps * config.warmup_fraction)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=config.learning_rate * FINAL_LR_FRACTION,
    )


def create_optimizer(config: TrainConfig | StepSpec, total_steps: int) -> optax.GradientTransformation:
    """Global-norm gradient clipping, then AdamW; weight decay on convolution kernels only (not biases, norms)."""
    def decay_mask(params):
        return jax.tree.map(lambda x: x.ndim > 1, params)

    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(learning_rate_schedule(config, total_steps), weight_decay=config.weight_decay, mask=decay_mask),
    )


def model_factory(base_filters: int, depth: int, compute_dtype: str, seed: int) -> Callable[[], UNet]:
    dtype = default_compute_dtype(compute_dtype)
    return lambda: UNet(base_filters=base_filters, depth=depth, dtype=dtype, param_dtype=jnp.float32,
                        rngs=nnx.Rngs(prng_key(seed)))


class StepSpec(NamedTuple):
    """What the compiled train step depends on (the rest of :class:`TrainConfig` does not change the program)."""

    base_filters: int
    depth: int
    compute_dtype: str
    seed: int
    augment: bool
    dice_weight: float
    learning_rate: float
    warmup_fraction: float
    weight_decay: float
    grad_clip_norm: float
    total_steps: int

    @classmethod
    def of(cls, config: TrainConfig, total_steps: int) -> "StepSpec":
        return cls(*(getattr(config, f) for f in cls._fields[:-1]), total_steps)


@functools.lru_cache(maxsize=8)
def compiled_functions(spec: StepSpec, mesh: Mesh) -> tuple[optax.GradientTransformation, nnx.GraphDef, Callable,
                                                             Callable]:
    """``(tx, graphdef, init, step)``: the optimizer, the model structure, and the jitted init and train step.

    Cached, so that several runs in one process (resuming, tests, notebooks) compile once.
    """
    tx = create_optimizer(spec, spec.total_steps)
    make_model = model_factory(spec.base_filters, spec.depth, spec.compute_dtype, spec.seed)
    graphdef = nnx.graphdef(nnx.eval_shape(make_model))

    @functools.partial(jax.jit, out_shardings=replicated(mesh))
    def init() -> TrainState:
        params = nnx.state(make_model(), nnx.Param)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    step = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx, seed=spec.seed, augment=spec.augment,
                          dice_weight=spec.dice_weight),
        in_shardings=(replicated(mesh), batch_sharded(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=0,
    )
    return tx, graphdef, init, step


def create_train_state(config: TrainConfig, total_steps: int, mesh: Mesh) -> tuple[nnx.GraphDef, TrainState]:
    """Initialise the U-Net and optimizer in one compiled program, replicated over ``mesh``."""
    _, graphdef, init, _ = compiled_functions(StepSpec.of(config, total_steps), mesh)
    return graphdef, init()


def abstract_train_state(base_filters: int, depth: int, compute_dtype: str, tx: optax.GradientTransformation,
                         mesh: Mesh) -> tuple[nnx.GraphDef, TrainState]:
    """Shapes, dtypes and shardings of a train state, without computing it (the target of a checkpoint restore)."""
    make_model = model_factory(base_filters, depth, compute_dtype, 0)
    abstract_model = nnx.eval_shape(make_model)
    graphdef, params = nnx.split(abstract_model, nnx.Param)
    state = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), params)
    sharding = replicated(mesh)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
    return graphdef, state


# ---------------------------------------------------------------------------------------------------- steps


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, seed: int, augment: bool, dice_weight: float
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on ``batch`` (``images`` uint8, ``masks`` uint8, ``valid`` bool). Pure; jit it."""
    images = batch["images"].astype(jnp.float32) / 255.0
    masks = batch["masks"].astype(jnp.float32)
    if augment:
        images, masks = augment_batch(jax.random.fold_in(prng_key(seed), state.step), images, masks)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(images)
        return bce_dice_loss(logits, masks, batch["valid"], dice_weight=dice_weight)

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params: nnx.State, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef) -> dict[str, jax.Array]:
    """Per-sample confusion counts int32 [B, 4] and the predicted masks bool [B, H, W] of ``batch``. Pure; jit it."""
    logits = nnx.merge(graphdef, params)(batch["images"].astype(jnp.float32) / 255.0)
    return {"counts": confusion_counts(logits, batch["masks"], batch["valid"]), "predicted": logits > 0}


@functools.lru_cache(maxsize=8)
def compile_eval_step(graphdef: nnx.GraphDef, mesh: Mesh) -> Callable:
    return jax.jit(functools.partial(eval_step, graphdef=graphdef),
                   in_shardings=(replicated(mesh), batch_sharded(mesh)))


def evaluate_stream(eval_fn: Callable, params: nnx.State, stream: SampleStream, mesh: Mesh, *,
                    objects: bool = True, progress: bool = False) -> dict:
    """Metrics of ``params`` over every sample of ``stream`` (made with ``pad_last=True``: padding rows are masked).

    The host-side part of batch k (object matching) runs while the device computes batch k + 1.
    """
    metrics = SegmentationMetrics(objects=objects)
    sharding = batch_sharded(mesh)

    def consume(batch, out):
        out = jax.device_get(out)
        metrics.update(out["counts"], batch.valid, batch.zooms, out["predicted"], batch.masks)

    pending = None
    bar = tqdm(total=stream.num_batches(), unit="batch", desc=f"evaluate {stream.split}", disable=not progress,
               leave=False)
    skipped_before = stream.skipped  # `skipped` counts over the stream's life; this pass is what matters here
    with bar:
        for batch in stream.epoch(0):
            arrays = jax.device_put({"images": batch.images, "masks": batch.masks, "valid": batch.valid}, sharding)
            out = eval_fn(params, arrays)
            if pending is not None:
                consume(*pending)
            pending = (batch, out)
            bar.update()
        if pending is not None:
            consume(*pending)
    skipped = stream.skipped - skipped_before
    expected = len(stream) - skipped
    if metrics.samples != expected:
        raise DataError(f"evaluated {metrics.samples} samples of {stream.split!r}, expected {expected} "
                        f"({len(stream)} in the split, {skipped} skipped)")
    return metrics.result()


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
    for key in ("base_filters", "depth"):
        if saved[key] != getattr(config, key):
            raise CheckpointError(
                f"--workdir: {workdir} holds checkpoints of a U-Net with {key}={saved[key]}, not {getattr(config, key)}; "
                "use another --workdir or the same value"
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
    train_stream = SampleStream(config.database_url, "train", config.zooms, config.batch_size, seed=config.seed,
                                shuffle=True, pad_last=False, decode_workers=config.decode_workers,
                                prefetch=config.prefetch)
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
            _, abstract = abstract_train_state(config.base_filters, config.depth, config.compute_dtype, tx, mesh)
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
        clock = {"time": time.perf_counter(), "steps": 0}
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
            record = {"kind": "train", "step": step, "lr": float(schedule(step - 1)),
                      "samples_per_s": clock["steps"] * config.batch_size / elapsed}
            for key in fetched[0]:
                record[key] = float(np.mean([m[key] for m in fetched]))
            metrics_log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", samples_per_s=f"{record['samples_per_s']:.1f}")
            pending.clear()
            clock.update(time=now, steps=0)

        def validate(step: int) -> None:
            if len(val_stream) == 0:
                return
            result = evaluate_stream(eval_fn, state.params, val_stream, mesh)
            metrics_log.write({"kind": "val", "step": step, **{k: v for k, v in result.items() if k != "per_zoom"}})
            saved = checkpoints.save_best(step, state.params, result["iou"])
            log.info("step %d: val iou %.4f f1 %.4f object_f1 %.4f%s", step, result["iou"], result["f1"],
                     result["object_f1"], " (best so far)" if saved else "")
            summary["last_val"] = result

        step = start_step
        epoch, first_batch = divmod(step, steps_per_epoch)
        try:
            with bar, logging_redirect_tqdm():  # log lines printed above the bar, not through it
                while step < last_step:
                    batches = prefetch_to_device(train_stream.epoch(epoch, start_batch=first_batch), size=2,
                                                 sharding=batch_sharded(mesh))
                    step_at_epoch_start = step
                    try:
                        for batch in batches:
                            arrays = {k: batch[k] for k in ("images", "masks", "valid")}
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
                            if finished:
                                break
                    finally:
                        batches.close()
                    if step == step_at_epoch_start:
                        raise DataError(f"epoch {epoch} of split 'train' yielded no batch "
                                        f"({train_stream.skipped} samples skipped as undecodable)")
                    # an epoch shortened by skipped samples ends early: the next one still starts at its batch 0
                    epoch, first_batch = epoch + 1, 0
        except KeyboardInterrupt:
            check_and_log(step)
            if step > (checkpoints.latest_step() or 0):
                try:
                    checkpoints.save_latest(step, state)
                except RuntimeError:  # interrupted inside a step: its input state was already donated
                    log.exception("could not checkpoint step %d; resuming will start from step %s", step,
                                  checkpoints.latest_step())
                    raise KeyboardInterrupt from None
            log.warning("interrupted at step %d; checkpoint saved, run the same command to resume", step)
            raise
        summary.update(step=step, best_val_iou=checkpoints.best_iou())
        return summary
