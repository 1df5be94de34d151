"""Invariants of a harvested database, shared by the integration, e2e and chaos tests."""

from __future__ import annotations

import io

import asyncpg
import numpy as np
import shapely
from PIL import Image

from harvester.decode import decode_mask
from harvester.rasterize import rasterize
from harvester.tiles import Tile, lonlat_bounds, pixel_grid, to_mercator
from harvester.decode import decode_instances


async def check_database(url: str, world=None, *, max_attempts: int = 5) -> dict[str, int]:
    """Assert every invariant a user relies on; return the job counts by state.

    - every job is done (with a sample), skipped (with a reason) or failed (with its last error after exactly
      max_attempts attempts); nothing is in progress or pending;
    - every sample's image decodes to 256x256x3, its mask is 256x256 0/1, equal to the mask rebuilt from the stored
      footprints of its area, and (when the fake world is given) to the world's own independent rendering;
    - building_pixels and building_count agree with the mask and the footprints; no sample without a done job;
    - its instance map is nonzero exactly where the mask is, and every pixel labelled k has its centre in (or on)
      the k-th footprint of the tile (its area's footprints meeting the tile, in (osm_type, osm_id) order).
    """
    conn = await asyncpg.connect(url)
    try:
        states = {r["state"]: r["n"] for r in await conn.fetch(
            "SELECT state::text, count(*) AS n FROM jobs GROUP BY 1")}
        assert states.get("pending", 0) == 0 and states.get("in_progress", 0) == 0, states
        orphans = await conn.fetchval(
            "SELECT count(*) FROM samples s JOIN jobs j ON j.job_id = s.sample_id WHERE j.state <> 'done'")
        assert orphans == 0
        missing = await conn.fetchval(
            "SELECT count(*) FROM jobs j WHERE j.state = 'done' AND NOT EXISTS"
            " (SELECT 1 FROM samples s WHERE s.sample_id = j.job_id)")
        assert missing == 0
        bad_skips = await conn.fetchval("SELECT count(*) FROM jobs WHERE state = 'skipped' AND last_error IS NULL")
        assert bad_skips == 0
        bad_fails = await conn.fetch(
            "SELECT job_id, attempts, last_error FROM jobs WHERE state = 'failed'"
            " AND (attempts <> $1 OR last_error IS NULL)", max_attempts)
        assert not bad_fails, bad_fails
        rows = await conn.fetch(
            "SELECT d.sample_id, d.zoom, d.tile_x, d.tile_y, d.image, d.mask, d.instances, d.building_pixels,"
            " d.building_count, j.area_id FROM dataset d JOIN jobs j ON j.job_id = d.sample_id")
        assert len(rows) == states.get("done", 0)
        footprints: dict[int, list] = {}
        for r in rows:
            with Image.open(io.BytesIO(r["image"])) as img:
                rgb = np.asarray(img.convert("RGB"))
            assert rgb.shape == (256, 256, 3)
            mask = decode_mask(r["mask"])
            assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 1}
            assert int(mask.sum()) == r["building_pixels"]
            if r["area_id"] not in footprints:
                footprints[r["area_id"]] = [(w["osm_type"], w["osm_id"], shapely.from_wkb(w["wkb"])) for w in await
                                            conn.fetch("SELECT osm_type, osm_id, ST_AsBinary(geom) AS wkb FROM"
                                                       " buildings WHERE area_id = $1", r["area_id"])]
            tile = Tile(r["tile_x"], r["tile_y"], r["zoom"])
            rebuilt = rasterize([g for _, _, g in footprints[r["area_id"]]], tile)
            assert np.array_equal(rebuilt, mask), f"sample {r['sample_id']}: mask differs from stored footprints"
            check_instances(r, mask, sorted(f for f in footprints[r["area_id"]]
                                            if f[2].intersects(shapely.box(*lonlat_bounds(tile)))), tile)
            if world is not None:
                expected = world.expected_mask(r["zoom"], r["tile_x"], r["tile_y"])
                assert np.array_equal(expected, mask), f"sample {r['sample_id']}: mask differs from the world"
                assert r["building_count"] == world.building_count(r["zoom"], r["tile_x"], r["tile_y"])
        return states
    finally:
        await conn.close()


def check_instances(row, mask: np.ndarray, tile_footprints: list, tile: Tile) -> None:
    assert row["instances"] is not None, f"sample {row['sample_id']}: no instance map"
    instances = decode_instances(row["instances"])
    assert instances.dtype == np.uint16 and instances.shape == (256, 256)
    assert np.array_equal(instances != 0, mask.astype(bool)), f"sample {row['sample_id']}: instances differ from mask"
    assert len(tile_footprints) == row["building_count"] and int(instances.max()) <= row["building_count"]
    left, top, pixel_m = pixel_grid(tile)
    for k in np.unique(instances[instances > 0]):
        rows, cols = np.nonzero(instances == k)
        footprint = shapely.transform(tile_footprints[k - 1][2], to_mercator, interleaved=False)
        inside = shapely.intersects_xy(footprint, left + (cols + 0.5) * pixel_m, top - (rows + 0.5) * pixel_m)
        assert inside.all(), f"sample {row['sample_id']}: pixels labelled {k} outside footprint {k}"
