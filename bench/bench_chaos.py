"""Soak under faults: ``python -m bench.bench_chaos [--coords 10000] [--small 2500] [--workers 3]``.

Issue 4, "Load". The fake upstreams run as their own process (zero latency, Overpass with 64 slots, the tiles of every
coordinate rendered before READY) with about ``--fault-rate`` (5 %) of tile requests and of Overpass queries
answered with a fault, spread over every fault kind; ``--workers`` ``harvester run`` processes share one temporary
database (created, migrated with ``harvester migrate``, dropped). The soak runs twice, with ``--small`` and with
``--coords`` coordinates x 2 zooms (5,000 and 20,000 jobs by default), and prints per run:

- samples/s overall (samples stored / wall time from the workers' start to the last exit);
- the peak RSS of each worker (VmHWM from /proc/<pid>/status, polled while it runs): the same at both sizes means
  memory is bounded by the settings (slots, caps), not by the number of jobs;
- invariant violations: :func:`check_database` (every job done with a valid, consistent sample, skipped with a
  reason or failed after exactly HARVESTER_MAX_ATTEMPTS; no orphan), counts that add up, and, from the fakes' request
  log: a sample stored from a faulted answer, a skip without a 404 or blank answer, a tile asked more often than
  its attempts (a retry that bypassed the limiter), an area asked again after a sound Overpass answer.

Left out of the soak, because ``harvester run`` waits them out at production length (30 s after a 429, 10 s after a
504, whatever /api/status says): Overpass 429, 504 and busy status, all covered with short pauses by
tests/integration/test_chaos.py. Tile 429s (with Retry-After: 1 s) are in.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import asyncpg

from harvester.tiles import tile_at
from tests.databases import TempDatabase
from tests.fakes.process import start_fakes_process
from tests.integration.harvest_checks import check_database

ROOT = Path(__file__).resolve().parents[1]
ZOOMS = (17, 18)
MAX_ATTEMPTS = 5
TILE_FAULTS = ("rate_limited", "rate_limited_no_retry_after", "server_error", "bad_gateway", "unavailable",
               "gateway_timeout", "reset", "truncated", "html_200", "wrong_content_type", "corrupt_image", "cut_image",
               "blank", "missing")
OVERPASS_FAULTS = ("server_error", "bad_gateway", "unavailable", "reset", "truncated", "html_200",
                   "wrong_content_type", "timeout_remark", "memory_remark", "malformed_json", "missing_members",
                   "bad_geometry", "oversize", "not_acceptable")
HANG_SHARE = 0.002  # of requests: each costs a 2 s timeout, so fewer of them
STORED_FROM = {None, "wrong_content_type"}  # tile answers whose body is the right image
SKIPPED_FROM = {"blank", "missing"}
ACCEPTED_OVERPASS = {None, "missing_members", "bad_geometry", "oversize"}  # 200 + JSON + no runtime error


def fault_args(rate: float) -> list[str]:
    args = []
    hang = min(HANG_SHARE, rate / 10)
    for server, kinds in (("xyz", TILE_FAULTS), ("overpass", OVERPASS_FAULTS)):
        share = (rate - hang) / len(kinds)
        args += [f"--fault={server}:{kind}={share:.6f}" for kind in kinds] + [f"--fault={server}:hang={hang:.6f}"]
    return args


def distinct_points(n: int, seed: int) -> list[tuple[float, float]]:
    """``n`` coordinates in France, no two in the same zoom-17 tile: exactly ``2 n`` jobs."""
    rng, seen, points = random.Random(seed), set(), []
    while len(points) < n:
        lon, lat = round(rng.uniform(-1.0, 7.0), 7), round(rng.uniform(43.5, 49.5), 7)
        tile = tile_at(lon, lat, min(ZOOMS))
        if (tile.x, tile.y) not in seen:
            seen.add((tile.x, tile.y))
            points.append((lon, lat))
    return points


def write_points(path: Path, points) -> None:
    path.write_text("lon,lat\n" + "".join(f"{lon},{lat}\n" for lon, lat in points))


# -- the fakes process ---------------------------------------------------------------------------------------------


class Fakes:
    def __init__(self, prewarm: Path, seed: int, rate: float, density: float):
        self.proc, self.env = start_fakes_process(
            "--seed", str(seed), "--density", str(density), "--knob", "overpass:slots=64", "--knob", "hang_s=3",
            "--knob", "retry_after_s=1", "--prewarm", str(prewarm), "--prewarm-zooms", ",".join(map(str, ZOOMS)),
            *fault_args(rate))
        self.base = self.env["FAKES_STATS_URL"].rpartition("/_fakes/")[0]

    def _call(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method="POST" if data is not None else "GET",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def restore(self) -> None:
        self._call("/_fakes/restore", {})

    def requests(self, kind: str) -> list[dict]:
        return self._call(f"/_fakes/requests?kind={kind}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- one soak ------------------------------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _at(samples: list[tuple[float, int]], end: float) -> list[float]:
    out = []
    for share in (0.1, 0.5, 0.9):
        before = [kib for t, kib in samples if t <= share * end]
        out.append(round(before[-1] / 1024, 1) if before else 0.0)
    return out


def soak(fakes: Fakes, points_csv: Path, jobs: int, workers: int, deadline_s: float, logdir: Path) -> dict:
    with TempDatabase(prefix="tilesmith_chaos") as url:
        env = {**os.environ, **fakes.env, "DATABASE_URL": url, "HARVESTER_POINTS": str(points_csv),
               "HARVESTER_ZOOMS": ",".join(map(str, ZOOMS)), "HARVESTER_TILE_PROVIDER": "xyz",
               "HARVESTER_TILE_RATE": "100000", "HARVESTER_TILE_CONCURRENCY": "16",
               "HARVESTER_OVERPASS_RATE": "100000", "HARVESTER_OVERPASS_CONCURRENCY": "4",
               "HARVESTER_MAX_ATTEMPTS": str(MAX_ATTEMPTS), "HARVESTER_REQUEST_TIMEOUT": "2",
               "HARVESTER_BACKOFF_BASE": "0.05", "HARVESTER_LEASE_SECONDS": "60"}
        subprocess.run([sys.executable, "-m", "harvester", "--log-level", "WARNING", "migrate"], cwd=ROOT, env=env,
                       check=True)
        fakes.restore()  # empty request logs, fresh fault draws
        start = time.monotonic()
        procs, logs = [], []
        for i in range(workers):
            logs.append(open(logdir / f"worker-{jobs}-{i}.log", "w"))  # noqa: SIM115 - closed below
            procs.append(subprocess.Popen([sys.executable, "-m", "harvester", "--log-level", "WARNING", "run"],
                                          cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        peak = {p.pid: 0 for p in procs}
        timeline: dict[int, list[tuple[float, int]]] = {p.pid: [] for p in procs}  # (s since start, VmRSS KiB)
        exited: dict[int, float] = {}
        timed_out = False
        while len(exited) < len(procs):
            for p in procs:
                if p.pid in exited:
                    continue
                hwm, rss = _status_kib(p.pid, "VmHWM"), _status_kib(p.pid, "VmRSS")
                if hwm:
                    peak[p.pid] = max(peak[p.pid], hwm)
                if rss:
                    timeline[p.pid].append((time.monotonic() - start, rss))
                if p.poll() is not None:
                    exited[p.pid] = time.monotonic() - start
            if time.monotonic() - start > deadline_s and not timed_out:
                timed_out = True
                for p in procs:
                    if p.poll() is None:
                        p.terminate()  # SIGTERM: the jobs in flight are released; the report says it
            time.sleep(0.1)
        for log in logs:
            log.close()
        wall = max(exited.values())
        codes = [p.returncode for p in procs]
        result = {"jobs_planned": jobs, "workers": workers, "wall_s": wall, "exit_codes": codes,
                  "peak_rss_mib": [round(peak[p.pid] / 1024, 1) for p in procs], "timed_out": timed_out,
                  # RSS of each worker at 10 %, 50 % and 90 % of its run: flat once the work is under way
                  "rss_mib_at_10_50_90": [_at(timeline[p.pid], exited[p.pid]) for p in procs]}
        result.update(asyncio.run(_verify(url, fakes, timed_out)))
        result["samples_per_s"] = result["done"] / wall
        return result


async def _verify(url: str, fakes: Fakes, partial: bool) -> dict:
    """Job counts and invariant violations (by kind, with one example each)."""
    violations: dict[str, list[str]] = collections.defaultdict(list)
    conn = await asyncpg.connect(url)
    try:
        jobs = [dict(r) for r in await conn.fetch(
            "SELECT j.job_id, j.zoom, j.tile_x, j.tile_y, j.area_id, j.state::text AS state, j.attempts, j.last_error,"
            " a.zoom AS az, a.tile_x AS ax, a.tile_y AS ay FROM jobs j JOIN areas a USING (area_id)")]
        samples = await conn.fetchval("SELECT count(*) FROM samples")
    finally:
        await conn.close()
    counts = collections.Counter(j["state"] for j in jobs)
    if not partial:
        start = time.monotonic()
        try:
            await check_database(url, None, max_attempts=MAX_ATTEMPTS)
        except AssertionError as exc:
            violations["check_database"].append(str(exc)[:300] or repr(exc))
        check_s = time.monotonic() - start
    else:
        check_s = 0.0
    if counts["done"] + counts["skipped"] + counts["failed"] + counts["pending"] + counts["in_progress"] != len(jobs) \
            or samples != counts["done"]:
        violations["counts"].append(f"{dict(counts)}, {samples} samples")

    tiles = collections.defaultdict(list)
    for r in fakes.requests("xyz"):
        if r["key"]:
            tiles[r["key"]].append(r)
    queries = collections.defaultdict(list)
    for r in fakes.requests("overpass"):
        if r["path"].endswith("/interpreter"):
            queries[r["key"]].append(r)
    from harvester.labels.osm import building_query
    from harvester.tiles import Tile, lonlat_bounds

    timeout_s = max(1, int(2 * 0.8))
    sound_areas, asked_again = set(), 0
    for az, ax, ay in _by_area(jobs):
        sent = sorted(queries.get(building_query(lonlat_bounds(Tile(ax, ay, az)), timeout_s, 256 * 1024 * 1024),
                              []), key=lambda r: r["t"])
        accepted = [r for r in sent if r["status"] == 200 and r["fault"] in ACCEPTED_OVERPASS]
        if sent and sent[0] in accepted:
            sound_areas.add((az, ax, ay))
        if accepted and sent[-1] is not accepted[0]:
            asked_again += 1
            violations["overpass_asked_again_after_a_sound_answer"].append(
                f"area {az}/{ax}/{ay}: {[r['fault'] or r['status'] for r in sent]}")
    for j in jobs:
        key = f"{j['zoom']}/{j['tile_x']}/{j['tile_y']}"
        sent = sorted(tiles.get(key, []), key=lambda r: r["t"])
        seq = [r["fault"] or r["status"] for r in sent]
        if len(sent) > j["attempts"] or ((j["az"], j["ax"], j["ay"]) in sound_areas and len(sent) != j["attempts"]):
            violations["tile_requests_not_one_per_attempt"].append(f"{key}: {seq} for {j['attempts']} attempts")
        if j["state"] == "done" and not (sent and sent[-1]["status"] == 200 and sent[-1]["fault"] in STORED_FROM):
            violations["stored_from_a_bad_answer"].append(f"{key}: {seq}")
        if j["state"] == "skipped" and not (sent and sent[-1]["fault"] in SKIPPED_FROM):
            violations["skipped_without_404_or_blank"].append(f"{key}: {seq}: {j['last_error']}")
        if j["state"] == "failed" and j["attempts"] != MAX_ATTEMPTS:
            violations["failed_not_after_max_attempts"].append(f"{key}: {j['attempts']}")
    faults = collections.Counter(r["fault"] for v in tiles.values() for r in v if r["fault"])
    return {"jobs": len(jobs), **{s: counts[s] for s in ("done", "skipped", "failed", "pending", "in_progress")},
            "tile_requests": sum(len(v) for v in tiles.values()), "tile_faults": sum(faults.values()),
            "overpass_queries": sum(len(v) for v in queries.values()),
            "overpass_faults": sum(1 for v in queries.values() for r in v if r["fault"]),
            "violations": {k: (len(v), v[:3]) for k, v in violations.items()},
            "violation_count": sum(len(v) for v in violations.values()), "check_s": check_s}


def _by_area(jobs):
    out = collections.defaultdict(list)
    for j in jobs:
        out[(j["az"], j["ax"], j["ay"])].append(j)
    return out


# -- report --------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coords", type=int, default=10_000, help="coordinates of the large run (x2 zooms = jobs)")
    parser.add_argument("--small", type=int, default=2_500, help="coordinates of the small run (0: skip it)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--fault-rate", type=float, default=0.05, help="share of faulted tile and Overpass answers")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--density", type=float, default=150.0, help="buildings per km2 of the fake world (mean)")
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds before the large run is stopped")
    args = parser.parse_args()

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        points = distinct_points(args.coords, args.seed)
        big, small = tmp / "points.csv", tmp / "points-small.csv"
        write_points(big, points)
        write_points(small, points[: args.small])
        print(f"starting the fakes, rendering the {len(ZOOMS) * len(points)} tiles ...", flush=True)
        fakes = Fakes(big, args.seed, args.fault_rate, args.density)
        print(f"fakes ready in {time.monotonic() - t0:.0f} s", flush=True)
        results = []
        try:
            for n in ([args.small] if args.small else []) + [args.coords]:
                csv = small if n == args.small and n != args.coords else big
                deadline = args.deadline if n == args.coords else args.deadline / 2
                print(f"soak: {n} coordinates x {len(ZOOMS)} zooms, {args.workers} workers ...", flush=True)
                results.append(soak(fakes, csv, n * len(ZOOMS), args.workers, deadline, tmp))
                r = results[-1]
                print(json.dumps({k: v for k, v in r.items()}, default=str), flush=True)
                for pid_log in sorted(tmp.glob(f"worker-{n * len(ZOOMS)}-*.log")):
                    tail = pid_log.read_text().strip().splitlines()[-3:]
                    if any(c != 0 for c in r["exit_codes"]) and tail:
                        print(f"  {pid_log.name}: " + " | ".join(tail))
        finally:
            fakes.close()
    print()
    print(f"{'jobs':>7} {'workers':>7} {'wall s':>7} {'samples/s':>9} {'done':>6} {'skipped':>7} {'failed':>6}"
          f" {'tile req':>8} {'faulted':>7} {'ovp q':>6} {'faulted':>7}  peak RSS per worker (MiB)  violations")
    for r in results:
        print(f"{r['jobs']:>7} {r['workers']:>7} {r['wall_s']:>7.0f} {r['samples_per_s']:>9.1f} {r['done']:>6}"
              f" {r['skipped']:>7} {r['failed']:>6} {r['tile_requests']:>8} {r['tile_faults']:>7}"
              f" {r['overpass_queries']:>6} {r['overpass_faults']:>7}  {', '.join(map(str, r['peak_rss_mib'])):<26}"
              f"{r['violation_count']}{' (stopped at the deadline)' if r['timed_out'] else ''}")
    for r in results:
        print(f"  {r['jobs']} jobs: RSS (MiB) of each worker at 10/50/90 % of its run: {r['rss_mib_at_10_50_90']}")
        for kind, (n, examples) in r["violations"].items():
            print(f"  {r['jobs']} jobs: {n} x {kind}, e.g. " + "; ".join(examples))
    if len(results) == 2:
        a, b = (max(r["peak_rss_mib"]) for r in results)
        print(f"peak RSS of the largest worker: {a} MiB at {results[0]['jobs']} jobs, {b} MiB at {results[1]['jobs']}"
              f" jobs ({(b - a) / a:+.1%})")
    print(f"total {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
