"""The training configuration: one frozen, typed object, validated once when it is made.

Like the ``configs/`` of flax's imagenet example, every field carries a comment saying what it means. The CLI builds
it from flags (and ``DATABASE_URL``); ``train_and_evaluate`` writes its resolved form to ``WORKDIR/config.json``, which
``evaluate`` and ``predict`` read back to rebuild the same model. The database password never leaves this object:
:meth:`TrainConfig.public` and every log line use :func:`redact_url`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harvester.db import redact_url  # one redaction rule for both packages

from .errors import ConfigError

DEFAULT_DATABASE_URL = "postgresql://postgres@localhost:5432/tiles"
DEFAULT_EPOCHS = 20
TILE_SIZE = 256  # pixels; every sample of the `dataset` view is a 256x256 slippy-map tile
#: Pixels: smaller buildings, true or predicted, are not counted by ``object_f1`` (``evaluate --min-area``) nor written
#: by ``predict --geojson``. SpaceNet's own scorer drops footprints under 20 pixels on both sides (solaris
#: ``spacenet_buildings_2(..., min_area=20)``); Dubai's test masks hold 232 components under 16 pixels (11 % of 2,169):
#: slivers that no prediction matches at IoU 0.5.
OBJECT_MIN_AREA = 20
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
CHECKPOINTS = ("best", "latest")  # what `evaluate --checkpoint` reads: the best validation IoU, or where training stopped
MAX_ZOOM = 22
CPU_BATCH_SIZE = 16  # `--batch-size auto` on CPU (and the default of TrainConfig)
MAX_AUTO_BATCH_PER_DEVICE = 128
DEFAULT_DECODE_WORKERS = min(16, os.cpu_count() or 2)  # decode worker processes of the input pipeline


@dataclass(frozen=True)
class TrainConfig:
    # PostgreSQL URL of the database holding the `dataset` view (DATABASE_URL / --database-url). Never logged in clear.
    database_url: str = DEFAULT_DATABASE_URL
    # Zoom levels to train on (samples of other zooms are not read); None = every zoom present.
    zooms: tuple[int, ...] | None = None
    # Length of training: exactly one of `steps` (optimizer steps) and `epochs` (passes over `train`) is set.
    steps: int | None = None
    epochs: int | None = None
    # Samples per optimizer step, over all devices; must be a multiple of the local device count (data parallel).
    batch_size: int = CPU_BATCH_SIZE
    # Width of the U-Net: filters of the first level, doubled at each downsampling (64 = the paper's width).
    base_filters: int = 32
    # Number of 2x downsamplings of the U-Net (the paper has 4); 2**depth must divide the 256-pixel tile.
    depth: int = 4
    # Peak learning rate of AdamW, reached after the linear warmup, then cosine-decayed to 1% of it.
    learning_rate: float = 1e-3
    # Share of the training steps spent in the linear warmup from 0 to `learning_rate`.
    warmup_fraction: float = 0.05
    # AdamW decoupled weight decay, applied to convolution kernels only (not to biases and norm scales).
    weight_decay: float = 1e-4
    # Gradients are rescaled so that their global L2 norm is at most this (optax.clip_by_global_norm).
    grad_clip_norm: float = 1.0
    # Keep an exponential moving average of the parameters (decay per step, warmed up as min(decay, (1+t)/(10+t))):
    # validation, the "best" checkpoint, evaluate and predict then use the average. 0 = off.
    ema_decay: float = 0.0
    # Weight of the soft Dice term in the loss (loss = BCE + dice_weight * Dice).
    dice_weight: float = 1.0
    # A second output channel, "border/gap between two buildings" (trainer.instances), learnt with BCE (+ Dice times
    # `border_dice_weight`) times `border_weight`; predict and the object metric split touching buildings along it.
    borders: bool = False
    border_weight: float = 1.0
    border_dice_weight: float = 0.0
    # The building BCE of a border/gap pixel weighs 1 + separation_weight (the U-Net paper's weight map); 0 = off.
    separation_weight: float = 0.0
    # Weight of the Lovasz hinge of the building output (a surrogate of 1 - IoU, over the batch's pixels) added to the
    # loss; 0 = off.
    lovasz_weight: float = 0.0
    # Residual U-Net blocks (each block's input added to its output, 1x1 projection where the width changes).
    residual: bool = True
    # Seed of parameter initialisation, data shuffling and augmentation: the same seed gives the same run.
    seed: int = 0
    # Random dihedral transform + brightness/contrast jitter of each training sample, on the device.
    augment: bool = True
    # With augment: also rescale each sample by a factor from [1/zoom_augment, zoom_augment] (1 = off; at most 2).
    zoom_augment: float = 1.0
    # Validate on `val` (and offer a "best" checkpoint) every this many steps, and at the end.
    eval_every: int = 500
    # Save the "latest" checkpoint every this many steps, and at the end.
    checkpoint_every: int = 500
    # Check the loss for NaN/inf and append a line to metrics.jsonl every this many steps.
    log_every: int = 25
    # Compute dtype of the network: "auto" = bfloat16 on GPU/TPU, float32 on CPU. Parameters are always float32.
    compute_dtype: str = "auto"
    # Worker processes fetching and decoding JPEG/PNG in the input pipeline, and batches decoded ahead of the step.
    decode_workers: int = DEFAULT_DECODE_WORKERS
    prefetch: int = 4

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the flag of the first field with an unusable value."""
        check_database_url(self.database_url, "DATABASE_URL / --database-url")
        if self.zooms is not None:
            if not self.zooms or any(not 0 <= z <= MAX_ZOOM for z in self.zooms):
                raise ConfigError(f"--zooms: expected zoom levels between 0 and {MAX_ZOOM}, got {self.zooms}")
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("--steps / --epochs: give exactly one of them")
        for name in ("steps", "epochs", "batch_size", "base_filters", "depth", "eval_every", "checkpoint_every",
                     "log_every", "decode_workers", "prefetch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')}: must be a positive integer, got {value!r}")
        if TILE_SIZE % (2 ** self.depth) or self.depth > 7:
            raise ConfigError(f"--depth: 2**depth must divide the {TILE_SIZE}-pixel tile (depth 1..7), got {self.depth}")
        for name in ("learning_rate", "grad_clip_norm"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be a positive number, got {value!r}")
        for name in ("weight_decay", "dice_weight", "border_weight", "border_dice_weight", "separation_weight",
                     "lovasz_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be a number >= 0, got {value!r}")
        if not math.isfinite(self.zoom_augment) or not 1.0 <= self.zoom_augment <= 2.0:
            raise ConfigError(f"--zoom-augment: must be a number from 1 (off) to 2, got {self.zoom_augment!r}")
        if not (math.isfinite(self.ema_decay) and 0 <= self.ema_decay < 1):
            raise ConfigError(f"--ema-decay: must be in [0, 1) (0 = off), got {self.ema_decay!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"--warmup-fraction: must be in [0, 1), got {self.warmup_fraction!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"--compute-dtype: expected one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")

    @property
    def uses_border_targets(self) -> bool:
        """Whether the loss reads the border/gap targets (the border output or the separation weight): only then
        does the training stream derive them (1.7 ms a tile in the decode workers)."""
        return self.borders or self.separation_weight > 0

    def public(self) -> dict[str, Any]:
        """Every field as JSON-ready values, the database password redacted (for logs and config.json)."""
        out = dataclasses.asdict(self)
        out["database_url"] = redact_url(self.database_url)
        out["zooms"] = list(self.zooms) if self.zooms is not None else None
        return out


def resolve_batch_size(value: int | str, base_filters: int = 32) -> int:
    """``--batch-size``: an integer as given; ``auto`` by backend (imports jax).

    CPU: 16. GPU/TPU, per device: ``2 x memory in GiB x 32 / base_filters`` rounded down to a power of two, between 16
    and 128 (an 80 GiB H100 or 141 GiB H200: 128 at base 32, 64 at base 64; a 24 GiB card: 32 at base 32), times the
    local device count. A device that does not report its memory gets 64 per device at base 32.
    """
    if value != "auto":
        return int(value)
    import jax

    devices = jax.local_devices()
    if jax.default_backend() == "cpu":
        return -(-CPU_BATCH_SIZE // len(devices)) * len(devices)
    try:
        memory_gib = devices[0].memory_stats()["bytes_limit"] / 2**30
    except (AttributeError, KeyError, TypeError, NotImplementedError, RuntimeError):
        memory_gib = 32.0
    fits = max(1, int(2 * memory_gib * 32 / base_filters))
    per_device = min(MAX_AUTO_BATCH_PER_DEVICE, max(CPU_BATCH_SIZE, 2 ** (fits.bit_length() - 1)))
    return per_device * len(devices)


def check_database_url(url: str | None, name: str = "DATABASE_URL") -> str:
    """``url`` when it is a PostgreSQL URL, else :class:`ConfigError` naming ``name`` (password redacted)."""
    if not re.match(r"^postgres(ql)?://[^\s]+$", url or ""):
        raise ConfigError(f"{name}: expected postgresql://user@host:port/dbname, got {redact_url(url)!r}")
    return url


def parse_zooms(text: str, name: str = "--zooms") -> tuple[int, ...]:
    """``"17,18"`` -> ``(17, 18)``; a malformed list raises :class:`ConfigError` naming ``name``."""
    parts = [p.strip() for p in text.split(",")]
    try:
        zooms = tuple(sorted({int(p) for p in parts}))
    except ValueError:
        raise ConfigError(f"{name}: expected comma-separated zoom levels such as 17,18, got {text!r}") from None
    if not zooms or any(not 0 <= z <= MAX_ZOOM for z in zooms):
        raise ConfigError(f"{name}: zoom levels must lie between 0 and {MAX_ZOOM}, got {text!r}")
    return zooms


def write_config(config: TrainConfig, workdir: Path, **resolved: Any) -> Path:
    """Write the configuration (plus values resolved at run time, e.g. total steps) to ``workdir/config.json``."""
    path = Path(workdir) / "config.json"
    payload = {**config.public(), "resolved": resolved}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


# What a config.json written before a field existed meant: the model and loss of that time.
LEGACY_FIELDS = {"borders": False, "residual": False, "border_weight": 1.0, "border_dice_weight": 0.0,
                 "separation_weight": 0.0, "lovasz_weight": 0.0, "ema_decay": 0.0}


def read_model_config(workdir: Path) -> dict[str, Any]:
    """The saved configuration of a work directory (what ``evaluate`` and ``predict`` need to rebuild the model)."""
    path = Path(workdir) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--workdir: {path} not found; is {workdir} a directory written by `trainer train`?") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--workdir: cannot read {path}: {exc}") from None
    for key in ("base_filters", "depth"):
        if not isinstance(saved.get(key), int):
            raise ConfigError(f"--workdir: {path} lacks the integer field {key!r}; rerun `trainer train`")
    return {**LEGACY_FIELDS, **saved}


# The defaults of the fields (the CLI's defaults come from here: one place for the recipe).
TRAIN_DEFAULTS = TrainConfig(steps=1)
