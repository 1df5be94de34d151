"""The CPU cores of one harvested sample, per call: ``python -m bench.bench_cores [--rounds 9]``.

What ``harvester.worker.build_sample`` runs for every tile, timed on real and fake inputs:

1. ``validate_tile`` on the Kampala tiles (real JPEG and PNG, if ``../shared/data/kampala-oam`` is present) and on the
   fakes' JPEG tiles (what ``bench.bench_harvester`` serves), next to the floor it cannot go under: Pillow's open and
   full decode alone.
2. ``rasterize`` on every zoom-17 and zoom-18 tile over the Helsinki Overpass fixture, the Kampala labels (if present)
   and the fakes' buildings, next to the baseline measured in the same run: the previous implementation, rasterio's
   ``rasterize`` fed shapely geometries (which it turns into GeoJSON through ``__geo_interface__``, then into OGR
   geometries for GDAL). The masks are compared pixel for pixel. Also shown, not used: the alternative of testing
   each footprint's pixel centres with ``shapely.contains_xy`` (exact on these data, not on ties, and slower).
3. ``encode_mask_png`` on those masks, next to the previous encoder (Pillow, zlib level 6), with the mean sizes.
4. The whole of ``build_sample`` on the fakes' tiles and buildings.

Times are CPU seconds of this process per call, the best of ``--rounds`` rounds, the variants interleaved within each
round: on a shared 2-core machine, wall-clock times of sub-millisecond calls mostly measure the neighbours.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import rasterio.features
import shapely
from PIL import Image

from harvester.imagery import validate_tile
from harvester.labels.osm import Footprint, parse_buildings
from harvester.rasterize import encode_mask_png, rasterize
from harvester.tiles import Tile, lonlat_bounds, mercator_bounds, pixel_transform, tile_at, to_mercator
from harvester.worker import build_sample

REPO_ROOT = Path(__file__).resolve().parents[1]
HELSINKI = REPO_ROOT / "tests" / "fixtures" / "helsinki_buildings.overpass.json.gz"
KAMPALA = REPO_ROOT.parent / "shared" / "data" / "kampala-oam"
FAKE_POINTS = [(2.35, 48.85), (4.84, 45.76), (5.37, 43.30), (1.44, 43.60), (-1.55, 47.22), (7.75, 48.58)]


def polygonal(geometries: np.ndarray) -> np.ndarray:
    """Polygons and multipolygons, also those inside collections (the previous rasterize's filter)."""
    types = shapely.get_type_id(geometries)
    parts = shapely.get_parts(geometries[types == 7])
    return np.concatenate([geometries[(types == 3) | (types == 6)], parts[np.isin(shapely.get_type_id(parts), (3, 6))]])


def rasterio_rasterize(footprints: Sequence[shapely.Geometry], tile: Tile, size: int = 256) -> np.ndarray:
    """The previous rasterize: shapely geometries handed to rasterio (``__geo_interface__``), burnt by GDAL."""
    mask = np.zeros((size, size), dtype=np.uint8)
    geometries = polygonal(np.asarray(footprints, dtype=object).reshape(-1))
    west, south, east, north = lonlat_bounds(tile)
    pad_x, pad_y = (east - west) / 100, (north - south) / 100
    geometries = geometries[shapely.intersects(geometries, shapely.box(west - pad_x, south - pad_y,
                                                                       east + pad_x, north + pad_y))]
    if geometries.size == 0:
        return mask
    projected = shapely.transform(geometries, to_mercator, interleaved=False)
    shapes = [(g, 1) for g in projected[shapely.intersects(projected, shapely.box(*mercator_bounds(tile)))]]
    if shapes:
        rasterio.features.rasterize(shapes, out=mask, transform=pixel_transform(tile, size), all_touched=False,
                                    default_value=1)
    return mask


def contains_xy_rasterize(footprints: Sequence[shapely.Geometry], tile: Tile, size: int = 256) -> np.ndarray:
    """The alternative: ``shapely.contains_xy`` on the pixel centres under each footprint's bounding box."""
    mask = np.zeros((size, size), dtype=bool)
    polygons = polygonal(np.asarray(footprints, dtype=object).reshape(-1))
    projected = shapely.transform(polygons, to_mercator, interleaved=False)
    left, _, right, top = mercator_bounds(tile)
    step = (right - left) / size
    centres = (np.arange(size) + 0.5) * step
    for geometry, (x0, y0, x1, y1) in zip(projected, shapely.bounds(projected)):
        c0, c1 = max(int((x0 - left) / step) - 1, 0), min(int((x1 - left) / step) + 2, size)
        r0, r1 = max(int((top - y1) / step) - 1, 0), min(int((top - y0) / step) + 2, size)
        if c0 < c1 and r0 < r1:
            shapely.prepare(geometry)
            xs, ys = np.meshgrid(left + centres[c0:c1], top - centres[r0:r1])
            mask[r0:r1, c0:c1] |= shapely.contains_xy(geometry, xs, ys)
    return mask.view(np.uint8)


def pillow_png(mask: np.ndarray) -> bytes:
    """The previous encode_mask_png: Pillow, zlib level 6."""
    out = io.BytesIO()
    Image.fromarray((np.asarray(mask) != 0).astype(np.uint8)).save(out, format="PNG", compress_level=6)
    return out.getvalue()


def decode_only(body: bytes) -> None:
    with Image.open(io.BytesIO(body)) as image:
        image.load()


def per_call_us(variants: dict[str, Callable], calls: Sequence[tuple], rounds: int) -> dict[str, float]:
    """Best CPU time per call over ``rounds``, each round running every variant over every call in turn."""
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for name, function in variants.items():
            start = time.process_time()
            for args in calls:
                function(*args)
            best[name] = min(best[name], (time.process_time() - start) / len(calls) * 1e6)
    return best


def tiles_over(footprints: Sequence[shapely.Geometry], zoom: int) -> list[Tile]:
    west, south, east, north = shapely.total_bounds(footprints)
    top_left, bottom_right = tile_at(west, north, zoom), tile_at(east, south, zoom)
    return [Tile(x, y, zoom) for x in range(top_left.x, bottom_right.x + 1)
            for y in range(top_left.y, bottom_right.y + 1)]


def footprint_sets() -> dict[str, list[shapely.Geometry]]:
    with gzip.open(HELSINKI, "rt") as f:
        sets = {"helsinki": [fp.geometry for fp in parse_buildings(json.load(f)).footprints]}
    if (KAMPALA / "labels.geojson").is_file():
        labels = json.loads((KAMPALA / "labels.geojson").read_text())
        sets["kampala"] = [shapely.make_valid(shapely.geometry.shape(f["geometry"])) for f in labels["features"]]
    return sets


def fake_samples(world) -> list[tuple[bytes, list[Footprint], Tile]]:
    """The fakes' z17 and z18 tiles around a few French cities, with the buildings of their z17 area."""
    samples = []
    for lon, lat in FAKE_POINTS:
        centre = tile_at(lon, lat, 17)
        for dx in range(-2, 3):
            area = Tile(centre.x + dx, centre.y, 17)
            footprints = [Footprint("way", i, g, {}) for i, g in enumerate(world.footprints_in(*lonlat_bounds(area)))]
            for tile in [area] + [Tile(2 * area.x + i, 2 * area.y + j, 18) for i in (0, 1) for j in (0, 1)]:
                samples.append((world.tile_bytes(tile.z, tile.x, tile.y), footprints, tile))
    return samples


def report(title: str, times: dict[str, float], baseline: str | None = None, extra: str = "") -> None:
    parts = [f"{name} {us:7.0f} us" for name, us in times.items()]
    if baseline:
        new = next(name for name in times if name != baseline)
        parts.append(f"ratio {times[baseline] / times[new]:5.1f}x")
    print(f"  {title:34s} " + " | ".join(parts) + (f" | {extra}" if extra else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="timing rounds; the best one is reported")
    args = parser.parse_args()
    from tests.fakes.world import World  # the harvest benchmark's fakes: their tiles and buildings

    world = World(1)
    samples = fake_samples(world)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; CPU us per call, best of {args.rounds}")

    print("validate_tile (floor: Pillow open + full decode, nothing else)")
    bodies = {"fakes jpeg q85": [body for body, _, _ in samples]}
    if KAMPALA.is_dir():
        real = [p.read_bytes() for p in sorted(KAMPALA.glob("OAM-*.png"))]
        bodies["kampala jpeg"] = [b for b in real if b[:3] == b"\xff\xd8\xff"]
        bodies["kampala png (rgba)"] = [b for b in real if b[:4] == b"\x89PNG"]
    for name, group in bodies.items():
        times = per_call_us({"decode": decode_only, "validate": lambda b: validate_tile(b, None)},
                            [(b,) for b in group], args.rounds)
        report(f"{name} ({len(group)})", times)

    print("rasterize (baseline: rasterio + __geo_interface__, the previous implementation, same tiles)")
    masks = []
    fake_sets = [("fakes", [([f.geometry for f in fps], tile) for _, fps, tile in samples if tile.z == z], z)
                 for z in (17, 18)]
    real_sets = [(name, [(footprints, t) for t in tiles_over(footprints, z)], z)
                 for name, footprints in footprint_sets().items() for z in (17, 18)]
    for name, pairs, zoom in real_sets + fake_sets:
        # What build_sample hands over: the footprints that meet the tile.
        calls = []
        for footprints, tile in pairs:
            geometries = np.asarray(footprints, dtype=object)
            hits = list(geometries[shapely.intersects(geometries, shapely.box(*lonlat_bounds(tile)))])
            if hits:
                calls.append((hits, tile))
        new = [rasterize(*c) for c in calls]
        equal = sum(np.array_equal(m, rasterio_rasterize(*c)) for m, c in zip(new, calls))
        near = sum(np.array_equal(m, contains_xy_rasterize(*c)) for m, c in zip(new, calls))
        masks += new
        times = per_call_us({"rasterio": rasterio_rasterize, "rasterize": rasterize,
                             "contains_xy": contains_xy_rasterize}, calls, args.rounds)
        footprints_per_tile = np.mean([len(h) for h, _ in calls])
        report(f"{name} z{zoom} ({len(calls)} tiles, {footprints_per_tile:.0f} fp)",
               {k: times[k] for k in ("rasterio", "rasterize")}, baseline="rasterio",
               extra=f"same pixels {equal}/{len(calls)} | contains_xy {times['contains_xy']:.0f} us "
                     f"({near}/{len(calls)} same)")

    print("encode_mask_png (baseline: Pillow zlib level 6, the previous encoder)")
    times = per_call_us({"pillow-6": pillow_png, "encode": encode_mask_png}, [(m,) for m in masks], args.rounds)
    sizes = f"mean size {np.mean([len(pillow_png(m)) for m in masks]) / 1e3:.2f} -> " \
            f"{np.mean([len(encode_mask_png(m)) for m in masks]) / 1e3:.2f} kB ({len(masks)} masks)"
    report("real and fake masks", times, baseline="pillow-6", extra=sizes)

    print("build_sample (validate, select footprints, rasterize, encode)")
    times = per_call_us({"build_sample": lambda b, f, t: build_sample(b, "image/jpeg", f, t)}, samples, args.rounds)
    report(f"fakes z17 + z18 ({len(samples)})", times,
           extra=f"{1e6 / times['build_sample']:.0f} samples/s per core")


if __name__ == "__main__":
    main()
