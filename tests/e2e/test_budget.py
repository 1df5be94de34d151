"""One politeness budget for every ``harvester run`` on a database (SPEC, "Limits are per upstream and hold for the
whole harvest"), end to end: four real processes against the fakes (100 ms latency) and a real PostgreSQL.

Every window is bounded from the fakes' arrival log (and the database's clock where a lease is concerned), never from
the test's own sleeps. Each process sends its own User-Agent, so the log says which process sent what.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from harvester.tiles import area_tile, lonlat_bounds
from tests.databases import fetch
from tests.e2e.test_crashes import Harvester, harvester_env, other_sessions, wait_until, write_points
from tests.fakes.faults import max_in_window
from tests.fakes.servers import FakeUpstreams
from tests.fakes.world import World

# scripts/test.sh runs the timing tests on 2 processes: this group (many harvester processes each) on one of
# them, never two at once
pytestmark = [pytest.mark.slow, pytest.mark.timing, pytest.mark.xdist_group("harvester_processes")]

TILE_RATE = 10
OVERPASS_CONCURRENCY = 2


def agent(i: int) -> str:
    return f"tilesmith-budget-test/p{i} (+https://github.com/tilesmith/tilesmith)"


def process(record) -> int:
    return int(record.user_agent.split("/p")[1].split(" ")[0])


def budget_env(up: FakeUpstreams, url: str, tmp_path, **overrides: str) -> dict[str, str]:
    settings = {"HARVESTER_TILE_RATE": str(TILE_RATE), "HARVESTER_TILE_CONCURRENCY": "4",
                "HARVESTER_OVERPASS_RATE": "20", "HARVESTER_OVERPASS_CONCURRENCY": str(OVERPASS_CONCURRENCY),
                "HARVESTER_LEASE_SECONDS": "30"}
    return harvester_env(up, url, tmp_path / "points.csv", **{**settings, **overrides})


def warm(up: FakeUpstreams, points) -> None:
    """Render the tiles and generate the OSM world of the run beforehand: the fakes share the test process, and their
    CPU work during the run would delay the arrival stamps of the very requests the test counts."""
    up.prewarm(points)
    for lon, lat in points:
        west, south, east, north = lonlat_bounds(area_tile(lon, lat, (17, 18)))
        up.world.candidates((west - 1e-6, south - 1e-6, east + 1e-6, north + 1e-6))  # the query's box, rounded out


def start(env: dict[str, str], tmp_path, i: int, name: str) -> Harvester:
    """``harvester run`` as process ``i`` (its own User-Agent)."""
    return Harvester({**env, "HARVESTER_USER_AGENT": agent(i)}, tmp_path, name=name)


def run_four(env: dict[str, str], tmp_path, tag: str) -> list[Harvester]:
    return [start(env, tmp_path, i, f"{tag}{i}") for i in range(4)]


def finish(runs: list[Harvester]) -> None:
    for run in runs:
        assert run.wait(120) == 0, run.stderr[-3000:]
        assert "Traceback" not in run.stderr, run.stderr[-3000:]


def test_four_processes_share_one_tile_rate_and_one_overpass_concurrency(migrated_database_url, tmp_path):
    """The busiest one-second window of tile requests at the fake holds at most HARVESTER_TILE_RATE (four processes
    with their own limiters sent up to four times that), the mean over the harvest is at least 0.9 of it, and
    Overpass never has more than HARVESTER_OVERPASS_CONCURRENCY queries in flight."""
    # 80 points, ~16 s of tiles: one stall of the shared 2-core machine weighs half what it did over 40 (the mean
    # once came out at 0.8997 of the limit there)
    points = write_points(tmp_path / "points.csv", 80, seed=31)
    with FakeUpstreams(World(seed=31), latency_s=0.1, overrides={"overpass": {"slots": 8}}) as up:
        warm(up, points)
        runs = run_four(budget_env(up, migrated_database_url, tmp_path), tmp_path, "shared")
        finish(runs)
        tiles = up.requests("xyz")
        overpass = up.requests("overpass")
        overpass_in_flight = up.max_concurrency("overpass")
    starts = sorted(r.t for r in tiles)
    peak = max_in_window(starts, 1.0)
    use = (len(starts) - 1) / (starts[-1] - starts[0]) / TILE_RATE
    print(f"\nfour processes: {len(starts)} tile requests, busiest 1 s window {peak} (limit {TILE_RATE}), "
          f"mean {use:.3f} of the limit; Overpass in flight at most {overpass_in_flight}")
    assert len(starts) == len({r.path for r in tiles}) >= 70  # every tile once
    assert {process(r) for r in tiles} == {0, 1, 2, 3}  # all four took part
    assert peak <= TILE_RATE
    assert use >= 0.9
    assert {process(r) for r in overpass} == {0, 1, 2, 3}
    assert overpass_in_flight <= OVERPASS_CONCURRENCY
    assert max_in_window([r.t for r in overpass], 1.0) <= 20


def test_one_429_pauses_all_four_processes(migrated_database_url, tmp_path):
    """One tile request answered 429 with ``Retry-After: 2``: from the moment that answer left the fake (plus the
    time to tell the others: the answer's trip, one statement, one notification), no request of any process arrives
    until the pause is over; then all four carry on."""
    retry_after, slack = 2, 0.5
    # 80 points, ~16 s of tiles at the shared rate: the 429 waits for the last process to start (up to 6 s under
    # load), and with 40 points so little work was left after the pause that one process got none of it
    points = write_points(tmp_path / "points.csv", 80, seed=32)
    with FakeUpstreams(World(seed=32), latency_s=0.1, retry_after_s=retry_after) as up:
        warm(up, points)
        runs = run_four(budget_env(up, migrated_database_url, tmp_path), tmp_path, "paused")

        def one_429():  # as soon as every process has sent tiles, answer 429 until the fake has sent one
            while len({process(r) for r in up.requests("xyz")}) < 4:
                time.sleep(0.01)
            up.set_faults("xyz", {"rate_limited": 1.0})
            while not any(r.status == 429 for r in up.requests("xyz")):
                time.sleep(0.001)
            up.set_faults("xyz", {})

        trigger = threading.Thread(target=one_429, daemon=True)
        trigger.start()
        finish(runs)
        trigger.join(5)
        tiles = up.requests("xyz")
    limited = [r for r in tiles if r.status == 429]
    assert limited, "no 429 was sent"
    answered = min(r.t + r.duration_s for r in limited)
    pause_end = answered + retry_after  # the pause began after the answer arrived: it ends later than this
    during = [r for r in tiles if answered + slack <= r.t < pause_end]
    after = {process(r) for r in tiles if r.t >= pause_end}
    print(f"\n429 answered at +{answered - tiles[0].t:.2f} s: {len(limited)} request(s) limited, "
          f"{sum(1 for r in tiles if answered <= r.t < answered + slack)} arrived within {slack} s of the answer, "
          f"{len(during)} during the rest of the pause")
    assert not during, [(round(r.t - answered, 3), process(r)) for r in during]
    assert {process(r) for r in tiles if r.t < answered} == {0, 1, 2, 3}
    assert after == {0, 1, 2, 3}


def test_kill_9_of_a_process_holding_the_overpass_slot_frees_it_within_the_lease(migrated_database_url, tmp_path):
    """A process is killed while its Overpass query is in flight (HARVESTER_OVERPASS_CONCURRENCY=1): no other
    process sends Overpass a request until the slot's lease ends (request timeout + 3 s after its start), then
    another takes the slot and the harvest completes."""
    url = migrated_database_url
    write_points(tmp_path / "points.csv", 6, seed=33)
    with FakeUpstreams(World(seed=33), latency_s=0.1, overrides={"overpass": {"latency_s": 30.0}}) as up:
        env = budget_env(up, url, tmp_path, HARVESTER_OVERPASS_CONCURRENCY="1", HARVESTER_REQUEST_TIMEOUT="3",
                         HARVESTER_LEASE_SECONDS="3")
        doomed = start(env, tmp_path, 0, "doomed")
        assert wait_until(lambda: up.requests("overpass"), 60, doomed), doomed.stderr[-3000:]
        os.kill(doomed.pid, signal.SIGKILL)
        assert doomed.proc.wait(10) == -signal.SIGKILL
        assert wait_until(lambda: not other_sessions(url), 10), other_sessions(url)
        held = fetch(url, "SELECT holder, extract(epoch FROM expires_at - clock_timestamp())::float8 AS left"
                          " FROM upstream_slots WHERE upstream LIKE 'overpass:%' AND expires_at > clock_timestamp()")
        asked = time.monotonic()
        assert len(held) == 1 and f":{doomed.pid}:" in held[0]["holder"], held
        lease_end = asked + held[0]["left"]
        up.set_knobs("overpass", latency_s=0.1)
        survivor = start(env, tmp_path, 1, "survivor")
        assert survivor.wait(120) == 0, survivor.stderr[-3000:]
        second = [r for r in up.requests("overpass") if process(r) == 1]
    print(f"\nkill -9: the slot's lease had {held[0]['left']:.2f} s left; the survivor's first Overpass request came"
          f" {second[0].t - lease_end:+.2f} s after it ended")
    assert second and second[0].t >= lease_end - 0.05  # the query round trip that measured the lease
