"""The workers of :class:`trainer.data.SampleStream`: processes that fetch and decode whole chunks into shared memory.

A :class:`WorkerPool` holds ``workers`` processes (fresh interpreters running :func:`worker_main`: never ``fork`` a
process that runs JAX, and unlike ``multiprocessing``'s ``spawn`` they do not import the caller's main module) and
one block of shared memory of ``slots`` slots, each holding the decoded images, masks and border targets of one chunk of
:data:`CHUNK_ROWS` samples. Both live as long as the stream, not one epoch. The consumer's process sends each worker,
over its own pipe, tasks ``(generation, chunk index, slot, ids)``; the worker reads those rows from PostgreSQL over its
own asyncpg connection (``WHERE sample_id = ANY($1)`` on the ``dataset`` view, only the columns decoded), decodes
them (:mod:`harvester.decode`) straight into the slot, derives each row's border/gap target
(:func:`trainer.instances.border_target`, from ``instances`` where the row has them, else from the mask), and answers with the chunk's zooms and, for each row it could not
decode, the reason. Fetching and decoding thus run outside the consumer's GIL; what crosses the pipes is a few hundred
bytes a chunk, and the pixels are copied once, from the slot into the batch handed to the consumer.

Shutdown: :meth:`WorkerPool.close` asks each worker to leave, then terminates (and at last kills) any that does not
within a few seconds, and frees the shared memory. Workers ignore SIGINT (Ctrl-C reaches the whole process group: the
consumer decides), and leave by themselves when the consumer's process is gone (their socket closes or they are
re-parented), so no worker outlives its stream, even after ``kill -9`` of the consumer. A worker that dies is seen
as the end of its socket: the consumer gets a :class:`DataError` naming its exit code.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from multiprocessing import connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import asyncpg
import numpy as np

from .config import redact_url
from harvester.decode import TILE_SIZE, DecodeError, decode_image, decode_instances, decode_mask
from .errors import DataError
from .instances import border_target

log = logging.getLogger(__name__)

CHUNK_ROWS = 32  # rows per fetch query and per worker task
IMAGE_BYTES = TILE_SIZE * TILE_SIZE * 3
MASK_BYTES = TILE_SIZE * TILE_SIZE  # and as many for the border target
_CLOSE_TIMEOUT_S = 5.0
_PARENT_CHECK_S = 1.0
_ROWS_SQL = ("SELECT sample_id, zoom, image, image_format, mask, instances FROM dataset"
             " WHERE sample_id = ANY($1::bigint[])")


@dataclass(frozen=True, eq=False)
class Batch:
    """One batch of samples, host-side. Padding rows (only in the last batch of a ``pad_last`` epoch) are zeros."""

    images: np.ndarray  # uint8 [B, 256, 256, 3], RGB
    masks: np.ndarray  # uint8 [B, 256, 256], 1 = building
    borders: np.ndarray  # uint8 [B, 256, 256], 1 = border/gap between two buildings (trainer.instances)
    valid: np.ndarray  # bool [B]; False for padding rows
    sample_ids: np.ndarray  # int64 [B]; -1 for padding
    zooms: np.ndarray  # int32 [B]; -1 for padding


@dataclass(frozen=True)
class Chunk:
    """A decoded chunk, in its slot: ``reasons[i]`` is ``None`` where row ``i`` decoded, else why it was skipped."""

    index: int
    slot: int
    ids: np.ndarray
    zooms: np.ndarray
    reasons: list[str | None]


def shared_bytes(slots: int, chunk_rows: int = CHUNK_ROWS) -> int:
    """Bytes of shared memory of a pool: the decoded images, masks and borders of ``slots`` chunks."""
    return slots * chunk_rows * (IMAGE_BYTES + 2 * MASK_BYTES)


def _slot_arrays(buffer: Any, slots: int, chunk_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = np.ndarray((slots, chunk_rows, TILE_SIZE, TILE_SIZE, 3), np.uint8, buffer=buffer)
    masks = np.ndarray((slots, chunk_rows, TILE_SIZE, TILE_SIZE), np.uint8, buffer=buffer,
                       offset=slots * chunk_rows * IMAGE_BYTES)
    borders = np.ndarray((slots, chunk_rows, TILE_SIZE, TILE_SIZE), np.uint8, buffer=buffer,
                         offset=slots * chunk_rows * (IMAGE_BYTES + MASK_BYTES))
    return images, masks, borders


class WorkerPool:
    """``workers`` decode processes and ``slots`` chunks of shared memory, from :meth:`start` to :meth:`close`."""

    def __init__(self, database_url: str, workers: int, slots: int, chunk_rows: int = CHUNK_ROWS, *,
                 borders: bool = True) -> None:
        self.database_url = database_url
        self.with_borders = borders
        self.workers = workers
        self.slots = slots
        self.chunk_rows = chunk_rows
        self.generation = 0
        self.closed = False
        self._shm: SharedMemory | None = None
        self._procs: list[subprocess.Popen] = []
        self._pipes: list[connection.Connection] = []
        self._load: list[int] = []  # tasks sent to each worker and not answered yet
        self._free: list[int] = []
        self._done: dict[int, Chunk | BaseException] = {}  # answers of the current generation, by chunk index
        self._task_slot: dict[tuple[int, int], int] = {}  # (generation, index) -> slot, for every task in flight

    def start(self) -> None:
        size = shared_bytes(self.slots, self.chunk_rows)
        _check_shared_memory(size)
        self._shm = SharedMemory(create=True, size=size)
        self.images, self.masks, self.borders = _slot_arrays(self._shm.buf, self.slots, self.chunk_rows)
        self._free = list(range(self.slots))
        # The same `trainer` as ours first on the path, whatever is installed.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (
            str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH"))))}
        try:
            for _ in range(self.workers):
                ours, theirs = socket.socketpair()
                with ours, theirs:
                    process = subprocess.Popen(
                        [sys.executable, "-c", "import sys; from trainer.pipeline import worker_main; "
                         "worker_main(*sys.argv[1:])", self.database_url, str(theirs.fileno()), self._shm.name,
                         str(self.slots), str(self.chunk_rows), str(os.getpid()), str(int(self.with_borders))],
                        pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
                    )
                    self._procs.append(process)
                    self._pipes.append(connection.Connection(ours.detach()))
                self._load.append(0)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def new_generation(self) -> int:
        """Start an epoch: answers of earlier generations still in flight will be dropped on arrival."""
        self.generation += 1
        for answer in self._done.values():
            if isinstance(answer, Chunk):
                self._free.append(answer.slot)
        self._done.clear()
        return self.generation

    def can_submit(self) -> bool:
        return bool(self._free)

    def submit(self, index: int, ids: np.ndarray) -> None:
        """Send chunk ``index`` of the current generation to the least loaded worker (once a slot is free)."""
        while not self._free:
            self._receive()
        slot = self._free.pop()
        worker = min(range(self.workers), key=self._load.__getitem__)
        self._task_slot[(self.generation, index)] = slot
        try:
            self._pipes[worker].send((self.generation, index, slot, ids))
        except OSError:
            raise self._died(worker) from None
        self._load[worker] += 1

    def result(self, index: int) -> Chunk:
        """The decoded chunk ``index`` of the current generation, waiting for it; raises what its worker raised."""
        while index not in self._done:
            self._receive()
        answer = self._done.pop(index)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def release(self, chunk: Chunk) -> None:
        if chunk.slot not in self._free:  # idempotent; new_generation() may have taken it back already
            self._free.append(chunk.slot)

    def _receive(self) -> None:
        if self.closed:
            raise DataError("the sample stream was closed while an epoch was being read")
        for item in connection.wait(self._pipes):
            worker = self._pipes.index(item)
            try:
                generation, index, ids, zooms, reasons, error = item.recv()
            except (EOFError, OSError):
                raise self._died(worker) from None
            self._load[worker] -= 1
            slot = self._task_slot.pop((generation, index))
            if generation != self.generation:
                self._free.append(slot)
            elif error is not None:
                self._free.append(slot)
                self._done[index] = error
            else:
                self._done[index] = Chunk(index, slot, ids, zooms, reasons)

    def _died(self, worker: int) -> DataError:
        if self.closed:  # close() from another thread stopped it
            return DataError("the sample stream was closed while an epoch was being read")
        process = self._procs[worker]
        try:
            code: object = process.wait(_CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = "none yet: it closed its socket"
        return DataError(f"decode worker {worker} (pid {process.pid}) died, exit code {code}")

    def close(self) -> None:
        """Ask every worker to leave; terminate those that do not in time; free the shared memory. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for pipe in self._pipes:
            try:
                pipe.send(None)
            except (OSError, ValueError):
                pass
        for number, process in enumerate(self._procs):
            try:
                process.wait(_CLOSE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("decode worker %d (pid %d) did not stop in %.0f s: terminating it", number, process.pid,
                            _CLOSE_TIMEOUT_S)
                process.terminate()
                try:
                    process.wait(_CLOSE_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for pipe in self._pipes:
            pipe.close()
        self.images = self.masks = self.borders = None  # type: ignore[assignment] - views of the freed block
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None


def _check_shared_memory(size: int) -> None:
    """A clear error rather than a SIGBUS when /dev/shm cannot hold the pool (Docker's default is 64 MiB)."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return
    free = stat.f_bavail * stat.f_frsize
    if free < size:
        raise DataError(f"the input pipeline needs {size / 2**20:.0f} MiB of shared memory, /dev/shm has "
                        f"{free / 2**20:.0f} MiB free: lower --decode-workers or give the container more "
                        "(docker run --shm-size / compose shm_size)")


# ---------------------------------------------------------------------------------------------------- worker side


def worker_main(database_url: str, fd: str, shm_name: str, slots: str, chunk_rows: str, parent_pid: str,
                with_borders: str = "1") -> None:
    """A decode worker: serve tasks from the socket ``fd`` until told to stop or the parent process is gone.

    Two threads: one receives tasks and fetches their rows, one chunk ahead, while this one decodes the previous chunk
    (simplejpeg and Pillow release the GIL), so the round trip to PostgreSQL is hidden behind decoding.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pipe = connection.Connection(int(fd))
    slots, chunk_rows, parent_pid, with_borders = int(slots), int(chunk_rows), int(parent_pid), with_borders == "1"
    # Mapped directly (Linux keeps POSIX shared memory in /dev/shm): SharedMemory(name) would register the block with
    # a resource tracker of this process, which would unlink it when this worker exits.
    with open(f"/dev/shm/{shm_name.lstrip('/')}", "r+b") as file:
        shm = mmap.mmap(file.fileno(), shared_bytes(slots, chunk_rows))
    images, masks, borders = _slot_arrays(shm, slots, chunk_rows)
    fetched: queue.Queue[tuple | None] = queue.Queue(maxsize=1)
    fetcher = threading.Thread(target=_fetch_ahead, args=(database_url, pipe, fetched, parent_pid), daemon=True)
    fetcher.start()
    try:
        while (item := fetched.get()) is not None:
            generation, index, slot, ids, rows, error = item
            if error is None:
                try:
                    zooms, reasons = decode_rows(rows, ids, images[slot], masks[slot],
                                                 borders[slot] if with_borders else None)
                    answer = (generation, index, ids, zooms, reasons, None)
                except Exception as exc:  # noqa: BLE001 - handed over, raised again in the consumer's process
                    error = _picklable(exc)
            if error is not None:
                answer = (generation, index, ids, None, None, error)
            del rows, item
            try:
                pipe.send(answer)
            except (OSError, ValueError):
                return
    finally:
        del images, masks, borders
        shm.close()
        pipe.close()  # the fetcher, if still waiting on it, wakes up and leaves


def _fetch_ahead(database_url: str, pipe: connection.Connection, fetched: queue.Queue, parent_pid: int) -> None:
    """The worker's receiving thread: ``(generation, index, slot, ids, rows, error)`` per task; ``None`` at the end."""
    loop = asyncio.new_event_loop()
    db: asyncpg.Connection | None = None
    try:
        while True:
            try:
                if not pipe.poll(_PARENT_CHECK_S):
                    if os.getppid() != parent_pid:
                        return
                    continue
                task = pipe.recv()
            except (EOFError, OSError):
                return
            if task is None:
                return
            generation, index, slot, ids = task
            try:
                if db is None:
                    db = loop.run_until_complete(connect(database_url))
                rows, error = loop.run_until_complete(db.fetch(_ROWS_SQL, ids.tolist())), None
            except Exception as exc:  # noqa: BLE001 - handed over, raised again in the consumer's process
                if db is not None:
                    loop.run_until_complete(close(db))
                    db = None
                rows, error = None, _picklable(exc)
            fetched.put((generation, index, slot, ids, rows, error))
    finally:
        fetched.put(None)
        if db is not None:
            loop.run_until_complete(close(db))
        loop.close()


def decode_rows(rows: list[Any], ids: np.ndarray, images: np.ndarray, masks: np.ndarray, borders: np.ndarray | None
                ) -> tuple[np.ndarray, list[str | None]]:
    """Decode ``rows`` into ``images[i]``, ``masks[i]`` and their border targets ``borders[i]`` in the order of
    ``ids``; zooms, and a reason per skipped row (an ``instances`` PNG that does not decode skips its row too).
    ``borders`` None: no border targets (a training that uses none): the slots keep the zeros of a new block."""
    by_id = {row[0]: row for row in rows}
    zooms = np.full(len(ids), -1, np.int32)
    reasons: list[str | None] = []
    for i, sample_id in enumerate(ids.tolist()):
        row = by_id.get(sample_id)
        if row is None:
            reasons.append("no longer in the dataset view")
            continue
        try:
            images[i] = decode_image(row["image"])
            masks[i] = decode_mask(row["mask"])
            if borders is not None:
                instances = None if row["instances"] is None else decode_instances(row["instances"])
                borders[i] = border_target(masks[i], instances)
        except DecodeError as exc:
            reasons.append(f"{exc} (stored image_format {row['image_format']})")
            continue
        zooms[i] = row["zoom"]
        reasons.append(None)
    return zooms, reasons


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any failure to round-trip: send the message instead
        return DataError(f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------------- assembly


class BatchAssembler:
    """Copies the decoded rows of chunks, in order, into the arrays of the batch being filled."""

    def __init__(self, batch_size: int) -> None:
        self._size = batch_size
        self._fill = 0
        self._new_arrays()

    def _new_arrays(self) -> None:
        b, s = self._size, TILE_SIZE
        self._images = np.empty((b, s, s, 3), np.uint8)
        self._masks = np.empty((b, s, s), np.uint8)
        self._borders = np.empty((b, s, s), np.uint8)
        self._ids = np.full(b, -1, np.int64)
        self._zooms = np.full(b, -1, np.int32)

    def add(self, chunk: Chunk, images: np.ndarray, masks: np.ndarray, borders: np.ndarray) -> Iterator[Batch]:
        """Add the decoded rows of ``chunk`` (``images``, ``masks``, ``borders``: its slot), yielding each batch as
        it fills."""
        rows = np.flatnonzero([reason is None for reason in chunk.reasons])
        while rows.size:
            take, rows = rows[:self._size - self._fill], rows[self._size - self._fill:]
            end = self._fill + take.size
            np.take(images, take, axis=0, out=self._images[self._fill:end], mode="clip")  # "raise" buffers
            np.take(masks, take, axis=0, out=self._masks[self._fill:end], mode="clip")
            np.take(borders, take, axis=0, out=self._borders[self._fill:end], mode="clip")
            self._ids[self._fill:end] = chunk.ids[take]
            self._zooms[self._fill:end] = chunk.zooms[take]
            self._fill = end
            if self._fill == self._size:
                yield self._emit()

    def padded(self) -> Batch | None:
        """The partial batch, its remaining rows zeroed and marked invalid; ``None`` when it is empty."""
        if self._fill == 0:
            return None
        self._images[self._fill:] = 0
        self._masks[self._fill:] = 0
        self._borders[self._fill:] = 0
        return self._emit()

    def _emit(self) -> Batch:
        valid = np.zeros(self._size, bool)
        valid[:self._fill] = True
        batch = Batch(self._images, self._masks, self._borders, valid, self._ids, self._zooms)
        self._fill = 0
        self._new_arrays()
        return batch


# ---------------------------------------------------------------------------------------------------- database


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
