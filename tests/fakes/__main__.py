"""Run the fake upstreams as a process: ``python -m tests.fakes --port 8700 [knobs]``.

Prints the harvester's settings (``NAME=value`` lines, then ``READY``) and serves until SIGINT/SIGTERM. Examples:

    python -m tests.fakes --port 0 --seed 3 --density 600 --latency 0.05
    python -m tests.fakes --fault xyz:unavailable=0.1 --fault overpass:timeout_remark=0.05 --knob overpass:slots=1
    python -m tests.fakes --geojson ../shared/data/kampala-oam/labels.geojson --coverage 32.5,0.3,32.7,0.4
    python -m tests.fakes --prewarm points.csv   # benchmarks: tiles of these points rendered before READY
    python -m tests.fakes --tile-files ../shared/data/kampala-oam   # real tile bodies, synthetic buildings
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import signal
import threading
import sys
from pathlib import Path

from .faults import Knobs
from .file_tiles import scan_folder
from .servers import FakeUpstreams
from .world import World


def _knob_value(name: str, text: str):
    field_type = {f.name: f.type for f in dataclasses.fields(Knobs)}.get(name)
    if field_type is None:
        raise argparse.ArgumentTypeError(f"unknown knob {name!r}; known: {[f.name for f in dataclasses.fields(Knobs)]}")
    if "Bounds" in str(field_type):
        boxes = [tuple(float(v) for v in part.split(",")) for part in text.split(";") if part]
        return tuple(boxes) if "tuple[Bounds" in str(field_type) else (boxes[0] if boxes else None)
    for cast in (int, float):
        if cast.__name__ in str(field_type):
            try:
                return cast(text)
            except ValueError:
                continue
    if "bool" in str(field_type):
        return text.lower() in ("1", "true", "yes", "on")
    return text


def _assignment(text: str) -> tuple[str | None, str, str]:
    """'[server:]name=value' -> (server or None, name, value)."""
    target, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected [server:]name=value, got {text!r}")
    server, _, name = target.rpartition(":")
    return server or None, name, value


def _points(path: str) -> list[tuple[float, float]]:
    """lon,lat rows of a CSV file; a header line is skipped."""
    points = []
    with open(path, newline="") as handle:
        for row in csv.reader(handle):
            try:
                points.append((float(row[0]), float(row[1])))
            except (ValueError, IndexError):
                if points:  # only the first line may be a header
                    raise
    return points


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="xyz on PORT, ign PORT+1, google PORT+2, overpass PORT+3")
    parser.add_argument("--seed", type=int, default=0, help="world and fault seed")
    parser.add_argument("--density", type=float, default=400.0, help="buildings per km2 (mean)")
    parser.add_argument("--empty-fraction", type=float, default=0.1)
    parser.add_argument("--geojson", help="serve these polygons instead of a synthetic world")
    parser.add_argument("--tile-files", help="serve the OAM-{x}-{y}-{z}.png tiles of this folder (real imagery, "
                        "bytes as they are, one picked per tile) instead of rendered ones")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each server waits before answering")
    parser.add_argument("--coverage", help="W,S,E,N lon/lat box with imagery (404 outside)")
    parser.add_argument("--fault", action="append", type=_assignment, default=[], metavar="SERVER:NAME=P")
    parser.add_argument("--knob", action="append", type=_assignment, default=[], metavar="[SERVER:]NAME=VALUE")
    parser.add_argument("--prewarm", help="CSV of lon,lat (as HARVESTER_POINTS): render their tiles before READY")
    parser.add_argument("--prewarm-zooms", default="17,18", help="zooms of --prewarm (default 17,18)")
    args = parser.parse_args(argv)

    imagery = [path.read_bytes() for path in scan_folder(Path(args.tile_files)).values()] if args.tile_files else None
    if args.geojson:
        world = World.from_geojson(args.geojson, seed=args.seed, imagery=imagery)
    else:
        world = World(args.seed, buildings_per_km2=args.density, empty_fraction=args.empty_fraction, imagery=imagery)
    knobs, overrides, faults = {"latency_s": args.latency}, {}, {}
    if args.coverage:
        knobs["coverage"] = _knob_value("coverage", args.coverage)
    try:
        for server, name, value in args.knob:
            (overrides.setdefault(server, {}) if server else knobs)[name] = _knob_value(name, value)
        for server, name, value in args.fault:
            if not server:
                raise argparse.ArgumentTypeError(f"--fault needs a server: SERVER:{name}={value}")
            faults.setdefault(server, {})[name] = float(value)
        upstreams = FakeUpstreams(
            world, host=args.host, port=args.port, seed=args.seed, faults=faults, overrides=overrides, **knobs
        )
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        parser.error(str(exc))

    if args.prewarm:
        upstreams.prewarm(_points(args.prewarm), [int(z) for z in args.prewarm_zooms.split(",")])
    # The world's objects (millions, once prewarmed) live until exit: moved out of the collector's sight, so that
    # full collections (pauses of 50-100 ms every few seconds) do not delay the arrival times the fakes log.
    gc.collect()
    gc.freeze()

    def started() -> None:
        for name, value in upstreams.env().items():
            print(f"{name}={value}")
        print(f"FAKES_STATS_URL=http://{args.host}:{upstreams.ports['xyz']}/_fakes/stats")
        print("READY", flush=True)

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    upstreams.start()
    try:
        started()
        stopping.wait()
    finally:
        upstreams.stop()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
