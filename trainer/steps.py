"""The compiled pieces of training, in the named stages of flax's ``examples/imagenet``: ``create_train_state``,
``train_step``, ``eval_step``, and the data-parallel mesh they run on. The loop that drives them is ``train``.

One idiom throughout: the functional NNX API. The U-Net is split once into a static ``graphdef`` and its parameters
(an ``nnx.State``); the steps are pure functions of a :class:`TrainState` pytree, compiled with ``jax.jit`` and
``nnx.merge`` inside (no ``nnx.jit`` and no in-place mutation). GroupNorm keeps no batch statistics, so parameters
are the whole model state.

Data parallel: a 1-D ``jax.sharding.Mesh`` over the local devices (axis ``data``); each batch is sharded along it,
parameters and optimizer state are replicated; XLA inserts the gradient all-reduce. Randomness (initialisation,
augmentation) uses the ``rbg`` PRNG: it compiles in a fraction of a second where threefry takes many seconds on
XLA:CPU, and is XLA's native generator on GPU. The augmentation key of a step is ``fold_in(key(seed), step)``, so a
resumed run draws the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from .augment import augment_batch, tta
from .config import OBJECT_MIN_AREA, TrainConfig
from .data import SampleStream
from .errors import ConfigError, DataError
from .losses import segmentation_loss
from .metrics import SegmentationMetrics, confusion_counts
from .model import UNet, default_compute_dtype, prng_key, split_logits

DATA_AXIS = "data"
FINAL_LR_FRACTION = 0.01  # the cosine decay ends at 1% of the peak learning rate
# Threads matching the buildings of evaluated samples (host side): one per two cores, the rest left to the decode
# workers (on 2 cores, 2 threads measured 0.85-0.94x of one end to end; README, "Performance"), at most 8.
MATCH_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))


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


class ParamsEmaState(NamedTuple):
    count: jax.Array  # int32 scalar: updates averaged so far
    ema: optax.Params  # the moving average of the parameters after each update (float32)


def params_ema(decay: float) -> optax.GradientTransformation:
    """An exponential moving average of the parameters, kept in the optimizer state; the updates pass unchanged.

    After the t-th update (t = 0, 1, ...) ``ema = d * ema + (1 - d) * params`` with ``d = min(decay, (1 + t) / (10 +
    t))``: TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``, so that a short run averages over its last
    tenth rather than over its random start. Place it last in a chain: ``params + updates`` are then the parameters
    the step ends with.
    """
    def init(params: optax.Params) -> ParamsEmaState:
        return ParamsEmaState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params))

    def update(updates, state: ParamsEmaState, params=None):
        if params is None:
            raise ValueError("params_ema needs the parameters: call update(updates, state, params)")
        t = state.count.astype(jnp.float32)
        d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
        ema = optax.incremental_update(optax.apply_updates(params, updates), state.ema, 1.0 - d)
        return updates, ParamsEmaState(state.count + 1, ema)

    return optax.GradientTransformation(init, update)


def create_optimizer(config: TrainConfig | StepSpec, total_steps: int) -> optax.GradientTransformation:
    """Global-norm gradient clipping, then AdamW; weight decay on convolution kernels only (not biases, norms); with
    ``ema_decay`` > 0, last, the moving average of the parameters (:func:`params_ema`)."""
    def decay_mask(params):
        return jax.tree.map(lambda x: x.ndim > 1, params)

    parts = [
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(learning_rate_schedule(config, total_steps), weight_decay=config.weight_decay, mask=decay_mask),
    ]
    if config.ema_decay > 0:
        parts.append(params_ema(config.ema_decay))
    return optax.chain(*parts)


def evaluation_params(state: TrainState, ema: bool) -> nnx.State:
    """The parameters a train state is evaluated with: the moving average when the run keeps one (``ema``), else
    the parameters themselves."""
    if not ema:
        return state.params
    ema_state = state.opt_state[-1]
    if not isinstance(ema_state, ParamsEmaState):
        raise TypeError("this train state keeps no moving average of its parameters (ema_decay 0)")
    return ema_state.ema


def model_factory(base_filters: int, depth: int, compute_dtype: str, seed: int, *, borders: bool = False,
                  residual: bool = False) -> Callable[[], UNet]:
    dtype = default_compute_dtype(compute_dtype)
    return lambda: UNet(base_filters=base_filters, depth=depth, outputs=2 if borders else 1, residual=residual,
                        dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(prng_key(seed)))


class StepSpec(NamedTuple):
    """What the compiled train step depends on (the rest of :class:`TrainConfig` does not change the program)."""

    base_filters: int
    depth: int
    compute_dtype: str
    seed: int
    augment: bool
    zoom_augment: float
    dice_weight: float
    borders: bool
    border_weight: float
    border_dice_weight: float
    separation_weight: float
    lovasz_weight: float
    residual: bool
    learning_rate: float
    warmup_fraction: float
    weight_decay: float
    grad_clip_norm: float
    ema_decay: float
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
    make_model = model_factory(spec.base_filters, spec.depth, spec.compute_dtype, spec.seed, borders=spec.borders,
                               residual=spec.residual)
    graphdef = nnx.graphdef(nnx.eval_shape(make_model))

    @functools.partial(jax.jit, out_shardings=replicated(mesh))
    def init() -> TrainState:
        params = nnx.state(make_model(), nnx.Param)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    step = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx, seed=spec.seed, augment=spec.augment,
                          zoom_augment=spec.zoom_augment,
                          loss_options=dict(dice_weight=spec.dice_weight, border_weight=spec.border_weight,
                                            border_dice_weight=spec.border_dice_weight,
                                            separation_weight=spec.separation_weight,
                                            lovasz_weight=spec.lovasz_weight)),
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
                         mesh: Mesh, *, borders: bool = False, residual: bool = False
                         ) -> tuple[nnx.GraphDef, TrainState]:
    """Shapes, dtypes and shardings of a train state, without computing it (the target of a checkpoint restore)."""
    make_model = model_factory(base_filters, depth, compute_dtype, 0, borders=borders, residual=residual)
    abstract_model = nnx.eval_shape(make_model)
    graphdef, params = nnx.split(abstract_model, nnx.Param)
    state = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), params)
    sharding = replicated(mesh)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
    return graphdef, state


# ---------------------------------------------------------------------------------------------------- steps


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, seed: int, augment: bool, loss_options: dict,
               zoom_augment: float = 1.0) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on ``batch`` (``images``, ``masks``, ``borders`` uint8, ``valid`` bool). Pure; jit it.
    ``loss_options``: keyword arguments of :func:`trainer.losses.segmentation_loss`."""
    if augment:
        images, masks, borders = augment_batch(jax.random.fold_in(prng_key(seed), state.step), batch["images"],
                                               batch["masks"], batch["borders"], max_zoom=zoom_augment)
    else:
        images = batch["images"].astype(jnp.float32) / 255.0
        masks = batch["masks"].astype(jnp.float32)
        borders = batch["borders"].astype(jnp.float32)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(images)
        return segmentation_loss(logits, masks, borders, batch["valid"], **loss_options)

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
    return TrainState(state.step + 1, params, opt_state), metrics


def predict_logits(params: nnx.State, images: jax.Array, *, graphdef: nnx.GraphDef, tta_enabled: bool = False
                   ) -> jax.Array:
    """The U-Net's logits of uint8 ``images`` [B, H, W, 3]; with ``tta_enabled``, the mean over the 8 symmetries of
    the square (:func:`trainer.augment.tta`)."""
    model = nnx.merge(graphdef, params)
    x = images.astype(jnp.float32) / 255.0
    return tta(model, x) if tta_enabled else model(x)


def eval_step(params: nnx.State, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef, tta_enabled: bool = False
              ) -> dict[str, jax.Array]:
    """Per-sample confusion counts int32 [B, 4], the predicted masks bool [B, H, W] of ``batch`` and, for a model
    with a border output, the predicted borders bool [B, H, W] (``border``). Pure; jit it."""
    building, border = split_logits(predict_logits(params, batch["images"], graphdef=graphdef,
                                                   tta_enabled=tta_enabled))
    out = {"counts": confusion_counts(building, batch["masks"], batch["valid"]), "predicted": building > 0}
    if border is not None:
        out["border"] = border > 0
    return out


@functools.lru_cache(maxsize=8)
def compile_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, tta_enabled: bool = False) -> Callable:
    return jax.jit(functools.partial(eval_step, graphdef=graphdef, tta_enabled=tta_enabled),
                   in_shardings=(replicated(mesh), batch_sharded(mesh)))


def evaluate_stream(eval_fn: Callable, params: nnx.State, stream: SampleStream, mesh: Mesh, *,
                    objects: bool = True, progress: bool = False, observe: Callable | None = None,
                    min_area: int = OBJECT_MIN_AREA, match_threads: int = MATCH_THREADS) -> dict:
    """Metrics of ``params`` over every sample of ``stream`` (made with ``pad_last=True``: padding rows are masked).

    The host-side part of batch k (object matching) runs while the device computes batch k + 1, its samples matched
    on ``match_threads`` threads. ``observe``, when given, is called with each batch and its fetched eval outputs
    (``counts``, ``predicted``), e.g. to keep tiles.
    """
    parallel = match_threads > 1
    with ThreadPoolExecutor(match_threads, "tilesmith-match") if parallel else contextlib.nullcontext() as pool:
        metrics = SegmentationMetrics(objects=objects, min_area=min_area, mapper=pool.map if parallel else map)
        _evaluate_into(metrics, eval_fn, params, stream, mesh, progress=progress, observe=observe)
    return metrics.result()


def _evaluate_into(metrics: SegmentationMetrics, eval_fn: Callable, params: nnx.State, stream: SampleStream,
                   mesh: Mesh, *, progress: bool, observe: Callable | None) -> None:
    sharding = batch_sharded(mesh)

    def consume(batch, out):
        out = jax.device_get(out)
        metrics.update(out["counts"], batch.valid, batch.zooms, out["predicted"], batch.masks,
                       predicted_borders=out.get("border"), true_borders=batch.borders)
        if observe is not None:
            observe(batch, out)

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
