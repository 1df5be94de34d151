"""The trainer's input pipeline (trainer.data) against a real PostgreSQL: order, coverage, filters, skips, shutdown
of the worker processes."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import numpy as np
import pytest
from PIL import Image

from harvester.store import insert_external_sample
from tests.databases import TempDatabase
from tests.processes import alive, state, wait_gone
from trainer.data import Batch, SampleStream, prefetch_to_device, split_stats
from trainer.errors import DataError

ZOOMS = (17, 18)
SPLIT_OF = {0: "train", 1: "train", 2: "train", 3: "val", 4: "test"}  # by index % 5: 30 train, 10 val, 10 test
FORMATS = ("jpeg", "png", "webp")
PROVIDERS = ("alpha", "beta")
_FAST_ENCODING = {  # test data only: encoding speed matters more than size
    "jpeg": {"quality": 90}, "png": {"compress_level": 1}, "webp": {"lossless": True, "quality": 0, "method": 0},
}


@dataclass
class Stored:
    """What the fixture wrote: expected content by sample_id."""

    url: str
    split: dict[int, str]
    zoom: dict[int, int]
    provider: dict[int, str]
    lossless: dict[int, np.ndarray]  # PNG / lossless WebP images, decoded exactly
    mask: dict[int, np.ndarray]

    def ids(self, split: str, zooms: tuple[int, ...] = ZOOMS, provider: str | None = None) -> set[int]:
        return {i for i, s in self.split.items()
                if s == split and self.zoom[i] in zooms and provider in (None, self.provider[i])}


def _encode(array: np.ndarray | Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    image.save(out, {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], **options)
    return out.getvalue()


def _random_image(rng: np.random.Generator) -> np.ndarray:
    """A smooth random RGB image (compresses like imagery, unlike white noise)."""
    coarse = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((256, 256), Image.BILINEAR))


def _random_mask(rng: np.random.Generator) -> np.ndarray:
    coarse = (rng.random((8, 8)) < 0.3).astype(np.uint8)
    return np.kron(coarse, np.ones((32, 32), np.uint8))


async def _insert(conn: asyncpg.Connection, index: int, *, image: bytes, fmt: str, mask_png: bytes,
                  zoom: int, split: str, provider: str, building_pixels: int = 0) -> int:
    return await insert_external_sample(
        conn, provider=provider, zoom=zoom, tile_x=1000 + index, tile_y=2000 + index, lon=2.35, lat=48.85,
        image=image, image_format=fmt, mask_png=mask_png, building_pixels=building_pixels, building_count=0,
        split=split,
    )


async def _populate(url: str, count: int) -> Stored:
    rng = np.random.default_rng(42)
    stored = Stored(url, {}, {}, {}, {}, {})
    conn = await asyncpg.connect(url)
    try:
        for index in range(count):
            image, mask = _random_image(rng), _random_mask(rng)
            fmt = FORMATS[index % 3]
            variant = (index // 3) % 3  # RGB, grey, RGBA (CMYK for JPEG) inputs: all must come out RGB
            mode = ("RGB", "L", "CMYK" if fmt == "jpeg" else "RGBA")[variant]
            source = Image.fromarray(image).convert(mode)
            data = _encode(source, fmt, **_FAST_ENCODING[fmt])
            mask_png = _encode(mask * 255, "png", compress_level=1)
            zoom, split, provider = ZOOMS[index % 2], SPLIT_OF[index % 5], PROVIDERS[(index // 2) % 2]
            sample_id = await _insert(conn, index, image=data, fmt=fmt, mask_png=mask_png, zoom=zoom, split=split,
                                      provider=provider, building_pixels=int(mask.sum()))
            stored.split[sample_id], stored.zoom[sample_id], stored.provider[sample_id] = split, zoom, provider
            stored.mask[sample_id] = mask
            if fmt != "jpeg":
                stored.lossless[sample_id] = np.asarray(source.convert("RGB"))
    finally:
        await conn.close()
    return stored


@pytest.fixture(scope="module")
def stored(template_database) -> Iterator[Stored]:
    """50 samples in one database shared by the tests that only read (a database per test costs seconds)."""
    with TempDatabase(template=template_database) as url:
        yield asyncio.run(_populate(url, 50))


@pytest.fixture
def own_stored(migrated_database_url) -> Stored:
    """50 samples in a database of the test's own, for tests that change it."""
    return asyncio.run(_populate(migrated_database_url, 50))


def _ids(batches: list[Batch]) -> list[int]:
    return [int(i) for b in batches for i, v in zip(b.sample_ids, b.valid) if v]


def test_training_epoch_gives_full_batches_each_id_at_most_once(stored):
    with SampleStream(stored.url, "train", None, 8, seed=1) as stream:
        assert len(stream) == 30 and stream.num_batches() == 3
        batches = list(stream.epoch(0))
    assert len(batches) == 3
    for batch in batches:
        assert batch.images.shape == (8, 256, 256, 3) and batch.images.dtype == np.uint8
        assert batch.masks.shape == (8, 256, 256) and batch.masks.dtype == np.uint8
        assert batch.valid.dtype == bool and batch.valid.all()
        assert batch.sample_ids.dtype == np.int64 and batch.zooms.dtype == np.int32
    ids = _ids(batches)
    assert len(ids) == len(set(ids)) == 24 and set(ids) <= stored.ids("train")


def test_padded_epoch_gives_every_id_exactly_once(stored):
    with SampleStream(stored.url, "train", None, 8, shuffle=False, pad_last=True) as stream:
        assert stream.num_batches() == 4
        batches = list(stream.epoch(0))
    assert len(batches) == 4
    assert sorted(_ids(batches)) == _ids(batches) == sorted(stored.ids("train"))  # unshuffled: by sample_id
    last = batches[-1]
    assert last.valid.tolist() == [True] * 6 + [False] * 2
    assert (last.sample_ids[6:] == -1).all() and (last.zooms[6:] == -1).all()
    assert not last.images[6:].any() and not last.masks[6:].any()


def test_decoded_content_matches_what_was_stored(stored):
    with SampleStream(stored.url, "train", None, 5, shuffle=False, pad_last=True, decode_workers=3) as stream:
        batches = list(stream.epoch(0))
    checked_images = 0
    for batch in batches:
        for row, sample_id in enumerate(batch.sample_ids[batch.valid]):
            sample_id = int(sample_id)
            assert batch.zooms[row] == stored.zoom[sample_id]
            np.testing.assert_array_equal(batch.masks[row], stored.mask[sample_id])
            if sample_id in stored.lossless:
                np.testing.assert_array_equal(batch.images[row], stored.lossless[sample_id])
                checked_images += 1
    assert checked_images >= 15


def test_order_is_a_function_of_seed_and_epoch(stored):
    def order(seed: int, epoch: int) -> list[int]:
        with SampleStream(stored.url, "train", None, 4, seed=seed, pad_last=True) as stream:
            return _ids(list(stream.epoch(epoch)))

    assert order(7, 3) == order(7, 3)
    assert order(7, 3) != order(7, 4)
    assert order(7, 3) != order(8, 3)
    assert sorted(order(7, 3)) == sorted(stored.ids("train"))


def test_start_batch_resumes_exactly(stored):
    with SampleStream(stored.url, "train", None, 4, seed=5) as stream:
        full = list(stream.epoch(2))
        resumed = list(stream.epoch(2, start_batch=3))
        assert list(stream.epoch(2, start_batch=stream.num_batches())) == []
    assert len(full) == 7 and len(resumed) == 4
    for a, b in zip(full[3:], resumed):
        np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.masks, b.masks)


@pytest.mark.parametrize("pad_last", [False, True])
def test_batches_run_on_through_the_epochs_as_epoch_by_epoch(stored, pad_last):
    """The stream training reads: the batches of epoch 2 from batch 3, then epochs 3 and 4 whole, each as
    ``epoch()`` gives it (same ids, same pixels), epoch numbers attached; across the boundaries the workers go on."""
    with SampleStream(stored.url, "train", None, 4, seed=5, pad_last=pad_last, decode_workers=3) as stream:
        expected = [(e, b) for e, start in ((2, 3), (3, 0), (4, 0)) for b in stream.epoch(e, start_batch=start)]
        got = list(itertools.islice(stream.batches(2, start_batch=3), len(expected) + 1))
        assert stream.num_batches() == (8 if pad_last else 7)
    assert [e for e, _ in got] == [e for e, _ in expected] + [5]
    for (_, a), (_, b) in zip(expected, got):
        np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
        np.testing.assert_array_equal(a.valid, b.valid)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.masks, b.masks)


def test_batches_stop_with_an_error_when_an_epoch_yields_nothing(own_stored):
    """Every row of the selection undecodable: the endless stream raises instead of looping over empty epochs."""
    bad = asyncio.run(_insert_bad_rows(own_stored.url))
    asyncio.run(_delete_except(own_stored.url, bad))  # split train: the 4 undecodable rows alone
    with SampleStream(own_stored.url, "train", None, 2) as stream:
        assert len(stream) == 4
        with pytest.raises(DataError, match="epoch 0 of split 'train' yielded no batch"):
            next(stream.batches(0))
        assert stream.skipped == 4


async def _delete_except(url: str, keep: set[int]) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DELETE FROM samples WHERE split = 'train' AND NOT (sample_id = ANY($1::bigint[]))",
                           list(keep))
    finally:
        await conn.close()


@pytest.mark.parametrize(("split", "zooms", "provider"), [
    ("train", (17,), None), ("val", None, None), ("test", (18,), None), ("train", (17, 18), "beta"),
    ("val", (18,), "alpha"),
])
def test_split_zoom_and_provider_filters(stored, split, zooms, provider):
    expected = stored.ids(split, zooms or ZOOMS, provider)
    with SampleStream(stored.url, split, zooms, 3, pad_last=True, provider=provider) as stream:
        assert len(stream) == len(expected)
        assert set(_ids(list(stream.epoch(0)))) == expected


@pytest.mark.parametrize("provider", [None, "alpha"])
def test_split_stats_counts_samples_and_building_pixels(stored, provider):
    ids = [i for i in stored.split if provider in (None, stored.provider[i])]
    expected = {}
    for split in {stored.split[i] for i in ids}:
        masks = [stored.mask[i] for i in ids if stored.split[i] == split]
        expected[split] = {"samples": len(masks), "building_share": pytest.approx(np.mean(masks))}
    assert split_stats(stored.url, provider) == expected


def test_empty_selection_yields_nothing(stored):
    with SampleStream(stored.url, "train", [5], 4, pad_last=True) as stream:
        assert len(stream) == 0 and stream.num_batches() == 0
        assert list(stream.epoch(0)) == []
        with pytest.raises(DataError, match="epoch 0 of split 'train' yielded no batch"):
            next(stream.batches(0))  # the endless stream says so instead of waiting forever


async def _insert_bad_rows(url: str) -> set[int]:
    good_mask = _encode(np.zeros((256, 256), np.uint8), "png")
    good_image = _encode(np.zeros((256, 256, 3), np.uint8), "png")
    jpeg = _encode(np.full((256, 256, 3), 128, np.uint8), "jpeg")
    bad = [  # (image, fmt, mask_png)
        (b"this is not an image at all" * 10, "jpeg", good_mask),  # garbage image
        (jpeg[: len(jpeg) // 2], "jpeg", good_mask),  # truncated jpeg
        (_encode(np.zeros((128, 256, 3), np.uint8), "png"), "png", good_mask),  # wrong size
        (good_image, "png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),  # garbage mask
    ]
    conn = await asyncpg.connect(url)
    try:
        return {await _insert(conn, 500 + i, image=image, fmt=fmt, mask_png=mask, zoom=17, split="train",
                              provider="alpha")
                for i, (image, fmt, mask) in enumerate(bad)}
    finally:
        await conn.close()


def test_rows_that_do_not_decode_are_skipped_counted_and_logged(own_stored, caplog):
    stored = own_stored
    bad = asyncio.run(_insert_bad_rows(stored.url))
    caplog.set_level(logging.WARNING, logger="trainer.data")
    with SampleStream(stored.url, "train", None, 4, seed=3, pad_last=True) as stream:
        assert len(stream) == 34
        batches = list(stream.epoch(0))
        assert stream.skipped == 4
        list(stream.epoch(1))
        assert stream.skipped == 8  # counted over the stream's life
    ids = _ids(batches)
    assert sorted(ids) == sorted(stored.ids("train")) and not bad & set(ids)
    assert all(b.valid.all() for b in batches[:-1])  # skipped rows are replaced: only the last batch is partial
    assert len(batches) == 8
    logged = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for sample_id in bad:
        assert f"skipping sample {sample_id}:" in logged


def test_workers_live_as_long_as_the_stream_and_stop_with_it(stored):
    with SampleStream(stored.url, "train", None, 2, decode_workers=3, prefetch=2) as stream:
        assert stream.worker_pids() == []  # started by the first epoch
        for _batch in stream.epoch(0):
            break
        pids = stream.worker_pids()
        assert len(pids) == 3 and all(alive(p) for p in pids)
        assert len(list(stream.epoch(1))) == 15
        assert stream.worker_pids() == pids  # the same processes, epoch after epoch
        iterator = stream.epoch(2)
        next(iterator)
        stream.close()  # close() stops an epoch still being read
        assert stream.worker_pids() == [] and not any(alive(p) for p in pids)
        with pytest.raises(DataError, match="closed"):
            next(iterator)
        with pytest.raises(DataError, match="closed"):
            stream.epoch(3)


def test_a_new_epoch_ends_the_previous_iterator(stored):
    with SampleStream(stored.url, "train", None, 2) as stream:
        first = stream.epoch(0)
        next(first)
        assert len(list(stream.epoch(1))) == 15
        with pytest.raises(DataError, match="another epoch"):
            next(first)


def test_an_exception_in_the_consumer_stops_the_workers(stored):
    with pytest.raises(ZeroDivisionError):
        with SampleStream(stored.url, "train", None, 2, decode_workers=2) as stream:
            for _batch in stream.epoch(0):
                pids = stream.worker_pids()
                1 / 0
    assert len(pids) == 2 and not any(alive(p) for p in pids)


_CONSUMER = """
import faulthandler, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for the stacks of a consumer that hangs
# Ctrl-C in a terminal: KeyboardInterrupt. A shell without job control starts `cmd &` with SIGINT ignored, and its
# children inherit that (CI launched that way once): the test must not depend on how pytest was started.
signal.signal(signal.SIGINT, signal.default_int_handler)
from trainer.data import SampleStream
with SampleStream(sys.argv[1], "train", None, 2, decode_workers=2) as stream:
    epoch = 0
    while True:
        for batch in stream.epoch(epoch):
            print(" ".join(map(str, stream.worker_pids())), flush=True)
            time.sleep(0.05)
        epoch += 1
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_no_worker_outlives_a_consumer_interrupted_or_killed(stored, tmp_path, sig):
    script = tmp_path / "consumer.py"
    script.write_text(_CONSUMER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    consumer = subprocess.Popen([sys.executable, str(script), stored.url], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)  # a signal to it alone, not to our group
    try:
        pids = [int(p) for p in consumer.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        consumer.send_signal(sig)
        try:
            consumer.wait(60)
        except subprocess.TimeoutExpired:  # say where it hangs: its threads' stacks, its workers' states
            consumer.send_signal(signal.SIGUSR1)
            time.sleep(1)
            consumer.kill()
            states = {p: state(p) for p in pids}
            pytest.fail(f"the consumer did not stop within 60 s of {sig!r}; workers {states}; its stderr:\n"
                        f"{consumer.communicate()[1][-8000:]}")
    finally:
        consumer.kill()
        consumer.communicate()
    assert wait_gone(pids) == []
    if sig == signal.SIGINT:
        assert consumer.returncode != 0  # the KeyboardInterrupt went through the `with` and stopped the script


def test_a_dead_worker_is_a_clear_error(stored):
    with SampleStream(stored.url, "train", None, 2, decode_workers=1) as stream:
        iterator = stream.epoch(0)
        next(iterator)
        (pid,) = stream.worker_pids()
        os.kill(pid, signal.SIGKILL)
        assert wait_gone([pid]) == []
        with pytest.raises(DataError, match="died"):
            list(stream.epoch(1))


def test_database_errors_reach_the_consumer(own_stored):
    stored = own_stored
    async def break_view() -> None:
        conn = await asyncpg.connect(stored.url)
        try:
            await conn.execute("ALTER VIEW dataset RENAME TO dataset_moved")
        finally:
            await conn.close()

    with SampleStream(stored.url, "train", None, 4) as stream:
        asyncio.run(break_view())
        with pytest.raises(asyncpg.UndefinedTableError):
            list(stream.epoch(0))
        pids = stream.worker_pids()
    assert pids and not any(alive(p) for p in pids)


def test_unreachable_database_raises_a_clear_error():
    with pytest.raises(DataError, match="cannot connect") as caught:
        SampleStream("postgresql://user:secret@127.0.0.1:1/nowhere", "train", None, 4)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize(("split", "zooms", "batch_size", "options"), [
    ("training", None, 4, {}), ("train", None, 0, {}), ("train", [], 4, {}), ("train", None, 4, {"prefetch": 0}),
    ("train", None, 4, {"decode_workers": 0}), ("train", None, True, {}), ("train", None, 4, {"seed": -1}),
])
def test_invalid_arguments_are_refused(stored, split, zooms, batch_size, options):
    with pytest.raises(DataError):
        SampleStream(stored.url, split, zooms, batch_size, **options)


def test_invalid_epoch_arguments_are_refused(stored):
    with SampleStream(stored.url, "train", None, 4) as stream:
        with pytest.raises(DataError):
            stream.epoch(-1)
        with pytest.raises(DataError):
            stream.epoch(0, start_batch=-1)


async def _populate_uniform(url: str, count: int) -> None:
    """``count`` rows sharing one JPEG and one mask: cheap to write, each costs 256 KiB once decoded."""
    rng = np.random.default_rng(0)
    image = _encode(_random_image(rng), "jpeg", quality=90)
    mask = _encode(_random_mask(rng) * 255, "png", compress_level=1)
    conn = await asyncpg.connect(url)
    try:
        for index in range(count):
            await _insert(conn, index, image=image, fmt="jpeg", mask_png=mask, zoom=18, split="train",
                          provider="alpha")
    finally:
        await conn.close()


def test_memory_stays_bounded_whatever_the_table_size(migrated_database_url):
    rows, batch_size, prefetch, workers = 400, 8, 2, 2
    asyncio.run(_populate_uniform(migrated_database_url, rows))
    decoded_sample = 256 * 256 * 5  # RGB, mask, border target
    with SampleStream(migrated_database_url, "train", None, batch_size, prefetch=prefetch,
                      decode_workers=workers) as stream:
        order = stream.order(0)
        tracemalloc.start()
        try:
            ids = []
            for batch in stream.epoch(0):
                ids.extend(batch.sample_ids.tolist())
                del batch
                time.sleep(0.005)  # a slow consumer: the workers run ahead until every slot is full
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        shared = stream.shared_memory_bytes
        for _batch in stream.epoch(1):  # left with every slot busy: the next epoch still gets its chunks
            break
        assert [i for b in stream.epoch(2) for i in b.sample_ids.tolist()] == stream.order(2).tolist()
    assert ids == order.tolist()  # 13 chunks over 2 workers, reassembled in the epoch's order
    # this process: the batch being filled, the consumer's, and the previous one not yet collected
    assert peak < 3.3 * batch_size * decoded_sample, peak
    # the workers decode into (2 x workers + prefetch) slots of 32 samples, whatever the number of rows
    assert shared == (2 * workers + prefetch) * 32 * decoded_sample
    assert shared < rows * decoded_sample / 2


def test_prefetch_to_device_places_arrays_and_closes_the_stream(stored):
    jax = pytest.importorskip("jax")
    with SampleStream(stored.url, "val", None, 4, shuffle=False, pad_last=True) as stream:
        host = list(stream.epoch(0))
        placed = list(prefetch_to_device(stream.epoch(0), size=2))
        assert len(placed) == len(host) == 3
        for batch, item in zip(host, placed):
            assert isinstance(item["images"], jax.Array) and isinstance(item["valid"], jax.Array)
            assert isinstance(item["sample_ids"], np.ndarray) and isinstance(item["zooms"], np.ndarray)
            np.testing.assert_array_equal(np.asarray(item["images"]), batch.images)
            np.testing.assert_array_equal(np.asarray(item["masks"]), batch.masks)
            np.testing.assert_array_equal(np.asarray(item["valid"]), batch.valid)
            np.testing.assert_array_equal(item["sample_ids"], batch.sample_ids)
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        for item in prefetch_to_device(stream.epoch(0), size=1, sharding=sharding):
            assert item["images"].sharding == sharding
            break


def test_batches_carry_the_border_target_from_instances_or_from_the_mask(migrated_database_url):
    """Two buildings touching along a column: the border comes from ``instances`` where the sample has them; a
    sample without (external data sets) gets only the gaps between the connected components of its mask."""
    from harvester.rasterize import encode_instances_png
    from trainer.instances import border_target

    instances = np.zeros((256, 256), np.uint16)
    instances[40:80, 20:60] = 1
    instances[40:80, 60:100] = 2  # touches building 1
    instances[40:80, 102:140] = 3  # a 2-pixel gap from building 2
    mask = (instances > 0).astype(np.uint8)
    image = _encode(np.zeros((256, 256, 3), np.uint8), "png")

    async def populate() -> tuple[int, int]:
        conn = await asyncpg.connect(migrated_database_url)
        try:
            ids = [await _insert(conn, i, image=image, fmt="png", mask_png=_encode(mask * 255, "png"), zoom=18,
                                 split="train", provider="alpha") for i in range(2)]
            await conn.execute("UPDATE samples SET instances = $1 WHERE sample_id = $2", encode_instances_png(instances),
                               ids[0])
            return ids[0], ids[1]
        finally:
            await conn.close()

    with_instances, without = asyncio.run(populate())
    with SampleStream(migrated_database_url, "train", None, 2, shuffle=False) as stream:
        (batch,) = list(stream.epoch(0))
    borders = {int(i): b for i, b in zip(batch.sample_ids, batch.borders)}
    touching = np.zeros((256, 256), bool)
    touching[40:80, 59:61] = True
    gap = np.zeros((256, 256), bool)
    gap[40:80, 100:102] = True
    assert borders[with_instances][touching].all() and borders[with_instances][gap].all()
    assert not borders[without][touching].any() and borders[without][gap].all()
    np.testing.assert_array_equal(borders[with_instances], border_target(mask, instances))
    np.testing.assert_array_equal(borders[without], border_target(mask))

    # A training whose loss uses no border (the default recipe) does not pay for them: the same rows, zero borders.
    with SampleStream(migrated_database_url, "train", None, 2, shuffle=False, borders=False) as stream:
        (plain,) = list(stream.epoch(0))
    np.testing.assert_array_equal(plain.masks, batch.masks)
    assert not plain.borders.any()
