"""Writing samples. A sample (image, mask, statistics, job state) is always written in one transaction."""

from __future__ import annotations

import asyncpg

from .splits import split_for
from .tiles import Tile, lonlat_bounds

_TILE_POLYGON = "ST_MakeEnvelope($1, $2, $3, $4, 4326)"


async def insert_external_sample(
    conn: asyncpg.Connection,
    *,
    provider: str,
    zoom: int,
    tile_x: int,
    tile_y: int,
    lon: float,
    lat: float,
    image: bytes,
    image_format: str,
    mask_png: bytes,
    building_pixels: int,
    building_count: int,
    split: str | None = None,
) -> int:
    """Store a sample that did not come through the harvest queue (a loaded data set, a test fixture).

    It gets its own point, area and ``done`` job so that it appears in the ``dataset`` view like any other sample.
    ``split`` defaults to the spatial rule of :mod:`harvester.splits`. Returns the ``sample_id``.
    """
    split = split or split_for(lon, lat)
    bounds = lonlat_bounds(Tile(tile_x, tile_y, zoom))
    async with conn.transaction():
        point_id = await conn.fetchval(
            "INSERT INTO sample_points (sampler_key, idx, lon, lat, geom)"
            " VALUES ($1, 0, $2, $3, ST_SetSRID(ST_MakePoint($2, $3), 4326)) RETURNING point_id",
            f"external:{provider}:{zoom}/{tile_x}/{tile_y}", lon, lat,
        )
        area_id = await conn.fetchval(
            "INSERT INTO areas (zoom, tile_x, tile_y, bounds, fetched_at, building_count, dropped_count)"
            f" VALUES ($5, $6, $7, {_TILE_POLYGON}, now(), $8, 0)"
            " ON CONFLICT (zoom, tile_x, tile_y) DO UPDATE SET zoom = EXCLUDED.zoom RETURNING area_id",
            *bounds, zoom, tile_x, tile_y, building_count,
        )
        job_id = await conn.fetchval(
            "INSERT INTO jobs (provider, zoom, tile_x, tile_y, point_id, area_id, state, attempts)"
            " VALUES ($1, $2, $3, $4, $5, $6, 'done', 1) RETURNING job_id",
            provider, zoom, tile_x, tile_y, point_id, area_id,
        )
        await conn.execute(
            "INSERT INTO samples (sample_id, footprint, split, image, image_format, mask, building_pixels,"
            f" building_count) VALUES ($5, {_TILE_POLYGON}, $6, $7, $8, $9, $10, $11)",
            *bounds, job_id, split, image, image_format, mask_png, building_pixels, building_count,
        )
    return job_id
