"""Loaders of the real imagery (trainer.datasets) into a real PostgreSQL; skipped when shared/data is absent."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import numpy as np
import pytest
from PIL import Image

from tests.conftest import SHARED_DATA
from tests.databases import TempDatabase
from trainer import datasets
from trainer.data import SampleStream
from harvester.decode import decode_image, decode_mask


async def _fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def shared_data_dir() -> Path:
    """The ``shared_data`` fixture of conftest, at module scope (skips when the folder is absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real imagery not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def loaded(template_database, shared_data_dir) -> Iterator[tuple[str, int, int]]:
    """One database with all of dubai-aerial and kampala-oam loaded (loading takes seconds: done once)."""
    with TempDatabase(template=template_database) as url:
        dubai = datasets.load_dubai(url, shared_data_dir / "dubai-aerial")
        kampala = datasets.load_kampala(url, shared_data_dir / "kampala-oam")
        yield url, dubai, kampala


def test_dubai_gives_every_full_crop_split_by_folder(loaded):
    url, added, _ = loaded
    assert added == 1305  # about 1,300 per shared/data/README.md
    rows = asyncio.run(_fetch(url, "SELECT split, count(*) AS n, sum(building_pixels) AS building,"
                                   " count(DISTINCT (zoom, tile_x, tile_y)) AS tiles, min(lon) AS w, max(lon) AS e,"
                                   " min(lat) AS s, max(lat) AS n_lat, bool_and(image_format = 'jpeg') AS jpeg"
                                   " FROM dataset WHERE provider = 'dubai' GROUP BY split"))
    by_split = {r["split"]: r for r in rows}
    # Tile_1..6: 441 crops; Tile_7: 9 images of 1817 x 2061 -> 7 x 8 crops each, images 1-3 val (168), 4-9 train
    # (336); Tile_8: 9 of 2149 x 1479 -> 8 x 5. Training gets 777 crops, no longer fewer than validation.
    assert {s: r["n"] for s, r in by_split.items()} == {"train": 441 + 336, "val": 168, "test": 360}
    assert all(r["tiles"] == r["n"] and r["jpeg"] for r in rows)
    assert all(55.2 < r["w"] and r["e"] < 56.2 and 24.5 < r["s"] and r["n_lat"] < 25.3 for r in rows)
    share = sum(r["building"] for r in rows) / (1305 * 256 * 256)
    assert 0.12 < share < 0.145  # 13.3 % over the whole images


def test_dubai_crop_is_the_source_crop(loaded, shared_data):
    url, _, _ = loaded
    x, y = datasets.dubai_tile(folder=8, image=3, row=2, col=5)
    (row,) = asyncio.run(_fetch(url, "SELECT image, mask, building_pixels, split, zoom FROM dataset"
                                     " WHERE provider = 'dubai' AND tile_x = $1 AND tile_y = $2", x, y))
    assert row["split"] == "test" and row["zoom"] == datasets.DUBAI_ZOOM
    folder = shared_data / "dubai-aerial" / "Tile_8"
    window = (slice(512, 768), slice(1280, 1536))
    source = np.asarray(Image.open(folder / "images" / "image_part_003.jpg").convert("RGB"))[window]
    source_mask = np.asarray(Image.open(folder / "masks" / "image_part_003.png").convert("RGB"))[window]
    expected_mask = np.all(source_mask == (60, 16, 152), axis=-1)
    mask = decode_mask(row["mask"])
    np.testing.assert_array_equal(mask, expected_mask)
    assert row["building_pixels"] == expected_mask.sum()
    image = decode_image(row["image"]).astype(int)
    assert np.abs(image - source).mean() < 3  # JPEG quality 95


def test_dubai_load_is_idempotent_and_the_cli_says_so(loaded, shared_data, capsys):
    url, _, _ = loaded
    assert datasets.load_dubai(url, shared_data / "dubai-aerial") == 0
    assert datasets.main(["dubai", "--database-url", url, "--folders", "7,8"]) == 0
    assert "dubai: 0 samples added to provider dubai" in capsys.readouterr().out
    (count,) = asyncio.run(_fetch(url, "SELECT count(*) FROM dataset WHERE provider = 'dubai'"))
    assert count[0] == 1305


def test_kampala_tiles_with_rasterized_osm_labels(loaded, shared_data):
    url, _, added = loaded
    assert added == 147
    rows = asyncio.run(_fetch(url, "SELECT zoom, split, image_format, building_pixels, building_count FROM dataset"
                                   " WHERE provider = 'kampala'"))
    assert len(rows) == 147
    assert sum(r["image_format"] == "jpeg" for r in rows) == 24  # .png files holding JPEG bytes, stored as they are
    assert sorted(sum(r["split"] == s for r in rows) for s in ("train", "val", "test")) == [21, 21, 105]
    for zoom in (19, 20, 21):  # every zoom of one place shares its split
        assert {r["split"] for r in rows if r["zoom"] == zoom} == {"train", "val", "test"}
    cover = np.mean([r["building_pixels"] / 65536 for r in rows])
    assert 0.25 < cover < 0.33  # README: mean building cover 0.29
    assert sum(r["building_pixels"] > 0 for r in rows) == 138
    assert all((r["building_count"] > 0) == (r["building_pixels"] > 0) for r in rows if r["building_pixels"])
    assert datasets.load_kampala(url, shared_data / "kampala-oam") == 0


def test_loaded_samples_stream_without_a_skip(loaded):
    url, _, _ = loaded
    with SampleStream(url, "val", None, 32, shuffle=False, pad_last=True, provider="dubai") as stream:
        assert len(stream) == 168
        seen = sum(int(b.valid.sum()) for b in stream.epoch(0))
        assert seen == 168 and stream.skipped == 0
    with SampleStream(url, "train", (19, 20, 21), 16, pad_last=True, provider="kampala") as stream:
        assert sum(int(b.valid.sum()) for b in stream.epoch(0)) == 105 and stream.skipped == 0


@pytest.mark.parametrize("name", ["dubai", "kampala"])
def test_missing_folder_is_a_clear_error_before_any_connection(name, tmp_path, capsys):
    url = "postgresql://loader:secret@127.0.0.1:1/none"
    assert datasets.main([name, "--database-url", url, "--root", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert f"folder {tmp_path / 'nope'} not found" in err and "secret" not in err


# Pure helpers: no database, no files.

def test_dubai_tiles_are_unique_and_in_place():
    tiles = {datasets.dubai_tile(f, i, r, c) for f in range(1, 9) for i in range(1, 10) for r in range(16)
             for c in range(16)}
    assert len(tiles) == 8 * 9 * 16 * 16
    assert datasets.dubai_tile(1, 1, 0, 0) == (datasets.DUBAI_ORIGIN.x, datasets.DUBAI_ORIGIN.y)
    with pytest.raises(datasets.DataError):
        datasets.dubai_tile(1, 1, 16, 0)


def test_crops_drop_partial_edges_and_building_mask_is_exact():
    image = np.arange(600 * 530 * 3, dtype=np.uint32).astype(np.uint8).reshape(600, 530, 3)
    mask_rgb = np.zeros((600, 530, 3), np.uint8)
    mask_rgb[10:20, 300:310] = (60, 16, 152)
    mask_rgb[30:40, 300:310] = (60, 16, 153)  # one unit off: not building
    mask = datasets.building_mask(mask_rgb)
    assert mask.dtype == np.uint8 and mask.sum() == 100
    crops = list(datasets.crops(image, mask))
    assert [(c.row, c.col) for c in crops] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    np.testing.assert_array_equal(crops[1].image, image[0:256, 256:512])
    assert crops[1].mask.sum() == 100 and crops[0].mask.sum() == 0
    assert datasets.region_count(crops[1].mask) == 1


def test_kampala_splits_follow_the_coarsest_block():
    tiles = [(19, 10, 10), (19, 11, 10), (19, 12, 10), (20, 24, 20), (20, 25, 21), (21, 44, 40)]
    splits = datasets.kampala_splits(tiles)
    assert splits[(19, 12, 10)] == "test" and splits[(20, 24, 20)] == "test"  # (20, 24, 20) lies in (19, 12, 10)
    assert splits[(19, 11, 10)] == "val" and splits[(21, 44, 40)] == "val"
    assert splits[(19, 10, 10)] == "train"


def test_footprint_count_counts_intersecting_polygons():
    from shapely.geometry import box

    from harvester.tiles import Tile, lonlat_bounds

    west, south, east, north = lonlat_bounds(Tile(10, 10, 5))
    inside = box(west + 0.1, south + 0.1, west + 0.2, south + 0.2)
    far = box(east + 1, north + 1, east + 2, north + 2)
    assert datasets.footprint_count(5, 10, 10, [inside, far, inside]) == 2


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def test_dubai_rows_read_one_image_pair(tmp_path: Path):
    image = np.full((300, 520, 3), 90, np.uint8)
    mask = np.zeros((300, 520, 3), np.uint8)
    mask[:5, :5] = (60, 16, 152)
    Image.fromarray(image).save(tmp_path / "image.jpg")
    (tmp_path / "mask.png").write_bytes(_png(mask))
    rows = datasets.dubai_rows(8, 2, tmp_path / "image.jpg", tmp_path / "mask.png")
    assert len(rows) == 2 and {r.split for r in rows} == {"test"}
    assert rows[0].building_pixels == 25 and rows[0].building_count == 1 and rows[1].building_pixels == 0
    assert decode_image(rows[0].image).shape == (256, 256, 3)
    skip = frozenset({(rows[0].zoom, rows[0].tile_x, rows[0].tile_y)})
    assert [r.tile_x for r in datasets.dubai_rows(8, 2, tmp_path / "image.jpg", tmp_path / "mask.png", skip)] == [
        rows[1].tile_x]
