"""``harvester preview`` on samples in a real migrated database: the contact sheet shows stored tiles with their
masks, an even mix of zooms, the same sheet for the same seed, filters, a clear exit 2 on no sample, an undecodable
tile drawn as a cell saying so, and only the drawn images read from the table."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from harvester.cli import main
from harvester.overlay import OUTLINE_COLOUR
from harvester.preview import CAPTION, GAP, HEADER, MARGIN
from tests.databases import fetch
from tests.integration.test_train import insert_synthetic_world
from harvester.decode import decode_image, decode_mask

ZOOMS = (17, 18, 19)
SPLITS = {"train": 24, "val": 6, "test": 6}  # 36 samples, 12 per zoom


@pytest.fixture(scope="module")
def world(template_database):
    from tests.databases import TempDatabase

    with TempDatabase(prefix="tilesmith_preview", template=template_database) as url:
        insert_synthetic_world(url, SPLITS, zooms=ZOOMS, seed=5)
        rows = fetch(url, "SELECT sample_id, zoom, split, image, mask FROM dataset")
        samples = {r["sample_id"]: {"zoom": r["zoom"], "split": r["split"], "image": decode_image(r["image"]),
                                    "mask": decode_mask(r["mask"]).astype(bool)} for r in rows}
        yield {"url": url, "samples": samples}


def preview(url: str, out, *args: str) -> int:
    try:
        return main(["preview", "--database-url", url, "--out", str(out), *args])
    except SystemExit as exc:
        return exc.code


def cells(path, n: int, columns: int) -> list[np.ndarray]:
    """The ``n`` tiles of a sheet (its size checked against the layout)."""
    rows = -(-n // columns)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.size == (2 * MARGIN + columns * 256 + (columns - 1) * GAP,
                            2 * MARGIN + HEADER + rows * (256 + CAPTION) + (rows - 1) * GAP)
        sheet = np.asarray(png)
    out = []
    for k in range(n):
        row, column = divmod(k, columns)
        x, y = MARGIN + column * (256 + GAP), MARGIN + HEADER + row * (256 + CAPTION + GAP)
        out.append(sheet[y:y + 256, x:x + 256])
    return out


def identify(cell: np.ndarray, samples: dict) -> int:
    """The one stored sample this cell shows: its tile outside the buildings, its mask outlined in cyan."""
    found = []
    for sample_id, s in samples.items():
        mask = s["mask"]
        if np.array_equal(cell[~mask], s["image"][~mask]):
            border = mask & ~ndimage.binary_erosion(mask, border_value=1)
            assert (cell[border] == OUTLINE_COLOUR).all(), sample_id
            assert not np.array_equal(cell[mask], s["image"][mask]) or not mask.any()  # tinted
            found.append(sample_id)
    assert len(found) == 1, found
    return found[0]


def test_the_sheet_shows_stored_tiles_with_their_masks_and_a_mix_of_zooms(world, tmp_path, capsys):
    out = tmp_path / "sheet.png"
    assert preview(world["url"], out, "--limit", "12") == 0
    drawn = [identify(c, world["samples"]) for c in cells(out, 12, 6)]
    assert len(set(drawn)) == 12
    zooms = [world["samples"][i]["zoom"] for i in drawn]
    assert zooms == sorted(zooms) and {z: zooms.count(z) for z in ZOOMS} == {17: 4, 18: 4, 19: 4}
    sheet = np.asarray(Image.open(out))
    assert sheet.std() > 20  # not blank
    assert capsys.readouterr().out == ""


def test_same_seed_same_sheet_other_seed_other_samples(world, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert preview(world["url"], a, "--limit", "6") == 0
    assert preview(world["url"], b, "--limit", "6", "--seed", "0") == 0
    assert preview(world["url"], c, "--limit", "6", "--seed", "7") == 0
    assert a.read_bytes() == b.read_bytes()
    first = {identify(x, world["samples"]) for x in cells(a, 6, 6)}
    other = {identify(x, world["samples"]) for x in cells(c, 6, 6)}
    assert first != other


def test_zoom_and_split_filters_and_a_limit_above_the_count(world, tmp_path):
    out = tmp_path / "z18.png"
    assert preview(world["url"], out, "--zoom", "18", "--limit", "6") == 0
    assert {world["samples"][identify(x, world["samples"])]["zoom"] for x in cells(out, 6, 6)} == {18}
    out = tmp_path / "val.png"
    assert preview(world["url"], out, "--split", "val", "--limit", "50") == 0  # 6 val samples: all of them
    drawn = {identify(x, world["samples"]) for x in cells(out, 6, 6)}
    assert drawn == {i for i, s in world["samples"].items() if s["split"] == "val"}


def test_no_sample_is_one_clear_line_and_exit_2(world, migrated_database_url, tmp_path, capsys):
    out = tmp_path / "none.png"
    assert preview(migrated_database_url, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no sample to preview" in err[0] and "zoom any, split any" in err[0]
    assert preview(world["url"], out, "--zoom", "16") == 2
    assert "zoom 16" in capsys.readouterr().err
    assert not out.exists()
    assert preview(world["url"], out, "--limit", "0") == 2
    assert "--limit" in capsys.readouterr().err


def test_an_undecodable_tile_is_a_grey_cell_saying_so(migrated_database_url, tmp_path):
    url = migrated_database_url
    insert_synthetic_world(url, {"train": 2}, zooms=(18,), seed=6)
    fetch(url, "UPDATE samples SET image = substring(image from 1 for 300)"
               " WHERE sample_id = (SELECT min(sample_id) FROM samples)")
    out = tmp_path / "sheet.png"
    assert preview(url, out) == 0
    tiles = cells(out, 2, 2)
    grey = [t for t in tiles if (t.reshape(-1, 3) == (70, 70, 74)).all(axis=1).mean() > 0.8]
    assert len(grey) == 1 and grey[0].std() > 5  # the grey cell carries its message


def _toast_blocks(url: str) -> int:
    row = fetch(url, "SELECT coalesce(toast_blks_read, 0) + coalesce(toast_blks_hit, 0) AS n"
                     " FROM pg_statio_user_tables WHERE relname = 'samples'")
    return int(row[0]["n"])


def _settled_toast_blocks(url: str, before: int) -> int:
    """The counter once the last client's statistics are in (a backend reports them when it exits)."""
    deadline = time.monotonic() + 30
    value = _toast_blocks(url)
    while value == before and time.monotonic() < deadline:
        time.sleep(0.1)
        value = _toast_blocks(url)
    time.sleep(0.5)
    return _toast_blocks(url)


def test_it_reads_only_the_images_it_draws(migrated_database_url, tmp_path):
    """The images are stored out of line (TOAST): the table's TOAST block reads count the images read."""
    url = migrated_database_url
    insert_synthetic_world(url, {"train": 60}, zooms=(17, 18), seed=8)
    start = _settled_toast_blocks(url, -1)

    async def read_every_image():
        conn = await asyncpg.connect(url)
        try:
            await conn.fetch("SELECT image, mask FROM dataset")
        finally:
            await conn.close()

    asyncio.run(read_every_image())
    every_image = _settled_toast_blocks(url, start) - start
    assert every_image > 60  # at least a block per image
    middle = start + every_image
    assert preview(url, tmp_path / "sheet.png", "--limit", "3") == 0
    drawn = _settled_toast_blocks(url, middle) - middle
    assert 0 < drawn <= every_image * 6 / 60  # 3 images of 60, with room for chunk boundaries
