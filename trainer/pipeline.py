"""The producer of one epoch of :class:`trainer.data.SampleStream`: fetch, decode, assemble, on background threads.

A thread runs its own asyncio event loop. It reads the rows of the epoch's ids in chunks with asyncpg
(``WHERE sample_id = ANY($1)`` on the ``dataset`` view, only the columns decoded) over one connection, up to
:data:`FETCH_LOOKAHEAD` chunks ahead; each chunk is decoded by a pool of host threads (:mod:`trainer.decode`), then its
samples are copied, in the epoch's order, into the arrays of the batch being filled. Full batches wait in an
``asyncio.Queue`` of ``prefetch`` batches that the consumer drains from its own thread with :meth:`EpochProducer.get`;
the producer waits while it is full. Decoded samples held at once: at most ``(prefetch + 3) * batch_size +
(FETCH_LOOKAHEAD + 1) * fetch_rows`` (the queue, the batch waiting to enter it, the one being filled, the
consumer's, the chunks in flight and the one being copied), whatever the size of the table.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np

from .config import redact_url
from .decode import TILE_SIZE, DecodeError, decode_image, decode_mask
from .errors import DataError

log = logging.getLogger(__name__)

FETCH_LOOKAHEAD = 2  # chunks fetched or being decoded ahead of the one being assembled
_CLOSE_TIMEOUT_S = 5.0
_ROWS_SQL = "SELECT sample_id, zoom, image, image_format, mask FROM dataset WHERE sample_id = ANY($1::bigint[])"


@dataclass(frozen=True, eq=False)
class Batch:
    """One batch of samples, host-side. Padding rows (only in the last batch of a ``pad_last`` epoch) are zeros."""

    images: np.ndarray  # uint8 [B, 256, 256, 3], RGB
    masks: np.ndarray  # uint8 [B, 256, 256], 1 = building
    valid: np.ndarray  # bool [B]; False for padding rows
    sample_ids: np.ndarray  # int64 [B]; -1 for padding
    zooms: np.ndarray  # int32 [B]; -1 for padding


@dataclass(frozen=True)
class _Failure:
    """An exception of the producer, handed over to be raised in the consumer's thread."""

    error: BaseException


_END = object()  # the last item of an epoch's queue


@dataclass(frozen=True)
class _Decoded:
    sample_id: int
    zoom: int
    image: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class _Skipped:
    sample_id: int
    reason: str


class EpochProducer:
    """Produces the batches of ``ids`` (in that order) until stopped. ``on_skip(sample_id, reason)`` is called, on
    the producer's thread, for each row that is skipped."""

    def __init__(self, database_url: str, ids: np.ndarray, *, batch_size: int, fetch_rows: int, pad_last: bool,
                 decode_workers: int, prefetch: int, on_skip: Callable[[int, str], None]) -> None:
        self._database_url = database_url
        self._ids = ids
        self._batch_size = batch_size
        self._fetch_rows = fetch_rows
        self._pad_last = pad_last
        self._decode_workers = decode_workers
        self._on_skip = on_skip
        self._loop = asyncio.new_event_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=prefetch)
        self._pool = concurrent.futures.ThreadPoolExecutor(decode_workers, thread_name_prefix="tilesmith-decode")
        self._thread = threading.Thread(target=self._run, name="tilesmith-sample-stream", daemon=True)
        self._task: asyncio.Task[None] | None = None
        self._stop_lock = threading.Lock()
        self._stopped = False

    def start(self) -> None:
        self._thread.start()

    def get(self) -> Batch | None:
        """The next batch, waiting for it; ``None`` at the end of the epoch. Raises what the producer raised."""
        closed = "the sample stream was closed while an epoch was being read"
        if self._stopped:
            raise DataError(closed)
        try:
            future = asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop)
        except RuntimeError as exc:  # the loop was closed by a concurrent stop()
            raise DataError(closed) from exc
        try:
            item = future.result()
        except concurrent.futures.CancelledError as exc:
            raise DataError(closed) from exc
        if isinstance(item, _Failure):
            raise item.error
        return None if item is _END else item

    def stop(self) -> None:
        """Cancel the producer, stop the loop, join the thread and the decode pool. Idempotent, any thread."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._cancel)
            self._thread.join()
        else:
            self._loop.close()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.add_done_callback(lambda _task: self._loop.stop())
            self._task.cancel()
        else:
            self._loop.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._task = self._loop.create_task(self._produce())
            self._loop.run_forever()  # until stop(): the consumer reads the queue through this loop
        finally:
            leftovers = asyncio.all_tasks(self._loop)
            for task in leftovers:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()

    async def _produce(self) -> None:
        try:
            conn = await connect(self._database_url)
            try:
                await self._pipeline(conn)
            finally:
                await close(conn)  # also after a cancellation: terminating under a query leaves an orphan future
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed over whole, raised again in the consumer's thread
            await self._queue.put(_Failure(exc))
            return
        await self._queue.put(_END)

    async def _pipeline(self, conn: asyncpg.Connection) -> None:
        step = self._fetch_rows
        chunks = (self._ids[i:i + step] for i in range(0, len(self._ids), step))
        fetch_lock = asyncio.Lock()  # one query at a time on the connection; FIFO, so chunks are fetched in order
        in_flight: deque[asyncio.Task[list[_Decoded | _Skipped]]] = deque()

        def launch_next() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                in_flight.append(asyncio.ensure_future(self._fetch_and_decode(conn, fetch_lock, chunk)))

        assembler = BatchAssembler(self._batch_size)
        try:
            for _ in range(FETCH_LOOKAHEAD):
                launch_next()
            while in_flight:
                head = in_flight.popleft()
                launch_next()
                await self._assemble(head, assembler)
                del head  # the task holds its decoded samples until it is dropped
            if self._pad_last and (batch := assembler.padded()) is not None:
                await self._queue.put(batch)
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _assemble(self, chunk: asyncio.Task[list[_Decoded | _Skipped]], assembler: BatchAssembler) -> None:
        """Add a decoded chunk to the batches, queueing each one filled; each sample is released once copied."""
        samples = await chunk
        for i, sample in enumerate(samples):
            samples[i] = None  # type: ignore[call-overload]
            if isinstance(sample, _Skipped):
                self._on_skip(sample.sample_id, sample.reason)
            elif (batch := assembler.add(sample)) is not None:
                del sample
                await self._queue.put(batch)

    async def _fetch_and_decode(
        self, conn: asyncpg.Connection, fetch_lock: asyncio.Lock, chunk: np.ndarray
    ) -> list[_Decoded | _Skipped]:
        async with fetch_lock:
            rows = await conn.fetch(_ROWS_SQL, chunk.tolist())
        by_id = {row[0]: row for row in rows}
        ordered = [(sample_id, by_id.get(sample_id)) for sample_id in chunk.tolist()]
        # A few slices per worker: small enough to balance the pool, large enough to keep the per-call cost low.
        pieces = max(1, min(len(ordered), 2 * self._decode_workers))
        size = -(-len(ordered) // pieces)
        loop = asyncio.get_running_loop()
        parts = await asyncio.gather(*(
            loop.run_in_executor(self._pool, decode_rows, ordered[i:i + size]) for i in range(0, len(ordered), size)
        ))
        return list(itertools.chain.from_iterable(parts))


def decode_rows(rows: list[tuple[int, Any]]) -> list[_Decoded | _Skipped]:
    """Decode fetched rows (``None`` for a row that vanished since the ids were read); runs on a decode thread."""
    out: list[_Decoded | _Skipped] = []
    for sample_id, row in rows:
        if row is None:
            out.append(_Skipped(sample_id, "no longer in the dataset view"))
            continue
        try:
            image = decode_image(row["image"])
            mask = decode_mask(row["mask"])
        except DecodeError as exc:
            out.append(_Skipped(sample_id, f"{exc} (stored image_format {row['image_format']})"))
            continue
        out.append(_Decoded(sample_id, row["zoom"], image, mask))
    return out


class BatchAssembler:
    """Copies decoded samples into the arrays of the batch being filled."""

    def __init__(self, batch_size: int) -> None:
        self._size = batch_size
        self._fill = 0
        self._new_arrays()

    def _new_arrays(self) -> None:
        b, s = self._size, TILE_SIZE
        self._images = np.empty((b, s, s, 3), np.uint8)
        self._masks = np.empty((b, s, s), np.uint8)
        self._ids = np.full(b, -1, np.int64)
        self._zooms = np.full(b, -1, np.int32)

    def add(self, sample: _Decoded) -> Batch | None:
        """Add one sample; the batch when it is now full."""
        i = self._fill
        self._images[i] = sample.image
        self._masks[i] = sample.mask
        self._ids[i] = sample.sample_id
        self._zooms[i] = sample.zoom
        self._fill += 1
        return self._emit() if self._fill == self._size else None

    def padded(self) -> Batch | None:
        """The partial batch, its remaining rows zeroed and marked invalid; ``None`` when it is empty."""
        if self._fill == 0:
            return None
        self._images[self._fill:] = 0
        self._masks[self._fill:] = 0
        return self._emit()

    def _emit(self) -> Batch:
        valid = np.zeros(self._size, bool)
        valid[:self._fill] = True
        batch = Batch(self._images, self._masks, valid, self._ids, self._zooms)
        self._fill = 0
        self._new_arrays()
        return batch


async def connect(database_url: str) -> asyncpg.Connection:
    """A connection, or :class:`DataError` naming the (password-redacted) URL."""
    try:
        return await asyncpg.connect(database_url)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DataError(f"cannot connect to the database {redact_url(database_url)}: {exc}") from exc


async def close(conn: asyncpg.Connection) -> None:
    """Close gracefully; terminate when that does not finish in time or fails."""
    try:
        await asyncio.wait_for(conn.close(), _CLOSE_TIMEOUT_S)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        conn.terminate()
