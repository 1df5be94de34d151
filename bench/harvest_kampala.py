"""Real imagery through the whole harvester: kampala-oam harvested from local stand-ins of its upstreams.

``python -m bench.harvest_kampala [--root DIR] [--database-url URL] [--cli]`` (without ``--database-url``: a temporary
database, dropped at the end) prints one JSON object: the job counts, what the upstreams received, and the figures of
the harvested data (tiles with buildings, mean building cover, image formats) next to the seconds it took.

- Imagery: :class:`tests.fakes.file_tiles.FileTileServer` serves the folder's ``OAM-{x}-{y}-{z}.png`` files, byte for
  byte (JPEG-in-.png files with ``image/jpeg``), 404 elsewhere; the harvester uses its ``xyz`` provider, so the samples
  are stored with ``provider = 'xyz'`` (the harvester names a provider by its kind, not by its template).
- Labels: the fake Overpass of :class:`tests.fakes.servers.FakeUpstreams` over ``World.from_geojson(labels.geojson)``
  (206 OpenStreetMap building polygons); the harvester queries it per area, parses and rasterizes as in production.
- Coordinates: ``HARVESTER_POINTS`` = the centres of the tiles of the folder's highest zoom (112 at zoom 21), with
  ``HARVESTER_ZOOMS`` = every zoom present (19, 20, 21). kampala-oam is a complete pyramid (its 28 zoom-20 and 7
  zoom-19 tiles are exactly the parents and grandparents of its zoom-21 tiles), so the queue holds one job per file:
  147 jobs, each tile requested once, 7 areas (the zoom-19 tiles), hence 7 Overpass queries. :func:`plan` checks this
  for any folder and names the tiles that would be missed or requested in vain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from harvester.tiles import Tile, ancestor, lonlat_bounds
from tests.databases import TempDatabase
from tests.fakes.file_tiles import FileTileServer, scan_folder
from tests.fakes.servers import FakeUpstreams
from tests.fakes.world import World

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO_ROOT.parent / "shared" / "data" / "kampala-oam"
PROVIDER = "xyz"

#: Local upstreams: no reason to throttle (the limits are the harvester's courtesy to real servers).
HARVEST_ENV = {
    "HARVESTER_TILE_PROVIDER": PROVIDER,
    "HARVESTER_TILE_RATE": "1000",
    "HARVESTER_TILE_CONCURRENCY": "8",
    "HARVESTER_OVERPASS_RATE": "100",
    "HARVESTER_OVERPASS_CONCURRENCY": "2",  # the fake Overpass runs 2 queries at once (its default slots)
    "HARVESTER_MAX_ATTEMPTS": "3",
    "HARVESTER_BACKOFF_BASE": "0.2",
    "HARVESTER_REQUEST_TIMEOUT": "30",
}


@dataclass(frozen=True)
class Plan:
    points: list[tuple[float, float]]  # (lon, lat) of the centres of the highest-zoom tiles
    zooms: tuple[int, ...]  # every zoom present in the folder
    files: frozenset[tuple[int, int, int]]  # (z, x, y) of the folder's tiles
    requested: frozenset[tuple[int, int, int]]  # (z, x, y) the harvest will queue

    @property
    def missed(self) -> frozenset[tuple[int, int, int]]:
        """Files the harvest never asks for (tiles of a lower zoom that hold no highest-zoom tile)."""
        return self.files - self.requested

    @property
    def in_vain(self) -> frozenset[tuple[int, int, int]]:
        """Tiles the harvest asks for that the folder lacks (they are answered 404 and skipped)."""
        return self.requested - self.files


def plan(root: Path) -> Plan:
    """Points and zooms that make the harvester request the folder's tiles, and what that covers."""
    files = frozenset(scan_folder(root))
    if not files:
        raise FileNotFoundError(f"no OAM-{{x}}-{{y}}-{{z}}.png tiles in {root}")
    zooms = tuple(sorted({z for z, _, _ in files}))
    top = max(zooms)
    points, requested = [], set()
    for z, x, y in sorted(files):
        if z != top:
            continue
        b = lonlat_bounds(Tile(x, y, z))
        points.append(((b.west + b.east) / 2, (b.south + b.north) / 2))
        for zoom in zooms:
            a = ancestor(Tile(x, y, z), zoom)
            requested.add((a.z, a.x, a.y))
    return Plan(points, zooms, files, frozenset(requested))


def write_points(points: list[tuple[float, float]], path: Path) -> Path:
    """The ``lon,lat`` CSV of ``HARVESTER_POINTS`` (``repr`` of the floats: they read back exactly)."""
    path.write_text("lon,lat\n" + "".join(f"{lon!r},{lat!r}\n" for lon, lat in points))
    return path


@contextmanager
def kampala_upstreams(root: Path) -> Iterator[tuple[FileTileServer, FakeUpstreams, World]]:
    """The file tile server over ``root`` and the fake Overpass over ``root/labels.geojson``, running."""
    world = World.from_geojson(root / "labels.geojson")
    with FileTileServer(root) as tiles, FakeUpstreams(world) as fakes:
        yield tiles, fakes, world


def harvest_env(database_url: str, tile_url: str, overpass_url: str, points: Path, zooms: tuple[int, ...]
                ) -> dict[str, str]:
    return {**HARVEST_ENV, "DATABASE_URL": database_url, "HARVESTER_TILE_URL": tile_url,
            "HARVESTER_OVERPASS_URL": overpass_url, "HARVESTER_POINTS": str(points),
            "HARVESTER_ZOOMS": ",".join(map(str, zooms))}


async def _harvest_in_process(env: dict[str, str]) -> dict:
    from harvester import db
    from harvester.config import load_settings
    from harvester.run import harvest

    settings = load_settings(env)
    await db.migrate(settings.database_url)
    return await harvest(settings)


def _harvest_cli(env: dict[str, str]) -> dict:
    full = {**os.environ, **env}
    for command in (["migrate"], ["run"], ["status", "--json"]):
        result = subprocess.run([sys.executable, "-m", "harvester", *command], check=False, env=full,
                                capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"harvester {' '.join(command)} exited {result.returncode}: {result.stderr[-2000:]}")
    return json.loads(result.stdout)


def harvest_kampala(database_url: str, root: str | Path = DEFAULT_ROOT, *, cli: bool = False) -> dict:
    """Harvest the kampala-oam folder ``root`` into ``database_url`` (migrated here if needed) through the local
    stand-ins; return the job counts (``harvester status --json``'s shape) plus ``requests``: what the stand-ins got.

    ``cli=True`` runs ``python -m harvester migrate|run|status --json`` as subprocesses; otherwise the same
    :func:`harvester.run.harvest` in this process. ``requests`` holds ``tiles`` (tile requests), ``tiles_404``,
    ``max_per_tile`` (the most requests of one tile), ``tiles_not_requested`` (files never asked for),
    ``overpass`` (Overpass queries) and ``planned`` (the jobs the plan expects).
    """
    root = Path(root)
    p = plan(root)
    with tempfile.TemporaryDirectory(prefix="kampala-points-") as tmp, kampala_upstreams(root) as (tiles, fakes, _):
        points = write_points(p.points, Path(tmp) / "points.csv")
        env = harvest_env(database_url, tiles.url, fakes.overpass_url, points, p.zooms)
        counts = _harvest_cli(env) if cli else asyncio.run(_harvest_in_process(env))
        per_tile = tiles.request_counts()
        overpass = [r for r in fakes.requests("overpass") if r.path.endswith("/interpreter")]
    return {**counts, "requests": {
        "tiles": sum(per_tile.values()),
        "tiles_404": sum(1 for r in tiles.requests() if r.status == 404),
        "max_per_tile": max(per_tile.values(), default=0),
        "tiles_not_requested": len(p.files - set(per_tile)),
        "overpass": len(overpass),
        "planned": len(p.requested),
    }}


async def summarize(database_url: str, provider: str = PROVIDER) -> dict:
    """Figures of the harvested samples: per zoom, with buildings, mean building cover, formats, splits."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT zoom, split, image_format, building_pixels FROM dataset WHERE provider = $1",
                                provider)
    finally:
        await conn.close()
    covers = [r["building_pixels"] / 65536 for r in rows]
    return {
        "samples": len(rows),
        "by_zoom": dict(sorted(Counter(str(r["zoom"]) for r in rows).items())),
        "with_buildings": sum(1 for r in rows if r["building_pixels"] > 0),
        "mean_cover": round(sum(covers) / len(covers), 4) if covers else None,
        "formats": dict(Counter(r["image_format"] for r in rows)),
        "splits": dict(Counter(r["split"] for r in rows)),
    }


async def apply_block_splits(database_url: str, provider: str = PROVIDER) -> dict[str, int]:
    """Re-split the harvested samples by zoom-19 block (:func:`trainer.datasets.kampala_splits`: 5 train, 1 val,
    1 test) and return the samples per split.

    The harvester's split is a hash of the zoom-10 block (SPEC), and all of kampala-oam lies in one such block, so a
    harvest puts every sample in one split (``train``): nothing to validate or test on. A train/evaluate run on the
    harvested data calls this first; it changes only ``samples.split`` of ``provider``'s samples.
    """
    from trainer.datasets import kampala_splits

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT sample_id, zoom, tile_x, tile_y FROM dataset WHERE provider = $1", provider)
        splits = kampala_splits([(r["zoom"], r["tile_x"], r["tile_y"]) for r in rows])
        chosen = [splits[(r["zoom"], r["tile_x"], r["tile_y"])] for r in rows]
        await conn.execute("UPDATE samples s SET split = u.split FROM unnest($1::bigint[], $2::text[]) AS u(id, split)"
                           " WHERE s.sample_id = u.id", [r["sample_id"] for r in rows], chosen)
    finally:
        await conn.close()
    return dict(sorted(Counter(chosen).items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.harvest_kampala", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"kampala-oam folder (default {DEFAULT_ROOT})")
    parser.add_argument("--database-url", help="harvest into this database (default: a temporary one, dropped after)")
    parser.add_argument("--cli", action="store_true", help="run the harvester's CLI as subprocesses")
    parser.add_argument("--resplit", action="store_true",
                        help="then split the samples by zoom-19 block (5 train, 1 val, 1 test) for train/evaluate")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        url = args.database_url or stack.enter_context(TempDatabase(prefix="tilesmith_kampala"))
        started = time.perf_counter()
        counts = harvest_kampala(url, args.root, cli=args.cli)
        seconds = time.perf_counter() - started
        if args.resplit:
            asyncio.run(apply_block_splits(url))
        print(json.dumps({"harvest": counts, "seconds": round(seconds, 2), "data": asyncio.run(summarize(url))},
                         indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
