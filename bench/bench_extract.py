"""OSM extract benchmark: ``python -m bench.bench_extract [--buildings 1000000] [--samples 1000]``. Prints:

1. Import throughput: a synthetic ``.osm.pbf`` of at least ``--buildings`` footprints, written by the fakes' generator
   (tests/fakes/pbf.py), imported by ``harvester import-osm`` as a process: footprints/s, peak memory, table size, and
   all of it extrapolated to France (~30 M buildings; target >= 25,000 buildings/s, France in under an hour).
2. Area lookups/s: the extract source's query (one per area, zoom-17 areas at random in the imported box) from 8
   concurrent tasks (target >= 1,000/s).
3. Harvest samples/s with ``HARVESTER_LABELS=extract`` against ``overpass`` (the baseline, measured in the same run) on
   the same fakes and the same points, as bench/bench_harvester.py runs them; and the areas/s each labelled.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.bench_harvester import start_fakes, warm_overpass, write_points
from harvester.config import load_settings
from harvester.labels.extract import ExtractLabels
from harvester.run import harvest
from harvester.tiles import Tile, area_tile, lonlat_bounds
from tests.databases import TempDatabase
from tests.fakes.osm import lonlat_to_unit
from tests.fakes.pbf import write_extract
from tests.fakes.world import World

FRANCE_BUILDINGS = 30_000_000
FOOTPRINTS_PER_DEG2 = 99_613 / 0.00525  # measured for World(11, 3000/km2, no empty districts) near Paris


# The command line, then the process's own peak RSS (VmHWM: wait4's ru_maxrss would fold in this benchmark's memory,
# which the child shares at fork, before its exec).
_IMPORT = ("import sys; from harvester.cli import main; rc = main(['import-osm', sys.argv[1]]);"
           " print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr); sys.exit(rc)")


def import_cli(url: str, path: Path) -> tuple[float, str, float]:
    """Seconds, the command's summary line, and its peak RSS in MB."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _IMPORT, str(path)], capture_output=True, text=True,
                            env={**os.environ, "DATABASE_URL": url})
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return time.perf_counter() - start, result.stdout.strip(), int(result.stderr.split()[-1]) / 1024


async def table_size(url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(url)
    try:
        return (await conn.fetchval("SELECT pg_total_relation_size('osm_buildings')"),
                await conn.fetchval("SELECT count(*) FROM osm_buildings"))
    finally:
        await conn.close()


async def lookups(url: str, box, n: int, concurrency: int = 8) -> tuple[float, float]:
    """Lookups/s and mean footprints per lookup, zoom-17 areas drawn at random in ``box``."""
    rng = random.Random(1)
    w, s, e, nn = box
    areas = []
    for _ in range(n):
        ux, uy = lonlat_to_unit(rng.uniform(w, e), rng.uniform(s, nn))
        areas.append(lonlat_bounds(Tile(int(ux * 2**17), int(uy * 2**17), 17)))
    pool = await asyncpg.create_pool(url, min_size=concurrency, max_size=concurrency)
    labels, found = ExtractLabels(pool), [0]
    try:
        async def worker():
            while areas:
                found[0] += len((await labels.footprints(areas.pop())).footprints)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    finally:
        await pool.close()
    return n / elapsed, found[0] / n


async def harvests(samples: int, workdir: str) -> dict[str, dict[str, float]]:
    """The same points harvested twice against one set of fakes: Overpass labels, then extract labels."""
    points_csv = os.path.join(workdir, "points.csv")
    points = write_points(points_csv, samples, seed=1)
    zooms = (17, 18)
    areas = [lonlat_bounds(area_tile(lon, lat, zooms)) for lon, lat in points]
    pbf = Path(workdir) / "harvest.osm.pbf"
    write_extract(World(0), [(w - 1e-6, s - 1e-6, e + 1e-6, n + 1e-6) for w, s, e, n in areas], pbf)
    proc, fake_env = start_fakes("--prewarm", points_csv)
    out = {}
    try:
        await warm_overpass(fake_env["HARVESTER_OVERPASS_URL"], points, zooms)
        for labels in ("overpass", "extract"):
            async with TempDatabase(prefix="tilesmith_bench", migrate=True) as url:
                if labels == "extract":
                    import_cli(url, pbf)
                settings = load_settings({
                    **fake_env, "DATABASE_URL": url, "HARVESTER_POINTS": points_csv, "HARVESTER_ZOOMS": "17,18",
                    "HARVESTER_TILE_PROVIDER": "xyz", "HARVESTER_TILE_RATE": "100000",
                    "HARVESTER_TILE_CONCURRENCY": "32", "HARVESTER_OVERPASS_RATE": "100000",
                    "HARVESTER_OVERPASS_CONCURRENCY": "8", "HARVESTER_LABELS": labels})
                start = time.perf_counter()
                final = await harvest(settings)
                elapsed = time.perf_counter() - start
                conn = await asyncpg.connect(url)
                n_areas = await conn.fetchval("SELECT count(*) FROM areas WHERE fetched_at IS NOT NULL")
                await conn.close()
            out[labels] = {"samples": final["done"], "seconds": elapsed, "samples_per_s": final["done"] / elapsed,
                           "areas_per_s": n_areas / elapsed}
    finally:
        proc.terminate()
        proc.wait(10)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buildings", type=int, default=1_000_000, help="footprints of the synthetic extract, at least")
    parser.add_argument("--samples", type=int, default=1000, help="coordinates of each harvest (x2 zooms)")
    parser.add_argument("--lookups", type=int, default=5000)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} (2 cores; the machine may be shared)")
    with tempfile.TemporaryDirectory() as workdir:
        side = math.sqrt(args.buildings * 1.15 / FOOTPRINTS_PER_DEG2)
        west, south = 2.0, 48.6
        box = (west, south, west + side * 1.5, south + side / 1.5)
        pbf = Path(workdir) / "synthetic.osm.pbf"
        start = time.perf_counter()
        counts = write_extract(World(11, buildings_per_km2=3000, empty_fraction=0.0, cell_cache=64), box, pbf)
        written = time.perf_counter() - start
        size = pbf.stat().st_size
        print(f"synthetic extract: {counts['footprints']} footprints, {counts['nodes']} nodes, {counts['ways']} ways,"
              f" {counts['relations']} relations, {size / 1e6:.0f} MB, written in {written:.0f} s")

        async def run_import():
            async with TempDatabase(prefix="tilesmith_bench", migrate=True) as url:
                seconds, line, peak_mb = import_cli(url, pbf)
                table_bytes, rows = await table_size(url)
                rate_n, per_lookup = await lookups(url, box, args.lookups)
                return seconds, line, peak_mb, table_bytes, rows, rate_n, per_lookup

        seconds, line, peak_mb, table_bytes, rows, lookup_rate, per_lookup = asyncio.run(run_import())
        rate = rows / seconds
        france_s = FRANCE_BUILDINGS / rate
        print(f"import: {line}")
        print(f"import throughput: {rows} footprints in {seconds:.1f} s = {rate:.0f} buildings/s (target >= 25000;"
              f" ratio {rate / 25000:.2f}); peak RSS {peak_mb:.0f} MB; node index {16 * counts['nodes'] / 1e6:.0f} MB"
              f" on disk (16 B/node); table + index {table_bytes / 1e6:.0f} MB = {table_bytes / rows:.0f} B/building")
        print(f"France extrapolated ({FRANCE_BUILDINGS / 1e6:.0f} M buildings): {france_s / 60:.0f} min,"
              f" table + index {table_bytes / rows * FRANCE_BUILDINGS / 1e9:.1f} GB")
        print(f"area lookups: {lookup_rate:.0f}/s with 8 concurrent tasks (target >= 1000; ratio"
              f" {lookup_rate / 1000:.2f}), {per_lookup:.1f} footprints per zoom-17 area")
        h = asyncio.run(harvests(args.samples, workdir))
    o, e = h["overpass"], h["extract"]
    for name, r in h.items():
        print(f"harvest with {name} labels: {r['samples']} samples in {r['seconds']:.1f} s ="
              f" {r['samples_per_s']:.0f} samples/s, {r['areas_per_s']:.0f} areas labelled/s")
    print(f"extract / overpass samples/s ratio: {e['samples_per_s'] / o['samples_per_s']:.2f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
