"""Real imagery through the whole pipeline: kampala-oam (OpenAerialMap tiles, OpenStreetMap labels) harvested by the
harvester's CLI from local stand-ins (an XYZ server over the files, the fake Overpass over ``labels.geojson``), then
read back by the trainer's input pipeline. See ``bench/harvest_kampala.py`` and ``shared/data/README.md``.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections import Counter

import asyncpg
import numpy as np
import pytest
import shapely
from shapely.geometry import box, mapping, shape

from bench.harvest_kampala import PROVIDER, apply_block_splits, harvest_kampala, plan, summarize
from harvester.imagery import sniff_format
from harvester.decode import decode_mask
from harvester.splits import split_for
from harvester.tiles import Tile, lonlat_bounds
from tests.fakes.file_tiles import FileTileServer, scan_folder
from tests.fakes.world import World
from tests.integration.harvest_checks import check_database
from trainer.data import SampleStream
from trainer.datasets import kampala_rows
from harvester.decode import decode_image

ZOOM_COUNTS = {"19": 7, "20": 28, "21": 112}  # shared/data/README.md


@pytest.fixture
def kampala(shared_data):
    root = shared_data / "kampala-oam"
    if not (root / "labels.geojson").is_file():
        pytest.skip(f"kampala-oam not present at {root}")
    return root


async def _rows(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch("SELECT sample_id, provider, zoom, tile_x, tile_y, lon, lat, split, image,"
                                " image_format, mask, building_count FROM dataset ORDER BY sample_id")
    finally:
        await conn.close()


@pytest.mark.slow
def test_kampala_through_the_harvester(kampala, migrated_database_url, tmp_path):
    url = migrated_database_url
    files = scan_folder(kampala)
    # The folder is a complete pyramid: the zoom-21 centres at zooms 19,20,21 ask for every file, and only those.
    p = plan(kampala)
    assert (len(p.points), p.zooms, len(p.files)) == (112, (19, 20, 21), 147)
    assert not p.missed and not p.in_vain

    counts = harvest_kampala(url, kampala, cli=True)
    assert {k: counts[k] for k in ("done", "skipped", "failed", "pending", "in_progress")} == \
        {"done": 147, "skipped": 0, "failed": 0, "pending": 0, "in_progress": 0}
    assert {z: c["done"] for z, c in counts["by_zoom"].items()} == ZOOM_COUNTS
    assert counts["requests"] == {"tiles": 147, "tiles_404": 0, "max_per_tile": 1, "tiles_not_requested": 0,
                                  "overpass": 7, "planned": 147}  # each tile once; one query per zoom-19 area

    # Masks equal the footprints stored per area, and an independent rendering (shapely ``contains_xy`` at the pixel
    # centres, tests.fakes.world) of the labels as the harvester must understand them: one label (way 614897908) is
    # self-intersecting, which the harvester repairs (``make_valid``, "structure": the union of what the ring encloses)
    # while a point-in-polygon test on the raw ring uses the even-odd rule; they disagree on the pixels its fold covers
    # twice. The fake Overpass serves the raw labels; the reference is drawn from the repaired ones. (trainer.datasets'
    # direct loader burns the raw labels: it differs by those few pixels only, checked below.)
    labels = json.loads((kampala / "labels.geojson").read_text())
    invalid = [f for f in labels["features"] if not shape(f["geometry"]).is_valid]
    assert [f["properties"]["osm_id"] for f in invalid] == [614897908]
    for f in invalid:
        f["geometry"] = mapping(shapely.make_valid(shape(f["geometry"]), method="structure", keep_collapsed=False))
    (tmp_path / "repaired.geojson").write_text(json.dumps(labels))
    states = asyncio.run(check_database(url, World.from_geojson(tmp_path / "repaired.geojson")))
    assert states == {"done": 147}
    fold = shape(invalid[0]["geometry"])

    figures = asyncio.run(summarize(url))
    assert figures["samples"] == 147 and figures["by_zoom"] == ZOOM_COUNTS
    assert figures["with_buildings"] == 138  # shared/data/README.md: 138 of 147 tiles contain buildings
    assert figures["mean_cover"] == pytest.approx(0.29, abs=0.01)  # README: mean building cover 0.29

    rows = asyncio.run(_rows(url))
    direct = {(r.zoom, r.tile_x, r.tile_y): r for r in kampala_rows(kampala)}  # the raw labels, burnt directly
    folded_pixels = 0
    for r in rows:
        key = (r["zoom"], r["tile_x"], r["tile_y"])
        data = files[key].read_bytes()
        assert r["provider"] == PROVIDER
        assert r["image"] == data, f"{files[key].name}: stored image differs from the file (re-encoded?)"
        assert r["image_format"] == sniff_format(data)
        assert r["building_count"] == direct[key].building_count, key
        differ = int((decode_mask(r["mask"]) != decode_mask(direct[key].mask_png)).sum())
        if differ:
            assert fold.intersects(box(*lonlat_bounds(Tile(key[1], key[2], key[0])))), key
            folded_pixels += differ
    assert folded_pixels <= 4  # 2 today: one pixel centre in the fold, at zooms 20 and 21
    jpeg_files = {k for k, path in files.items() if sniff_format(path.read_bytes()) == "jpeg"}
    assert len(jpeg_files) == 24  # README: 24 of the .png files hold JPEG bytes
    assert {(r["zoom"], r["tile_x"], r["tile_y"]) for r in rows if r["image_format"] == "jpeg"} == jpeg_files

    # Same settings again: nothing new is queued or requested.
    again = harvest_kampala(url, kampala)
    assert again["done"] == 147 and again["requests"]["tiles"] == again["requests"]["overpass"] == 0

    # The trainer's input pipeline reads every harvested row of all three zooms, pixels and masks as stored.
    (split,) = {split_for(r["lon"], r["lat"]) for r in rows}  # all of kampala-oam lies in one zoom-10 block
    by_id = {r["sample_id"]: r for r in rows}
    seen: Counter = Counter()
    with SampleStream(url, split, [19, 20, 21], batch_size=32, shuffle=False, pad_last=True,
                      provider=PROVIDER) as stream:
        for batch in stream.epoch(0):
            for i in np.flatnonzero(batch.valid):
                r = by_id[int(batch.sample_ids[i])]
                seen[str(int(batch.zooms[i]))] += 1
                assert int(batch.zooms[i]) == r["zoom"]
                assert np.array_equal(batch.images[i], decode_image(r["image"]))
                assert np.array_equal(batch.masks[i], decode_mask(r["mask"]))
        assert stream.skipped == 0
    assert dict(seen) == ZOOM_COUNTS

    # For train/evaluate runs: one zoom-10 block means one split; re-split by zoom-19 block (21 tiles each).
    assert asyncio.run(apply_block_splits(url)) == {"test": 21, "train": 105, "val": 21}


def test_file_tile_server(kampala):
    """The stand-in serves the files byte for byte, typed by content (JPEG bytes in .png files), 404 elsewhere."""
    files = scan_folder(kampala)
    jpeg = next(k for k, p in sorted(files.items()) if sniff_format(p.read_bytes()) == "jpeg")
    png = next(k for k, p in sorted(files.items()) if sniff_format(p.read_bytes()) == "png")
    with FileTileServer(kampala) as server:
        for (z, x, y), expected in ((jpeg, "image/jpeg"), (png, "image/png")):
            url = server.url.format(z=z, x=x, y=y)
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.headers["Content-Type"] == expected
                assert resp.read() == files[(z, x, y)].read_bytes()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url.format(z=21, x=0, y=0), timeout=10)
        assert err.value.code == 404
        assert [(r.z, r.x, r.y, r.status) for r in server.requests()] == [(*jpeg, 200), (*png, 200), (21, 0, 0, 404)]
