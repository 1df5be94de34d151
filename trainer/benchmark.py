"""``trainer benchmark``: speed of the train step on the current backend, and of the input pipeline feeding it.

The step is the real compiled ``trainer.steps`` train step (augmentation, forward, backward, AdamW update; data
parallel over every local device) on a synthetic batch already on the device, so the input pipeline is out of the
picture. Its FLOPs are counted from the layer shapes (:mod:`trainer.flops`); MFU = achieved FLOP/s / (peak FLOP/s of
one device x devices), ``None`` where the peak is unknown (CPU) unless ``peak_tflops`` is given.

The loader is :class:`trainer.data.SampleStream` over split ``train`` of a database, epoch after epoch as training
reads it (:meth:`~trainer.data.SampleStream.batches`), after one untimed batch; ``gil_hog`` adds a thread of this process that holds the GIL about half the time,
as a training loop's Python dispatch does.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DataError

TRAIN_SPLIT = "train"


def step_benchmark(base_filters: int, batch_size: int, steps: int, *, depth: int = 4, compute_dtype: str = "auto",
                   peak_tflops: float | None = None, options: dict | None = None,
                   compiler_options: dict | None = None, on_compiled: Callable[[Any], None] | None = None) -> dict:
    """Time ``steps`` train steps (after one untimed warm-up step); one JSON-ready dict (SPEC: trainer benchmark).
    ``options``: further :class:`~trainer.config.TrainConfig` fields (e.g. ``augment``), for experiments;
    ``compiler_options``: XLA options of this compilation of the step (``Lowered.compile``'s, e.g.
    ``{"xla_gpu_autotune_level": 0}``; XLA rejects an unknown name); ``on_compiled``: called with the compiled step
    that is timed (e.g. to read its optimized program)."""
    import jax
    import jax.numpy as jnp

    from .config import TrainConfig
    from .flops import peak_tflops as device_peak
    from .flops import train_flops_per_image
    from .model import default_compute_dtype
    from .steps import StepSpec, batch_sharded, compiled_functions, make_mesh

    config = TrainConfig(steps=steps + 1, batch_size=batch_size, base_filters=base_filters, depth=depth,
                         compute_dtype=compute_dtype, **(options or {}))
    mesh = make_mesh(batch_size)
    _, _, init, step = compiled_functions(StepSpec.of(config, steps + 1), mesh)
    state = init()
    rng = np.random.default_rng(0)
    batch = jax.device_put({
        "images": rng.integers(0, 256, (batch_size, 256, 256, 3), dtype=np.uint8),
        "masks": (rng.random((batch_size, 256, 256)) > 0.9).astype(np.uint8),
        "borders": (rng.random((batch_size, 256, 256)) > 0.98).astype(np.uint8),
        "valid": np.ones(batch_size, bool),
    }, batch_sharded(mesh))
    started = time.perf_counter()
    compiled = step.lower(state, batch).compile(compiler_options)
    compile_s = time.perf_counter() - started
    if on_compiled is not None:
        on_compiled(compiled)
    state, metrics = compiled(state, batch)  # warm-up: the first run allocates
    jax.block_until_ready(metrics)
    started = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - started) / steps
    devices = len(mesh.devices.flat)
    device = jax.devices()[0]
    backend = jax.default_backend()
    flops = train_flops_per_image(base_filters, depth, residual=config.residual, outputs=2 if config.borders else 1)
    peak = peak_tflops if peak_tflops is not None else device_peak(device.device_kind, backend)
    images_per_s = batch_size / step_s
    achieved = flops * images_per_s / 1e12
    return {
        "backend": backend, "device": device.device_kind, "devices": devices, "base_filters": base_filters,
        "depth": depth, "residual": config.residual, "batch_size": batch_size, "steps": steps,
        "compute_dtype": str(jnp.dtype(default_compute_dtype(compute_dtype))), "compile_s": round(compile_s, 3),
        "step_s": step_s, "images_per_s": images_per_s, "train_flops_per_image": flops, "tflops_per_s": achieved,
        "peak_tflops": peak, "mfu": achieved / (peak * devices) if peak else None,
    }


@dataclass(frozen=True)
class LoaderMeasure:
    samples_per_s: float  # wall clock
    cpu_ms_per_sample: float  # CPU time of this process (every thread; not the worker processes nor PostgreSQL)
    wait_fraction: float = 0.0  # share of the wall clock spent waiting for the next batch


def measure_loader(database_url: str, batch_size: int, workers: int, *, samples: int = 2000, prefetch: int = 4,
                   gil_hog: bool = False, split: str = TRAIN_SPLIT, continuous: bool = True,
                   pace_s: float = 0.0, to_device: bool = False) -> LoaderMeasure:
    """:class:`SampleStream` (shuffled) over at least ``samples`` samples of ``split``, epochs one after another:
    one :meth:`~SampleStream.batches` stream, or with ``continuous`` False one :meth:`~SampleStream.epoch` at a
    time (the pipeline drained and refilled at each boundary: what training did before). ``pace_s``: the consumer
    spends that long on each batch (sleeping, GIL released: a GPU step's stand-in); ``wait_fraction`` then says how
    much of the time it waited for data beyond that. ``to_device``: read through :func:`~trainer.data.prefetch_to_device`
    (2 batches ahead, onto jax's default device) as training does, the copies out of shared memory and the placement
    on its thread; else the host batches straight from the stream, copied in the consumer's ``next()``."""
    from .data import SampleStream

    # As the default training reads it: without border targets (trainer.train derives them only when used).
    with SampleStream(database_url, split, None, batch_size, decode_workers=workers, prefetch=prefetch,
                      borders=False) as stream:
        if stream.num_batches() == 0:
            raise DataError(f"split {split!r} holds {len(stream)} samples, fewer than one batch of {batch_size}")
        if continuous:
            batches = stream.batches(0)  # epoch after epoch, as training reads them
        else:
            batches = ((e, b) for e in itertools.count() for b in stream.epoch(e))
        if to_device:
            from .data import prefetch_to_device

            batches = prefetch_to_device((b for _, b in batches), size=2)  # closing it closes the stream's

            def valid_rows(item: dict) -> int:
                return int((item["sample_ids"] >= 0).sum())  # host-side: no wait for the device
        else:
            def valid_rows(item: tuple) -> int:
                return int(item[1].valid.sum())
        try:
            next(batches)  # warm PostgreSQL's cache, the workers and the decoders
            with hog_gil() if gil_hog else contextlib.nullcontext():
                seen, waited = 0, 0.0
                start, cpu = time.perf_counter(), time.process_time()
                while seen < samples:
                    asked = time.perf_counter()
                    seen += valid_rows(next(batches))
                    waited += time.perf_counter() - asked
                    if pace_s:
                        time.sleep(pace_s)
                wall = time.perf_counter() - start
                return LoaderMeasure(seen / wall, (time.process_time() - cpu) / seen * 1e3, waited / wall)
        finally:
            batches.close()


@contextlib.contextmanager
def hog_gil(busy_s: float = 0.005) -> Iterator[None]:
    """A thread that holds the GIL about half the time: pure Python for ``busy_s``, then sleeps as long."""
    stop = threading.Event()

    def hog() -> None:
        while not stop.is_set():
            until = time.perf_counter() + busy_s
            while time.perf_counter() < until:
                pass
            time.sleep(busy_s)

    thread = threading.Thread(target=hog, name="tilesmith-gil-hog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def format_row(r: dict) -> str:
    """One line of ``trainer benchmark``'s table."""
    mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
    line = (f"{r['backend']} ({r['device']} x{r['devices']}) base {r['base_filters']} depth {r['depth']} batch "
            f"{r['batch_size']} {r['compute_dtype']}: {r['images_per_s']:.1f} images/s, {r['step_s'] * 1e3:.0f} ms/step,"
            f" {r['train_flops_per_image'] / 1e9:.1f} GFLOP/image, {r['tflops_per_s']:.3f} TFLOP/s, MFU {mfu}"
            f" (compile {r['compile_s']:.1f} s)")
    if r.get("loader_samples_per_s") is not None:
        ratio = r["loader_to_step"]
        line += (f"; loader {r['loader_samples_per_s']:.0f} samples/s = {ratio:.2f} x the step"
                 f" ({'loader ahead' if ratio >= 1 else 'THE STEP WOULD WAIT FOR DATA'})")
    return line
