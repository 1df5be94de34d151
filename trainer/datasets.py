"""Loaders of the real imagery of ``shared/data`` (see its README) into the database, as samples of a named provider.

- ``dubai``: dubai-aerial (MBRSC imagery, Humans in the Loop labels, CC0), 72 aerial images with dense RGB masks, cut
  into non-overlapping 256 x 256 crops (partial edges dropped; about 1,300). It is not georeferenced: each crop gets
  a synthetic zoom-18 tile in a fixed area near Dubai (55.27 E, 25.20 N), unique per (folder, image, crop); the split
  is spatial by folder and image: ``Tile_1``..``Tile_6`` and images 4-9 of ``Tile_7`` train (777 crops), images
  1-3 of ``Tile_7`` val (168), ``Tile_8`` test (360). (Until issue 11 all of ``Tile_7`` was val: 504 crops against
  441 to train on.)
- ``kampala``: kampala-oam (OpenAerialMap imagery, OpenStreetMap labels), 147 real slippy-map tiles stored as they
  are (format read from the bytes), masks rasterized from ``labels.geojson`` by the harvester's rasterizer (SPEC's
  rule: pixel centre inside a footprint, holes excluded, on the tile's Web Mercator grid). All of it lies in one
  zoom-10 block, so the split is by its 7 zoom-19 blocks instead (see :func:`kampala_splits`).

Both are idempotent: tiles the provider already has are skipped, so a second run (or one after an interruption)
stores only what is missing. Usable as ``python -m trainer.datasets dubai|kampala [--root DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import io
import json
import logging
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import shapely
from PIL import Image
from scipy import ndimage
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry

from harvester.rasterize import encode_mask_png, rasterize
from harvester.store import insert_external_sample
from harvester.tiles import Tile, lonlat_bounds, tile_at

from .config import DEFAULT_DATABASE_URL, redact_url
from harvester.decode import TILE_SIZE, sniff_format
from .errors import DataError

log = logging.getLogger(__name__)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

DUBAI_BUILDING_RGB = (60, 16, 152)  # #3C1098; classes.json lists other colours, which do not match the masks
DUBAI_ZOOM = 18  # ~0.5 m/pixel at 25 N: close to the imagery's own resolution
DUBAI_ORIGIN = tile_at(55.27, 25.20, DUBAI_ZOOM)  # north-west corner of the synthetic area
DUBAI_BLOCK = 16  # tiles per side reserved for each image: images up to 16 * 256 = 4096 px wide or high
DUBAI_JPEG_QUALITY = 95
_DUBAI_FOLDER = re.compile(r"^Tile_(\d+)$")
_DUBAI_IMAGE = re.compile(r"^image_part_(\d+)\.jpg$")

_KAMPALA_TILE = re.compile(r"^OAM-(\d+)-(\d+)-(\d+)\.png$")


@dataclass(frozen=True)
class Crop:
    """One 256 x 256 crop of a source image: its place (row, col in crops) and its pixels."""

    row: int
    col: int
    image: np.ndarray  # uint8 [256, 256, 3]
    mask: np.ndarray  # uint8 [256, 256], 1 = building


DUBAI_TEST_FOLDER = 8
DUBAI_VAL_FOLDER = 7
DUBAI_VAL_IMAGES = range(1, 4)  # image_part_001..003 of Tile_7: 168 of its 504 crops; the other 6 images train


def dubai_split(folder: int, image: int) -> str:
    """Split of image ``image_part_<image>`` of the dubai-aerial folder ``Tile_<folder>``: spatially separate (whole
    images): ``Tile_8`` test, the first three images of ``Tile_7`` val, every other image train."""
    if folder == DUBAI_TEST_FOLDER:
        return "test"
    return "val" if folder == DUBAI_VAL_FOLDER and image in DUBAI_VAL_IMAGES else "train"


def dubai_tile(folder: int, image: int, row: int, col: int) -> tuple[int, int]:
    """Synthetic ``(tile_x, tile_y)`` at :data:`DUBAI_ZOOM`: folders stacked north to south, images west to east."""
    if not (0 <= row < DUBAI_BLOCK and 0 <= col < DUBAI_BLOCK) or folder < 1 or image < 1:
        raise DataError(f"dubai crop Tile_{folder}/image_part_{image:03d} ({row}, {col}) is outside the layout")
    return DUBAI_ORIGIN.x + (image - 1) * DUBAI_BLOCK + col, DUBAI_ORIGIN.y + (folder - 1) * DUBAI_BLOCK + row


def building_mask(mask_rgb: np.ndarray) -> np.ndarray:
    """0/1 ``uint8`` mask of the pixels exactly of the building colour :data:`DUBAI_BUILDING_RGB`."""
    red, green, blue = DUBAI_BUILDING_RGB
    return ((mask_rgb[..., 0] == red) & (mask_rgb[..., 1] == green) & (mask_rgb[..., 2] == blue)).view(np.uint8)


def crops(image: np.ndarray, mask: np.ndarray, size: int = TILE_SIZE) -> Iterator[Crop]:
    """Non-overlapping ``size`` x ``size`` crops, row by row from the top left; partial edges are dropped."""
    rows, cols = min(image.shape[0], mask.shape[0]) // size, min(image.shape[1], mask.shape[1]) // size
    for r in range(rows):
        for c in range(cols):
            window = (slice(r * size, (r + 1) * size), slice(c * size, (c + 1) * size))
            yield Crop(r, c, np.ascontiguousarray(image[window]), np.ascontiguousarray(mask[window]))


def region_count(mask: np.ndarray) -> int:
    """Number of 4-connected building regions: the ``building_count`` of a sample whose labels are only pixels
    (buildings that touch count once)."""
    return int(ndimage.label(mask)[1])


def _encode_jpeg(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image, "RGB").save(out, "JPEG", quality=DUBAI_JPEG_QUALITY)
    return out.getvalue()


def _check_folder(root: Path, name: str) -> None:
    if not root.is_dir():
        raise DataError(f"{name} folder {root} not found; pass --root (see shared/data/README.md)")


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _lonlat(zoom: int, x: int, y: int) -> tuple[float, float]:
    b = lonlat_bounds(Tile(x, y, zoom))
    return (b.west + b.east) / 2, (b.south + b.north) / 2


async def _existing_tiles(conn: asyncpg.Connection, provider: str) -> set[tuple[int, int, int]]:
    rows = await conn.fetch("SELECT zoom, tile_x, tile_y FROM jobs WHERE provider = $1", provider)
    return {(r["zoom"], r["tile_x"], r["tile_y"]) for r in rows}


def _dubai_pairs(root: Path, folders: Sequence[int] | None) -> Iterator[tuple[int, int, Path, Path]]:
    """``(folder, image number, image path, mask path)`` of every pair, in a fixed order."""
    _check_folder(root, "dubai-aerial")
    for folder_path in sorted(root.iterdir(), key=lambda p: p.name):
        match = _DUBAI_FOLDER.match(folder_path.name)
        if not match or (folders is not None and int(match.group(1)) not in folders):
            continue
        for image_path in sorted((folder_path / "images").glob("*.jpg")):
            image_match = _DUBAI_IMAGE.match(image_path.name)
            mask_path = folder_path / "masks" / f"{image_path.stem}.png"
            if not image_match or not mask_path.is_file():
                log.warning("dubai: skipping %s (no mask %s or unexpected name)", image_path, mask_path.name)
                continue
            yield int(match.group(1)), int(image_match.group(1)), image_path, mask_path


@dataclass(frozen=True)
class SampleRow:
    """A sample ready to store: the arguments of :func:`harvester.store.insert_external_sample` but the provider."""

    zoom: int
    tile_x: int
    tile_y: int
    lon: float
    lat: float
    image: bytes
    image_format: str
    mask_png: bytes
    building_pixels: int
    building_count: int
    split: str


def dubai_rows(folder: int, number: int, image_path: Path, mask_path: Path,
               skip: frozenset[tuple[int, int, int]] = frozenset()) -> list[SampleRow]:
    """The samples of one dubai-aerial image, those whose ``(zoom, x, y)`` is in ``skip`` left out (reads, no DB)."""
    image, mask = _read_rgb(image_path), building_mask(_read_rgb(mask_path))
    if image.shape[:2] != mask.shape[:2]:
        log.warning("dubai: %s is %s but its mask %s; using the common area", image_path, image.shape[:2],
                    mask.shape[:2])
    rows = []
    for crop in crops(image, mask):
        tile_x, tile_y = dubai_tile(folder, number, crop.row, crop.col)
        if (DUBAI_ZOOM, tile_x, tile_y) in skip:
            continue
        rows.append(SampleRow(
            DUBAI_ZOOM, tile_x, tile_y, *_lonlat(DUBAI_ZOOM, tile_x, tile_y), image=_encode_jpeg(crop.image),
            image_format="jpeg", mask_png=encode_mask_png(crop.mask), building_pixels=int(crop.mask.sum()),
            building_count=region_count(crop.mask), split=dubai_split(folder, number),
        ))
    return rows


async def load_dubai_async(database_url: str, root: Path, *, provider: str = "dubai",
                           folders: Sequence[int] | None = None, workers: int = 2) -> int:
    """See :func:`load_dubai`."""
    _check_folder(root, "dubai-aerial")
    conn = await asyncpg.connect(database_url)
    try:
        existing = frozenset(await _existing_tiles(conn, provider))
        todo = []
        for folder, number, image_path, mask_path in _dubai_pairs(root, folders):
            with Image.open(image_path) as image_file:  # the header only: a second run decodes nothing
                width, height = image_file.size
            wanted = {(DUBAI_ZOOM, *dubai_tile(folder, number, r, c))
                      for r in range(height // TILE_SIZE) for c in range(width // TILE_SIZE)}
            if not wanted <= existing:
                todo.append((folder, number, image_path, mask_path, existing))
        added = await _store_prepared(conn, provider, dubai_rows, todo, workers)
        log.info("dubai: %d samples added to provider %s (%d were there)", added, provider, len(existing))
        return added
    finally:
        await conn.close()


async def _store_prepared(conn: asyncpg.Connection, provider: str, prepare: Callable[..., list[SampleRow]],
                          jobs: Sequence[tuple[Any, ...]], workers: int) -> int:
    """Run ``prepare(*job)`` on ``workers`` threads (decoding and encoding release the GIL) and store the rows
    of each job in one transaction, in job order; at most ``workers + 1`` jobs prepared ahead of the inserts."""
    loop = asyncio.get_running_loop()
    added = 0
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="tilesmith-load") as pool:
        remaining = iter(jobs)
        ahead: deque[asyncio.Future[list[SampleRow]]] = deque()

        def submit() -> None:
            job = next(remaining, None)
            if job is not None:
                ahead.append(loop.run_in_executor(pool, prepare, *job))

        try:
            for _ in range(workers + 1):
                submit()
            while ahead:
                rows = await ahead.popleft()
                submit()
                async with conn.transaction():  # one commit per source image, not per sample
                    for row in rows:
                        await insert_external_sample(conn, provider=provider, **dataclasses.asdict(row))
                added += len(rows)
                log.debug("%s: %d samples stored (%d so far)", provider, len(rows), added)
        finally:
            for future in ahead:
                future.cancel()
    return added


def load_dubai(database_url: str, root: Path, *, provider: str = "dubai", folders: Sequence[int] | None = None,
               workers: int = 2) -> int:
    """Load dubai-aerial (``root`` = the folder holding ``Tile_1``..``Tile_8``) as samples of ``provider``.

    Crops of 256 x 256 are stored as JPEG (quality 95) with a one-channel mask PNG (building colour (60, 16, 152)
    exactly). Synthetic zoom-18 tiles near Dubai; split by :func:`dubai_split`: Tile_8 test, images 1-3 of Tile_7
    val, the rest train.
    ``folders`` restricts the load to those ``Tile_N`` numbers. Idempotent. Returns the number of samples added.
    """
    return asyncio.run(load_dubai_async(database_url, Path(root), provider=provider, folders=folders, workers=workers))


def load_kampala_labels(path: Path) -> list[BaseGeometry]:
    """The building footprints (polygons, lon/lat degrees) of a GeoJSON FeatureCollection in EPSG:4326."""
    collection = json.loads(Path(path).read_text())
    footprints = []
    for feature in collection.get("features", []):
        geometry = shape(feature["geometry"])
        if geometry.geom_type in ("Polygon", "MultiPolygon") and not geometry.is_empty:
            footprints.append(geometry)
    return footprints


def footprint_count(zoom: int, x: int, y: int, footprints: Sequence[BaseGeometry]) -> int:
    """Footprints (lon/lat) that intersect the tile: the ``building_count`` of a sample (SPEC: ``dataset``)."""
    west, south, east, north = lonlat_bounds(Tile(x, y, zoom))
    return int(shapely.intersects(np.asarray(footprints, dtype=object), box(west, south, east, north)).sum())


def kampala_splits(tiles: Sequence[tuple[int, int, int]]) -> dict[tuple[int, int, int], str]:
    """Split of each ``(zoom, x, y)`` tile: by its block, the tile of the lowest zoom present that holds it.

    kampala-oam is a pyramid over 7 such blocks (zoom 19) in one zoom-10 block, too few for the hash rule of
    :mod:`harvester.splits`. Blocks ordered west to east, then north to south: the last is ``test``, the one before
    ``val``, the others ``train`` (5/1/1 for kampala-oam), so every zoom of one place shares its split.
    """
    if not tiles:
        return {}
    block_zoom = min(z for z, _, _ in tiles)

    def block(tile: tuple[int, int, int]) -> tuple[int, int]:
        zoom, x, y = tile
        return x >> (zoom - block_zoom), y >> (zoom - block_zoom)

    blocks = sorted({block(t) for t in tiles})
    split_of = {b: "train" for b in blocks}
    if len(blocks) >= 3:
        split_of[blocks[-1]], split_of[blocks[-2]] = "test", "val"
    return {t: split_of[block(t)] for t in tiles}


def kampala_rows(root: Path, skip: frozenset[tuple[int, int, int]] = frozenset()) -> list[SampleRow]:
    """The samples of kampala-oam: tiles stored as they are, masks rasterized from ``labels.geojson``."""
    _check_folder(root, "kampala-oam")
    footprints = load_kampala_labels(root / "labels.geojson")
    paths = {}
    for path in sorted(root.glob("OAM-*.png")):
        match = _KAMPALA_TILE.match(path.name)
        if match:
            x, y, zoom = (int(v) for v in match.groups())
            paths[(zoom, x, y)] = path
    splits = kampala_splits(list(paths))
    rows = []
    for (zoom, x, y), path in paths.items():
        if (zoom, x, y) in skip:
            continue
        data = path.read_bytes()
        fmt = sniff_format(data)  # 24 of the .png files hold JPEG bytes
        if fmt is None:
            log.warning("kampala: skipping %s: not a JPEG, PNG or WebP image", path.name)
            continue
        mask = rasterize(footprints, Tile(x, y, zoom))
        rows.append(SampleRow(zoom, x, y, *_lonlat(zoom, x, y), image=data, image_format=fmt,
                              mask_png=encode_mask_png(mask), building_pixels=int(mask.sum()),
                              building_count=footprint_count(zoom, x, y, footprints),
                              split=splits[(zoom, x, y)]))
    return rows


async def load_kampala_async(database_url: str, root: Path, *, provider: str = "kampala") -> int:
    """See :func:`load_kampala`."""
    _check_folder(root, "kampala-oam")
    conn = await asyncpg.connect(database_url)
    try:
        existing = frozenset(await _existing_tiles(conn, provider))
        added = await _store_prepared(conn, provider, kampala_rows, [(root, existing)], workers=1)
        log.info("kampala: %d samples added to provider %s (%d were there)", added, provider, len(existing))
        return added
    finally:
        await conn.close()


def load_kampala(database_url: str, root: Path, *, provider: str = "kampala") -> int:
    """Load kampala-oam (``root`` = the folder of ``OAM-x-y-z.png`` and ``labels.geojson``). Idempotent."""
    return asyncio.run(load_kampala_async(database_url, Path(root), provider=provider))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trainer.datasets dubai|kampala [--root DIR] [--provider NAME] [--database-url URL]``."""
    parser = argparse.ArgumentParser(prog="python -m trainer.datasets", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=("dubai", "kampala"))
    parser.add_argument("--root", type=Path, help="folder of the data set (default: ../shared/data/<name>)")
    parser.add_argument("--provider", help="provider name of the samples (default: the data set's name)")
    parser.add_argument("--folders", help="dubai only: comma-separated Tile_N numbers to load (default: all)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL),
                        help="PostgreSQL URL (default: $DATABASE_URL)")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = args.root or SHARED_DATA / {"dubai": "dubai-aerial", "kampala": "kampala-oam"}[args.dataset]
    provider = args.provider or args.dataset
    try:
        folders = None if args.folders is None else [int(v) for v in args.folders.split(",")]
    except ValueError:
        parser.error(f"--folders must be comma-separated integers, not {args.folders!r}")
    try:
        if args.dataset == "dubai":
            added = load_dubai(args.database_url, root, provider=provider, folders=folders)
        else:
            added = load_kampala(args.database_url, root, provider=provider)
    except (DataError, OSError, asyncpg.PostgresError) as exc:
        print(f"error: {args.dataset} ({redact_url(args.database_url)}): {exc}", file=sys.stderr)
        return 1
    print(f"{args.dataset}: {added} samples added to provider {provider}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
