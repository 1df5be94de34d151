"""Writing what the harvest produces: samples and the buildings of their areas, one statement each.

A sample (image, mask, statistics, job state) is always written in one transaction, and only while its worker still
holds the job; an area's buildings and its ``fetched`` mark too. Named queries live in ``sql/store.sql``.
"""

from __future__ import annotations

import json
from typing import Sequence

import asyncpg
import numpy as np
import shapely

from .labels.osm import Footprint
from .splits import split_for
from .sql import queries
from .tiles import Tile, lonlat_bounds

_TILE_POLYGON = "ST_MakeEnvelope($1, $2, $3, $4, 4326)"


async def store_sample(conn: asyncpg.Connection, job_id: int, worker: str, *, bounds: Sequence[float], split: str,
                       image: bytes, image_format: str, mask_png: bytes, instances_png: bytes, building_pixels: int,
                       building_count: int) -> int | None:
    """Store a harvested sample and mark its job done; None when ``worker`` no longer holds the job."""
    return await conn.fetchval(queries("store")["store_sample"], job_id, worker, *bounds, split, image, image_format,
                               mask_png, building_pixels, building_count, instances_png)


async def store_buildings(conn: asyncpg.Connection, area_id: int, footprints: Sequence[Footprint],
                          dropped: int, *, source: str = "overpass") -> None:
    """Store the area's footprints, with the label source they came from, and mark the area fetched (one statement:
    all or nothing)."""
    geoms = np.empty(len(footprints), dtype=object)
    geoms[:] = [f.geometry for f in footprints]
    await conn.execute(queries("store")["store_buildings"], area_id, [f.osm_type for f in footprints],
                       [f.osm_id for f in footprints], shapely.to_wkb(geoms).tolist(),  # one vectorized call
                       [json.dumps(f.tags) for f in footprints], dropped, source)


async def load_buildings(conn: asyncpg.Connection, area_id: int) -> list[Footprint]:
    rows = await conn.fetch(queries("store")["select_buildings"], area_id)
    return [Footprint(r["osm_type"], r["osm_id"], shapely.from_wkb(r["wkb"]), {}) for r in rows]


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
