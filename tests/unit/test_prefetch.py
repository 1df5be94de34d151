"""``prefetch_to_device``: batches drawn and placed on a thread of their own, in order, at most ``size`` ahead; errors
and closing reach the consumer and the source (the stream's side: tests/integration/test_data_pipeline.py)."""

import threading

import numpy as np
import pytest

from trainer.data import Batch, prefetch_to_device
from trainer.errors import DataError

jax = pytest.importorskip("jax")


def _batch(i: int, size: int = 2) -> Batch:
    return Batch(images=np.full((size, 256, 256, 3), i % 256, np.uint8), masks=np.zeros((size, 256, 256), np.uint8),
                 borders=np.zeros((size, 256, 256), np.uint8), valid=np.ones(size, bool),
                 sample_ids=np.arange(i * size, (i + 1) * size, dtype=np.int64), zooms=np.full(size, 17, np.int32))


class Source:
    """``count`` batches (then ``error``, when given), recording who drew them and whether it was closed."""

    def __init__(self, count: int, error: BaseException | None = None) -> None:
        self.count, self.error = count, error
        self.drawn, self.threads, self.closed = 0, set(), False
        self._it = self._make()

    def _make(self):
        try:
            for i in range(self.count):
                self.drawn += 1
                self.threads.add(threading.current_thread().name)
                yield _batch(i)
            if self.error is not None:
                raise self.error
        finally:
            self.closed = True

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return next(self._it)

    def close(self) -> None:
        self._it.close()


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tilesmith-prefetch"]


@pytest.mark.parametrize("size", [1, 2, 3])
def test_every_batch_in_order_drawn_on_a_thread_at_most_size_ahead(size):
    source = Source(7)
    got = []
    for i, item in enumerate(prefetch_to_device(source, size=size)):
        # drawn so far: the ones consumed (i + 1) and at most `size` placed ahead
        assert source.drawn <= i + 1 + size
        assert isinstance(item["images"], jax.Array) and isinstance(item["sample_ids"], np.ndarray)
        got.append(item)
    assert [int(item["sample_ids"][0]) for item in got] == [0, 2, 4, 6, 8, 10, 12]
    assert [int(np.asarray(item["images"])[0, 0, 0, 0]) for item in got] == list(range(7))
    np.testing.assert_array_equal(item["zooms"], [17, 17])
    assert source.threads == {"tilesmith-prefetch"}  # not the consumer's thread: the copies are off its path
    assert source.closed and not _prefetch_threads()


def test_an_error_of_the_source_is_raised_after_the_batches_before_it():
    source = Source(3, DataError("worker died"))
    batches = prefetch_to_device(source, size=2)
    assert [int(next(batches)["sample_ids"][0]) for _ in range(3)] == [0, 2, 4]
    with pytest.raises(DataError, match="worker died"):
        next(batches)
    assert source.closed and not _prefetch_threads()


def test_closing_early_closes_the_source_and_stops_the_thread():
    source = Source(1000)
    batches = prefetch_to_device(source, size=2)
    next(batches)
    batches.close()
    assert source.closed and not _prefetch_threads()
    assert source.drawn <= 1 + 2


def test_an_exception_in_the_consumer_closes_the_source():
    source = Source(1000)
    with pytest.raises(RuntimeError, match="step failed"):
        for _ in prefetch_to_device(source, size=2):
            raise RuntimeError("step failed")
    assert source.closed and not _prefetch_threads()


def test_size_below_one_is_refused():
    with pytest.raises(DataError, match="prefetch size"):
        next(prefetch_to_device(Source(1), size=0))
