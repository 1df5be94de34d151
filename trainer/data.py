"""The input pipeline: batches of decoded samples streamed from the ``dataset`` view of PostgreSQL (SPEC: ``dataset``).

Stages of one epoch, each bounded so that memory does not grow with the table:

1. **order** - the ``sample_id`` of every sample of the split (and zooms, provider) is read once when the stream is
   made (8 bytes a sample: the only thing held for the whole table). An epoch visits them in the permutation drawn
   by ``np.random.default_rng((seed, epoch))``, or sorted by id when not shuffling, from ``start_batch * batch_size``.
2. **fetch + decode** - ``decode_workers`` worker processes (:mod:`trainer.pipeline`, started at the first epoch and
   kept until the stream is closed) each read chunks of :data:`~trainer.pipeline.CHUNK_ROWS` ids with their own
   asyncpg connection and decode them (:mod:`harvester.decode`) into slots of shared memory: outside this process's
   GIL, so a training loop's Python does not slow them down. Up to ``2 x decode_workers + prefetch`` chunks are in
   flight or decoded ahead.
3. **assemble** - in the thread that asks for the next batch: the decoded rows of each chunk, in the epoch's order,
   are copied from shared memory into the batch's arrays (one copy of the pixels). Training reads the stream through
   :func:`prefetch_to_device`, whose own thread does that copy and the placement on the device ahead of the step.

A row whose image or mask does not decode (or is not 256 x 256, or vanished from the view since the ids were read) is
skipped: logged at WARNING with its ``sample_id``, counted in :attr:`SampleStream.skipped`, and its place taken by the
following ids, so batches stay full and a skipped row shortens the epoch by one sample. Resuming at ``start_batch``
restarts from the id at position ``start_batch * batch_size`` of the same order: exact when no row before it was
skipped, otherwise shifted by as many rows.

Errors of the database (connection lost, bad query) are raised to the consumer from ``next()``; they are not retried.
One epoch is read at a time: starting another ends the previous one's iterator. Breaking out of an epoch (or an
exception in the consumer) drops its chunks still in flight; :meth:`SampleStream.close` (or leaving the ``with``
block, Ctrl-C included) stops the worker processes and frees the shared memory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import numbers
import threading
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, Self

import numpy as np

from harvester.decode import TILE_SIZE
from harvester.splits import SPLITS

from .errors import DataError
from .pipeline import CHUNK_ROWS, Batch, BatchAssembler, WorkerPool, close, connect, shared_bytes

__all__ = ["Batch", "SampleStream", "prefetch_to_device"]

log = logging.getLogger(__name__)



class SampleStream:
    """Batches of one split of the ``dataset`` view, epoch after epoch, decoded by worker processes.

    ``zooms`` (``None`` = every zoom) and ``provider`` (``None`` = every provider) restrict the samples further.
    Without ``pad_last`` an epoch yields only full batches (the remainder is dropped: for training); with it, the last
    partial batch is padded with rows whose ``valid`` is False (for evaluation over every sample).
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        database_url: str,
        split: str,
        zooms: Sequence[int] | None,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        pad_last: bool = False,
        decode_workers: int = 2,
        prefetch: int = 4,
        provider: str | None = None,
        borders: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        if zooms is not None and len(zooms) == 0:
            raise DataError("zooms must be None (every zoom) or a non-empty list of zoom levels")
        for name, value, least in (("batch_size", batch_size, 1), ("decode_workers", decode_workers, 1),
                                   ("prefetch", prefetch, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise DataError(f"{name} must be an integer >= {least}, not {value!r}")
        self.database_url = database_url
        self.split = split
        self.zooms = None if zooms is None else tuple(int(z) for z in zooms)
        self.provider = provider
        self.borders = borders  # derive the border/gap targets (1.7 ms a tile in the workers); else zeros
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.pad_last = pad_last
        self.decode_workers = int(decode_workers)
        self.prefetch = int(prefetch)
        self.fetch_rows = CHUNK_ROWS
        self.slots = 2 * self.decode_workers + self.prefetch
        self.skipped = 0  # rows skipped so far, over every epoch (see the module docstring)
        self._pool: WorkerPool | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._ids = _run_coroutine(self._read_ids())
        log.info(
            "sample stream: split=%s zooms=%s provider=%s samples=%d batch_size=%d batches/epoch=%d",
            split, self.zooms or "all", provider or "all", len(self._ids), batch_size, self.num_batches(),
        )

    def __len__(self) -> int:
        """Number of samples of the split (and zooms, provider), as read when the stream was made."""
        return int(self._ids.size)

    def num_batches(self) -> int:
        """Batches of a full epoch: ``ceil(n / B)`` with ``pad_last``, else ``floor(n / B)`` (before any skip)."""
        full, rest = divmod(len(self), self.batch_size)
        return full + (1 if self.pad_last and rest else 0)

    def order(self, epoch: int) -> np.ndarray:
        """The ids in the order epoch ``epoch`` visits them (same ``(seed, epoch)``, same order)."""
        if epoch < 0:
            raise DataError(f"epoch must be >= 0, not {epoch}")
        if not self.shuffle:
            return self._ids
        return np.random.default_rng((self.seed, epoch)).permutation(self._ids)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of epoch ``epoch``, starting at batch ``start_batch`` (to resume after a stop)."""
        ids = self._start(epoch, start_batch)
        return (batch for _, batch in self._iterate(iter([(epoch, ids)])))

    def batches(self, epoch: int = 0, start_batch: int = 0) -> Iterator[tuple[int, Batch]]:
        """``(epoch, batch)`` without end: the batches of :meth:`epoch` ``(epoch, start_batch)``, then of every
        following epoch from its batch 0, the same batches in the same order. What training reads: the workers
        decode the next epoch's first chunks while this one's last batches are consumed, where a loop over
        :meth:`epoch` drains and refills the pipeline at every epoch boundary (on a small split, such as Dubai's 945
        crops at batch 32, the step then waited for data a third of the time). An epoch begun at batch 0 that yields
        no batch (every row skipped) is a :class:`DataError`, not an endless loop."""
        ids = self._start(epoch, start_batch)
        following = ((e, self.order(e)) for e in itertools.count(epoch + 1))
        return self._iterate(itertools.chain([(epoch, ids)], following), whole_from=epoch + (start_batch > 0))

    def _start(self, epoch: int, start_batch: int) -> np.ndarray:
        if self._closed:
            raise DataError("the sample stream is closed")
        if start_batch < 0:
            raise DataError(f"start_batch must be >= 0, not {start_batch}")
        return self.order(epoch)[start_batch * self.batch_size:]

    @property
    def shared_memory_bytes(self) -> int:
        """Shared memory the worker processes decode into, whatever the size of the table."""
        return shared_bytes(self.slots, self.fetch_rows)

    def worker_pids(self) -> list[int]:
        """Process ids of the decode workers now running (none before the first epoch and after :meth:`close`)."""
        pool = self._pool
        return [] if pool is None or pool.closed else pool.pids

    def close(self) -> None:
        """Stop the worker processes and free their shared memory; an epoch still being read ends. Idempotent."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _started_pool(self) -> WorkerPool:
        with self._lock:
            if self._closed:
                raise DataError("the sample stream is closed")
            if self._pool is None:
                pool = WorkerPool(self.database_url, self.decode_workers, self.slots, self.fetch_rows,
                                  borders=self.borders)
                pool.start()
                weakref.finalize(self, pool.close)  # a stream dropped without close() still stops its workers
                self._pool = pool
            return self._pool

    def _iterate(self, epochs: Iterator[tuple[int, np.ndarray]], whole_from: int | None = None
                 ) -> Iterator[tuple[int, Batch]]:
        """``(epoch, batch)`` of each ``(epoch, ids)`` of ``epochs`` in turn, chunks submitted across epoch boundaries
        as slots free up. ``whole_from``: from this epoch on, an epoch that yields no batch raises."""
        pool = self._started_pool()
        generation = pool.new_generation()
        step = self.fetch_rows
        # (epoch, chunk ids or None for an empty epoch, last chunk of its epoch), lazily: `epochs` may not end
        plan = ((epoch, ids[i:i + step] if len(ids) else None, i + step >= len(ids))
                for epoch, ids in epochs for i in range(0, max(len(ids), 1), step))
        in_flight: deque[tuple[int | None, int, bool]] = deque()  # (chunk index or None, epoch, last), in order
        sent = 0

        def check() -> None:
            if pool.closed or pool.generation != generation:
                raise DataError("the sample stream was closed, or another epoch started, while this epoch was "
                                "being read")

        def submit_ahead() -> None:
            # The next chunk at least, then as many ahead as there are free slots (the workers stay busy meanwhile).
            nonlocal sent
            while not in_flight or pool.can_submit():
                planned = next(plan, None)
                if planned is None:
                    return
                epoch, ids, last = planned
                if ids is None:  # an empty epoch: let it end (or raise) before planning further
                    in_flight.append((None, epoch, last))
                    return
                pool.submit(sent, ids)  # a slot is free: every chunk before `in_flight` was released
                in_flight.append((sent, epoch, last))
                sent += 1

        current, assembler, yielded = None, BatchAssembler(self.batch_size), 0
        while True:
            check()
            submit_ahead()
            if not in_flight:
                return
            index, epoch, last = in_flight.popleft()
            if epoch != current:
                current, assembler, yielded = epoch, BatchAssembler(self.batch_size), 0
            if index is not None:
                chunk = pool.result(index)
                try:
                    for sample_id, reason in zip(chunk.ids.tolist(), chunk.reasons):
                        if reason is not None:
                            self._count_skip(sample_id, reason)
                    for batch in assembler.add(chunk, pool.images[chunk.slot], pool.masks[chunk.slot],
                                               pool.borders[chunk.slot]):
                        yield epoch, batch
                        yielded += 1
                        del batch  # not held here while the next one is made
                        check()
                finally:
                    pool.release(chunk)
            if not last:
                continue
            if self.pad_last and (batch := assembler.padded()) is not None:
                yield epoch, batch
                yielded += 1
                del batch
                check()
            if whole_from is not None and epoch >= whole_from and yielded == 0:
                raise DataError(f"epoch {epoch} of split {self.split!r} yielded no batch ({len(self)} samples, "
                                f"{self.skipped} skipped as undecodable so far, batch size {self.batch_size})")

    async def _read_ids(self) -> np.ndarray:
        conditions, args = ["split = $1"], list[object]([self.split])
        if self.zooms is not None:
            args.append(list(self.zooms))
            conditions.append(f"zoom = ANY(${len(args)}::integer[])")
        if self.provider is not None:
            args.append(self.provider)
            conditions.append(f"provider = ${len(args)}")
        # One bytea of 8-byte big-endian ids: 8 bytes a sample on the wire and in memory, not a record per row.
        sql = (f"SELECT string_agg(int8send(sample_id), ''::bytea ORDER BY sample_id) FROM dataset"
               f" WHERE {' AND '.join(conditions)}")
        conn = await connect(self.database_url)
        try:
            packed = await conn.fetchval(sql, *args)
        finally:
            await close(conn)
        return np.frombuffer(packed or b"", dtype=">i8").astype(np.int64)

    def _count_skip(self, sample_id: int, reason: str) -> None:
        self.skipped += 1
        log.warning("skipping sample %d: %s", sample_id, reason)


def split_stats(database_url: str, provider: str | None = None) -> dict[str, dict[str, float | int]]:
    """``{split: {"samples": n, "building_share": building pixels / all pixels}}`` of the ``dataset`` view (of one
    ``provider``, else all): what a split holds, and the IoU of predicting "building" everywhere on it."""
    async def fetch() -> list:
        conn = await connect(database_url)
        try:
            return await conn.fetch("SELECT split, count(*) AS n, sum(building_pixels)::float8 AS b FROM dataset"
                                    " WHERE $1::text IS NULL OR provider = $1 GROUP BY split", provider)
        finally:
            await close(conn)

    pixels = TILE_SIZE * TILE_SIZE
    return {r["split"]: {"samples": r["n"], "building_share": (r["b"] or 0.0) / (r["n"] * pixels)}
            for r in asyncio.run(fetch())}


def prefetch_to_device(batches: Iterator[Batch], size: int = 2, sharding: Any = None) -> Iterator[dict[str, Any]]:
    """Put batches on the accelerator ahead of use, keeping up to ``size`` of them placed ahead of the consumer.

    Yields ``{'images', 'masks', 'borders', 'valid'}`` as jax arrays (placed with ``sharding`` when given) and
    ``'sample_ids'``, ``'zooms'`` as host numpy arrays, in the order of ``batches``. A thread of this process
    (``tilesmith-prefetch``) draws the batches from ``batches`` (for a :class:`SampleStream`: the copy of each batch out
    of shared memory) and places them (``jax.device_put``) while the consumer's step runs: neither is on the
    consumer's path any more (at batch 32 they were 2 to 3 ms of each 17 ms GPU step, all counted as waiting for data).
    Both release the GIL while they copy. An exception of ``batches`` or of the placement is raised by ``next()``, after
    the batches before it. Closing this iterator (or leaving it by an exception) stops the thread and closes
    ``batches`` (so the stream's workers are free for the next reader).
    """
    import jax  # here, not at module level: the pipeline itself does not need jax

    if size < 1:
        raise DataError(f"prefetch size must be >= 1, not {size}")

    def put(batch: Batch) -> dict[str, Any]:
        arrays = {"images": batch.images, "masks": batch.masks, "borders": batch.borders, "valid": batch.valid}
        placed = jax.device_put(arrays, sharding) if sharding is not None else jax.device_put(arrays)
        return {**placed, "sample_ids": batch.sample_ids, "zooms": batch.zooms}

    source = iter(batches)
    ready: deque[dict[str, Any]] = deque()  # placed batches, at most `size`, counting the one being made
    state = {"done": False, "error": None, "stop": False}
    changed = threading.Condition()

    def produce() -> None:
        try:
            while True:
                with changed:  # room first: `size` placed batches at most, the one being made included
                    while len(ready) >= size and not state["stop"]:
                        changed.wait()
                    if state["stop"]:
                        return
                batch = next(source, None)
                if batch is None:
                    return
                item = put(batch)
                del batch
                with changed:
                    ready.append(item)
                    changed.notify_all()
                del item
        except BaseException as exc:  # noqa: BLE001 - raised again in the consumer's thread, in order
            with changed:
                state["error"] = exc
        finally:
            try:
                close = getattr(source, "close", None)
                if close is not None:
                    close()
            except BaseException as exc:  # noqa: BLE001
                with changed:
                    state["error"] = state["error"] or exc
            with changed:
                state["done"] = True
                changed.notify_all()

    thread = threading.Thread(target=produce, name="tilesmith-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            with changed:
                while not ready and not state["done"]:
                    changed.wait()
                if ready:
                    item = ready.popleft()
                    changed.notify_all()
                elif state["error"] is not None:
                    raise state["error"]
                else:
                    return
            yield item
            del item
    finally:
        with changed:
            state["stop"] = True
            ready.clear()
            changed.notify_all()
        thread.join()


def _run_coroutine(coro: Any) -> Any:
    """Run a coroutine to completion from synchronous code, also when the caller's thread runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread just below
            error.append(exc)

    thread = threading.Thread(target=target, name="tilesmith-sample-ids")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
