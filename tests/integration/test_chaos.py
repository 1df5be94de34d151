"""Chaos: whole harvests against the fake upstreams with every fault family injected (issue 4, "Fault injection").

Each test runs one small in-process harvest (a few to a few tens of coordinates x 2-3 zooms, a 2 s request timeout
with the fakes' "hang" at 3 s, a 0.02 s backoff base, HARVESTER_MAX_ATTEMPTS 3) and then checks, besides the
invariants of :func:`check_database`:

- job counts add up: done + skipped + failed == jobs == what ``harvest`` returned;
- nothing is stored from a bad response: every stored image is byte for byte the tile the fake renders (so no HTML
  page, blank, cut or corrupt body ever became a sample); every area holds exactly the footprints of the first
  Overpass answer a sound client accepts (a refused answer leaves nothing behind), the masks of areas whose answer was
  sound equal the world's own rendering, and an answer with missing members or bad geometry has its loss counted;
- every attempt is exactly one request for the job's tile (no hidden retry): a fault injected with probability 1.0
  ends every job ``failed`` after exactly HARVESTER_MAX_ATTEMPTS requests (``skipped`` after one for 404 and blank);
- the limits hold while retrying: request starts in any 1 s window at the server <= the rate, requests in flight <=
  the concurrency, for the tile server and for Overpass (queries and /api/status together); Retry-After and the
  Overpass pause after a 429 or 504 are honoured.

Crashes, restarts, bad settings and secrets are tested in tests/e2e/test_crashes.py and test_bad_input.py.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import asyncpg
import numpy as np
import pytest
import shapely

from harvester.config import load_settings
from harvester.http import Upstream
from harvester.labels.osm import building_query, parse_buildings
from harvester.labels.overpass import OverpassClient
from harvester.decode import decode_mask
from harvester.run import harvest
from harvester.worker import ATTEMPT_FAILED
from harvester.tiles import Tile, lonlat_bounds
from tests.databases import TempDatabase
from tests.fakes.faults import FAULTS, RequestRecord, max_in_window
from tests.fakes.overpass import _break_geometry, _drop_members
from tests.fakes.ql import element_json, evaluate, parse
from tests.fakes.servers import FakeUpstreams
from tests.fakes.world import World

from .harvest_checks import check_database

#: Measures time (rates, timeouts, windows): scripts/test.sh runs it alone, after the parallel part.
pytestmark = pytest.mark.timing

MAX_ATTEMPTS = 3
TIMEOUT_S = 2  # HARVESTER_REQUEST_TIMEOUT (its minimum)
HANG_S = 3.0  # the fakes' "hang": past the timeout
RETRY_AFTER_S = 1  # the fakes' Retry-After on "rate_limited"
TILE_RATE, TILE_CONCURRENCY = 50, 4
OVERPASS_RATE, OVERPASS_CONCURRENCY = 10, 2
OVERPASS_CAP = 1 << 20  # the client's body cap in these tests; the fakes' "oversize" answers 2 MiB
PAUSE_AFTER_429, PAUSE_AFTER_504 = 0.3, 0.3  # production: 30 s and 10 s
QUERY_MAXSIZE = 256 * 1024 * 1024  # OverpassClient's default [maxsize:]
EPS = 0.05  # seconds: scheduling slack between the fake's clock and the client's decisions

TILE_FAULTS = sorted(f for f, kinds in FAULTS.items() if "xyz" in kinds)
OVERPASS_FAULTS = sorted(f for f, kinds in FAULTS.items() if "overpass" in kinds)
#: Tile faults whose body is a valid image of the tile: the job is done with that very image.
HARMLESS_TILE_FAULTS = {"wrong_content_type"}
#: Tile faults that mean "no imagery here": the job is skipped after one request.
SKIP_TILE_FAULTS = {"missing", "blank"}
#: Overpass answers a sound client accepts (200, JSON, no runtime error): the degraded ones lose some objects.
ACCEPTED_OVERPASS = {None, "missing_members", "bad_geometry"}
DEGRADED_OVERPASS = {"missing_members", "bad_geometry"}


def grid(n: int, *, per_area: int = 1) -> list[tuple[float, float]]:
    """``n`` coordinates in Paris; every ``per_area`` consecutive ones share a zoom-17 area (other zoom-18 tiles)."""
    points = []
    for i in range(n):
        area, k = divmod(i, per_area)
        # zoom-17 tiles here are 0.00275 deg wide, 0.0018 deg high: areas 4 tiles apart, points of an area in its
        # four zoom-18 quadrants
        lon = 2.28 + 0.011 * (area % 8) + 0.0007 + 0.00137 * (k % 2)
        lat = 48.83 + 0.0075 * (area // 8) + 0.0004 + 0.0009 * (k // 2 % 2)
        points.append((round(lon, 7), round(lat, 7)))
    return points


# -- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    return World(seed=11)


@pytest.fixture(scope="module")
def fakes(world):
    overrides = {"overpass": {"slots": 16, "oversize_bytes": 2 << 20}}
    with FakeUpstreams(world, hang_s=HANG_S, retry_after_s=RETRY_AFTER_S, overrides=overrides) as up:
        yield up


@pytest.fixture
def up(fakes):
    fakes.restore()  # the constructor's knobs, no fault, empty logs, Overpass slots free
    return fakes


@pytest.fixture(scope="module")
def chaos_database(template_database):
    """One migrated database for the module, emptied before each test (cheaper than a database per test)."""
    with TempDatabase(prefix="tilesmith_chaos", template=template_database) as url:
        yield url


@pytest.fixture
def db(chaos_database):
    async def empty():
        conn = await asyncpg.connect(chaos_database)
        try:
            await conn.execute("TRUNCATE samples, jobs, buildings, areas, sample_points RESTART IDENTITY CASCADE")
        finally:
            await conn.close()

    asyncio.run(empty())
    return chaos_database


# -- one harvest and what it left ----------------------------------------------------------------------------------


@dataclass
class Run:
    settings: object
    final: dict
    states: dict
    elapsed: float
    jobs: list[dict]
    samples: dict[int, dict]
    areas: dict[int, dict]
    buildings: dict[int, list[dict]]
    requests: dict[str, list[RequestRecord]]
    query_of: dict[int, str] = field(default_factory=dict)  # area_id -> its Overpass query text
    warnings: list[str] = field(default_factory=list)  # the harvester's WARNING lines
    #: job_id -> the error of each failed attempt, in order (the worker's "attempt N failed" log lines)
    attempt_errors: dict[int, list[str]] = field(default_factory=dict)

    def overpass_timed_out(self, area: dict) -> bool:
        """The client gave up on a query of this area (its timeout): the fake may still have logged a 200 for it."""
        where = f"area {area['zoom']}/{area['tile_x']}/{area['tile_y']}:"
        return any(w.startswith(where) and "no complete answer within" in w for w in self.warnings)

    def tile_requests(self, kind: str) -> dict[str, list[RequestRecord]]:
        """Requests per "z/x/y" key (Google's createSession excluded), in arrival order."""
        out = collections.defaultdict(list)
        for r in self.requests[kind]:
            if r.key and r.key != "createSession":
                out[r.key].append(r)
        return out

    def queries(self) -> dict[int, list[RequestRecord]]:
        """Overpass interpreter requests per area, in arrival order."""
        area_of = {text: area_id for area_id, text in self.query_of.items()}
        out = collections.defaultdict(list)
        for r in self.requests["overpass"]:
            if r.path.endswith("/interpreter"):
                assert r.key in area_of, f"an Overpass query for no area of this run: {r.key!r}"
                out[area_of[r.key]].append(r)
        return out


def harvest_run(url: str, up: FakeUpstreams, tmp_path, points, *, provider: str = "xyz", zooms: str = "17,18",
                during=None, **env: str) -> Run:
    """Harvest ``points`` (zooms, provider) against the fakes; ``during(up)``, a coroutine, runs alongside."""
    csv = tmp_path / f"points-{uuid.uuid4().hex[:6]}.csv"
    csv.write_text("lon,lat\n" + "".join(f"{lon},{lat}\n" for lon, lat in points))
    settings = load_settings({
        **up.env(), "DATABASE_URL": url, "HARVESTER_POINTS": str(csv), "HARVESTER_ZOOMS": zooms,
        "HARVESTER_TILE_PROVIDER": provider, "HARVESTER_TILE_RATE": str(TILE_RATE),
        "HARVESTER_TILE_CONCURRENCY": str(TILE_CONCURRENCY), "HARVESTER_OVERPASS_RATE": str(OVERPASS_RATE),
        "HARVESTER_OVERPASS_CONCURRENCY": str(OVERPASS_CONCURRENCY), "HARVESTER_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "HARVESTER_REQUEST_TIMEOUT": str(TIMEOUT_S), "HARVESTER_BACKOFF_BASE": "0.02", **env})
    upstream = Upstream("overpass", rate=settings.overpass_rate, concurrency=settings.overpass_concurrency,
                        timeout=settings.request_timeout, max_bytes=OVERPASS_CAP)
    overpass = OverpassClient(upstream, settings.overpass_url, query_timeout=settings.overpass_query_timeout,
                              maxsize=QUERY_MAXSIZE, pause_after_429=PAUSE_AFTER_429,
                              pause_after_504=PAUSE_AFTER_504, max_status_wait=30)

    async def go():
        side = asyncio.create_task(during(up)) if during else None
        try:
            return await asyncio.wait_for(harvest(settings, overpass=overpass), 120)
        finally:
            if side is not None:
                side.cancel()

    warnings: list[str] = []
    attempt_errors: dict[int, list[str]] = collections.defaultdict(list)

    def emit(record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            warnings.append(record.getMessage())
        elif record.msg == ATTEMPT_FAILED:  # args: job_id, z, x, y, attempt, error
            attempt_errors[record.args[0]].append(str(record.args[-1]))

    handler = logging.Handler(logging.INFO)
    handler.emit = emit
    logger = logging.getLogger("harvester")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    start = time.monotonic()
    try:
        final = asyncio.run(go())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    elapsed = time.monotonic() - start
    states = asyncio.run(check_database(url, None, max_attempts=settings.max_attempts))
    run = Run(settings, final, states, elapsed, *asyncio.run(_contents(url)),
              requests={kind: up.requests(kind) for kind in ("xyz", "ign", "google", "overpass")})
    run.warnings = warnings
    run.attempt_errors = dict(attempt_errors)
    run.query_of = {a: building_query(lonlat_bounds(Tile(r["tile_x"], r["tile_y"], r["zoom"])),
                                      settings.overpass_query_timeout, QUERY_MAXSIZE) for a, r in run.areas.items()}
    return run


async def _contents(url: str):
    conn = await asyncpg.connect(url)
    try:
        jobs = [dict(r) for r in await conn.fetch("SELECT * FROM jobs ORDER BY job_id")]
        samples = {r["sample_id"]: dict(r) for r in await conn.fetch(
            "SELECT sample_id, image, image_format, mask, building_pixels, building_count FROM samples")}
        areas = {r["area_id"]: dict(r) for r in await conn.fetch(
            "SELECT area_id, zoom, tile_x, tile_y, fetched_at, building_count, dropped_count FROM areas")}
        buildings = collections.defaultdict(list)
        for r in await conn.fetch("SELECT area_id, osm_type, osm_id, ST_AsBinary(geom) AS wkb,"
                                  " ST_IsValid(geom) AS valid FROM buildings"):
            buildings[r["area_id"]].append(dict(r))
        return jobs, samples, areas, buildings
    finally:
        await conn.close()


def expected_buildings(world: World, query_text: str, fault: str | None):
    """What the harvester's parser makes of the fake's answer to this query with this fault (the answer replayed)."""
    elements = [json.loads(element_json(item)) for printed in evaluate(parse(query_text), world) for item in printed]
    if fault == "missing_members":
        elements = _drop_members(elements)
    elif fault == "bad_geometry":
        elements = _break_geometry(elements)
    return parse_buildings({"elements": elements})


# -- the checks every run passes -----------------------------------------------------------------------------------


def check_run(run: Run, up: FakeUpstreams, world: World, *, provider: str = "xyz") -> dict[str, int]:
    """Assert every chaos invariant of a finished run (see the module docstring); return the job counts."""
    totals = {s: run.final[s] for s in ("pending", "in_progress", "done", "skipped", "failed")}
    assert totals["pending"] == totals["in_progress"] == 0, totals
    assert totals["done"] + totals["skipped"] + totals["failed"] == len(run.jobs), (totals, len(run.jobs))
    assert {s: run.states.get(s, 0) for s in ("done", "skipped", "failed")} == \
        {s: totals[s] for s in ("done", "skipped", "failed")}
    assert len(run.samples) == totals["done"]

    tile_requests = run.tile_requests(provider)
    # Areas whose first Overpass answer was accepted: none of their attempts failed before the tile request.
    sound_areas = {a for a, q in run.queries().items() if len(q) == 1 and q[0].status == 200
                   and q[0].fault in ACCEPTED_OVERPASS}
    for job in run.jobs:
        key = f"{job['zoom']}/{job['tile_x']}/{job['tile_y']}"
        sent = tile_requests.get(key, [])
        errors = run.attempt_errors.get(job["job_id"], [])
        # Every attempt is one request for the tile, never two: a retry passes the limiter and counts an attempt.
        # An attempt that failed before its tile request sends none: at Overpass (an area not sound), or at Google's
        # createSession (whatever the fake's status: a "hang" or an HTML page also answer 200). An attempt that
        # timed out may have given up before its request reached the fake, on a loaded machine.
        before_request = sum("createSession" in e for e in errors)
        maybe_unsent = sum("no complete answer within" in e for e in errors if "createSession" not in e)
        what = (f"tile {key}: {len(sent)} requests {[r.fault or r.status for r in sent]} for {job['attempts']} "
                f"attempts (errors: {errors}; last error: {job['last_error']})")
        assert len(sent) <= job["attempts"] - before_request, what
        if job["area_id"] in sound_areas:
            assert len(sent) >= job["attempts"] - before_request - maybe_unsent, what
        assert job["last_error"] is None or not job["last_error"].startswith("internal error"), job["last_error"]
        if job["state"] == "done":
            sample = run.samples[job["job_id"]]
            assert sent and sent[-1].status == 200 and sent[-1].fault in {None} | HARMLESS_TILE_FAULTS, \
                f"tile {key} stored from a {sent[-1].fault if sent else 'missing'} answer"
            assert bytes(sample["image"]) == world.tile_bytes(job["zoom"], job["tile_x"], job["tile_y"]), \
                f"tile {key}: the stored image is not the tile the server rendered"
        elif job["state"] == "skipped":
            assert sent and sent[-1].fault in SKIP_TILE_FAULTS, \
                f"tile {key} skipped ({job['last_error']}) after a {sent[-1].fault if sent else 'missing'} answer"
        else:
            assert job["state"] == "failed" and job["attempts"] == run.settings.max_attempts, job
            assert job["last_error"], job

    _check_areas(run, world)
    _check_limits(run, up, provider)
    return {s: totals[s] for s in ("done", "skipped", "failed")}


def _check_areas(run: Run, world: World) -> None:
    """Each area holds exactly the footprints of its first accepted Overpass answer; sound answers match the world."""
    queries = run.queries()
    jobs_of = collections.defaultdict(list)
    for job in run.jobs:
        jobs_of[job["area_id"]].append(job)
    for area_id, area in run.areas.items():
        sent = queries.get(area_id, [])
        accepted = [r for r in sent if r.status == 200 and r.fault in ACCEPTED_OVERPASS]
        # Queries are sent only for claims, each of which counted an attempt of at least one job of the area.
        assert len(sent) <= sum(j["attempts"] for j in jobs_of[area_id]), (area_id, len(sent))
        if area["fetched_at"] is None:
            assert not accepted or run.overpass_timed_out(area), f"area {area_id}: a sound answer was not stored"
            assert not run.buildings.get(area_id)
            assert all(j["state"] == "failed" for j in jobs_of[area_id])
            continue
        assert accepted, f"area {area_id}: footprints stored without a sound answer ({[r.fault for r in sent]})"
        if run.overpass_timed_out(area):  # a loaded machine: the client may have given up on a sound answer
            accepted = accepted[-1:]
        assert sent[-1] is accepted[0], \
            f"area {area_id}: queried again after a sound answer: {[r.fault or r.status for r in sent]}"
        fault = accepted[0].fault
        expected = expected_buildings(world, run.query_of[area_id], fault)
        stored = run.buildings.get(area_id, [])
        assert all(b["valid"] for b in stored), f"area {area_id}: an invalid geometry was stored"
        assert sorted((b["osm_type"], b["osm_id"]) for b in stored) == \
            sorted((f.osm_type, f.osm_id) for f in expected.footprints), f"area {area_id} ({fault})"
        by_id = {(f.osm_type, f.osm_id): f.geometry for f in expected.footprints}
        for b in stored:
            assert shapely.equals(shapely.from_wkb(b["wkb"]), by_id[(b["osm_type"], b["osm_id"])])
        assert area["building_count"] == len(expected.footprints)
        assert area["dropped_count"] == sum(expected.dropped.values()), (area_id, fault, expected.dropped)
        if fault is None:
            for job in jobs_of[area_id]:
                sample = run.samples.get(job["job_id"])
                if sample is not None:
                    z, x, y = job["zoom"], job["tile_x"], job["tile_y"]
                    assert np.array_equal(decode_mask(sample["mask"]), world.expected_mask(z, x, y)), (z, x, y)
                    assert sample["building_count"] == world.building_count(z, x, y)


def _check_limits(run: Run, up: FakeUpstreams, provider: str) -> None:
    tiles = run.requests[provider]
    s = run.settings
    assert max_in_window([r.t for r in tiles]) <= s.tile_rate, \
        f"tile rate exceeded: {max_in_window([r.t for r in tiles])} starts in 1 s, limit {s.tile_rate:g}"
    assert up.max_concurrency(provider) <= s.tile_concurrency, \
        f"tile concurrency exceeded: {up.max_concurrency(provider)} > {s.tile_concurrency}"
    overpass = run.requests["overpass"]
    assert max_in_window([r.t for r in overpass]) <= s.overpass_rate, \
        f"Overpass rate exceeded: {max_in_window([r.t for r in overpass])} starts in 1 s, limit {s.overpass_rate:g}"
    assert up.max_concurrency("overpass") <= s.overpass_concurrency, "Overpass concurrency exceeded"
    # Retry-After: the next request for the same tile comes no sooner than it asked.
    for key, sent in run.tile_requests(provider).items():
        for before, after in itertools.pairwise(sent):
            if before.status == 429 and before.fault == "rate_limited":
                assert after.t - before.t >= RETRY_AFTER_S - EPS, f"tile {key}: Retry-After not honoured"
    # After a 429 (or 504) from Overpass, nothing is sent for the pause; requests already on the wire are excused.
    for r in overpass:
        pause = {429: max(PAUSE_AFTER_429, RETRY_AFTER_S if r.fault == "rate_limited" else 0), 504: PAUSE_AFTER_504}
        if r.status in pause and r.duration_s is not None:
            seen = r.t + r.duration_s
            early = [q for q in overpass if seen + EPS < q.t < seen + pause[r.status] - EPS]
            assert not early, (f"Overpass: {len(early)} request(s) sent {early[0].t - seen:.2f} s after a "
                               f"{r.status}, within the {pause[r.status]} s pause")


def _counts(run: Run) -> collections.Counter:
    return collections.Counter(j["state"] for j in run.jobs)


# -- tile faults, one at a time, on every request --------------------------------------------------------------------


@pytest.mark.parametrize("fault", TILE_FAULTS)
def test_tile_fault_on_every_request(db, up, world, tmp_path, fault):
    """Probability 1.0: a failing fault ends every job failed after exactly max_attempts requests for its tile; 404
    and blank skip it after one; an image with the wrong content type is still the right image (done)."""
    up.set_faults("xyz", {fault: 1.0})
    # a 429 pauses every tile request (Retry-After, at least 1 s): the attempts of all jobs queue behind each pause
    points = grid(2) if fault.startswith("rate_limited") else grid(6)
    # hang: each attempt waits out the 2 s timeout, so two attempts, all jobs at once
    slow = {"HARVESTER_MAX_ATTEMPTS": "2", "HARVESTER_TILE_CONCURRENCY": "12"} if fault == "hang" else {}
    run = harvest_run(db, up, tmp_path, points, **slow)
    counts = check_run(run, up, world)
    jobs, attempts = len(run.jobs), run.settings.max_attempts
    assert jobs == 2 * len(points)
    per_tile = collections.Counter(len(v) for v in run.tile_requests("xyz").values())
    if fault in HARMLESS_TILE_FAULTS:
        assert counts == {"done": jobs, "skipped": 0, "failed": 0}
        assert per_tile == {1: jobs}
    elif fault in SKIP_TILE_FAULTS:
        assert counts == {"done": 0, "skipped": jobs, "failed": 0}
        assert per_tile == {1: jobs}
        reason = "HTTP 404" if fault == "missing" else "blank tile"
        assert all(reason in j["last_error"] for j in run.jobs)
    else:
        assert counts == {"done": 0, "skipped": 0, "failed": jobs}, [j["last_error"] for j in run.jobs]
        assert per_tile == {attempts: jobs}
        assert len(run.requests["xyz"]) == attempts * jobs
    assert all(a["fetched_at"] is not None for a in run.areas.values())  # Overpass was sound
    if fault == "rate_limited":  # Retry-After: 1 s between the attempts of a tile, at least
        assert run.elapsed >= (attempts - 1) * RETRY_AFTER_S


@pytest.mark.slow
def test_tile_faults_mixed_at_meaningful_rates(db, up, world, tmp_path):
    """Every tile fault at 3 % of requests (45 % in all): done, skipped and failed jobs, all accounted for."""
    up.set_faults("xyz", {f: 0.03 for f in TILE_FAULTS})
    run = harvest_run(db, up, tmp_path, grid(40, per_area=2), zooms="17,18,19")
    counts = check_run(run, up, world)
    assert counts["done"] > 0 and counts["skipped"] > 0 and counts["failed"] > 0, counts
    seen = collections.Counter(r.fault for r in run.requests["xyz"])
    assert set(TILE_FAULTS) <= set(seen), sorted(set(TILE_FAULTS) - set(seen))


@pytest.mark.parametrize("provider", ["ign", "google"])
def test_tile_faults_mixed_on_ign_and_google(db, up, world, tmp_path, provider):
    """The same mix through IGN's WMTS (OWS exception reports) and Google (JSON errors, 403, expired sessions; the
    faults also hit createSession, so an attempt may end before its tile request)."""
    faults = {f: 0.03 for f in FAULTS if provider in FAULTS[f]}
    up.set_faults(provider, faults)
    run = harvest_run(db, up, tmp_path, grid(24), provider=provider)
    counts = check_run(run, up, world, provider=provider)
    assert counts["done"] > 0 and counts["failed"] + counts["skipped"] > 0, counts
    if provider == "google":
        sessions = [r for r in run.requests["google"] if r.key == "createSession"]
        assert 1 <= len(sessions)
        assert any(r.fault == "session_expired" for r in run.requests["google"])


# -- Google --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["forbidden", "session_expired"])
def test_google_403_and_expired_session_on_every_tile(db, up, world, tmp_path, fault):
    """A 403 or an expired session on every tile request (sessions themselves are granted): each job fails after
    exactly max_attempts tile requests, and each auth error drops the session so the next attempt opens a new one."""
    up.set_knobs("google", session_faults=False)
    up.set_faults("google", {fault: 1.0})
    run = harvest_run(db, up, tmp_path, grid(5), provider="google")
    counts = check_run(run, up, world, provider="google")
    assert counts == {"done": 0, "skipped": 0, "failed": len(run.jobs)}
    assert collections.Counter(len(v) for v in run.tile_requests("google").values()) == {MAX_ATTEMPTS: len(run.jobs)}
    sessions = [r for r in run.requests["google"] if r.key == "createSession"]
    auth_errors = [r for r in run.requests["google"] if r.status in (401, 403)]
    assert len(auth_errors) == MAX_ATTEMPTS * len(run.jobs)
    assert 2 <= len(sessions) <= len(auth_errors) + 1  # renewed after auth errors, never more than once per error


def test_google_session_answered_with_an_html_page(db, up, world, tmp_path):
    """createSession answers 200 with an HTML error page every time: each attempt fails on its session, before any
    tile request, asks for one session and no more, and the jobs end failed with the cause named."""
    up.set_faults("google", {"html_200": 1.0})
    run = harvest_run(db, up, tmp_path, grid(3), provider="google")
    counts = check_run(run, up, world, provider="google")  # counts each attempt's session failure against requests
    assert counts == {"done": 0, "skipped": 0, "failed": len(run.jobs)}
    assert not run.tile_requests("google")
    sessions = [r for r in run.requests["google"] if r.key == "createSession"]
    assert {r.status for r in sessions} == {200}
    assert len(sessions) == sum(j["attempts"] for j in run.jobs) == MAX_ATTEMPTS * len(run.jobs)
    assert all("createSession: unusable answer" in j["last_error"] for j in run.jobs), [j["last_error"] for j in run.jobs]


def test_google_sessions_expire_mid_run(db, up, world, tmp_path):
    """Every session expires once the harvest is under way: the jobs that met the expiry fail one attempt, a new
    session is opened, and every job ends done."""
    async def expire_after(up: FakeUpstreams) -> None:
        while sum(1 for r in up.requests("google") if r.key != "createSession") < 12:
            await asyncio.sleep(0.01)
        up.expire_google_sessions()

    run = harvest_run(db, up, tmp_path, grid(16), provider="google", during=expire_after)
    counts = check_run(run, up, world, provider="google")
    assert counts == {"done": len(run.jobs), "skipped": 0, "failed": 0}
    expired = [r for r in run.requests["google"] if r.status == 401]
    sessions = [r for r in run.requests["google"] if r.key == "createSession"]
    assert expired and len(sessions) >= 2
    assert len(sessions) <= 1 + len(expired)
    assert sum(j["attempts"] - 1 for j in run.jobs) == len(expired)  # each expiry cost one attempt, no more


# -- Overpass faults -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", OVERPASS_FAULTS)
def test_overpass_fault_on_every_query(db, up, world, tmp_path, fault):
    """Probability 1.0 on every query: the jobs of every area fail after exactly max_attempts attempts and nothing of
    a refused answer is stored; an answer with missing members or bad geometry is used, with its loss counted."""
    up.set_faults("overpass", {fault: 1.0})
    # hang: 2 s per attempt, so two attempts; rate_limited: the client pauses 1 s (Retry-After) after each 429
    slow = {"HARVESTER_MAX_ATTEMPTS": "2"} if fault == "hang" else {}
    run = harvest_run(db, up, tmp_path, grid({"hang": 2, "rate_limited": 1}.get(fault, 4)), **slow)
    counts = check_run(run, up, world)
    jobs, attempts = len(run.jobs), run.settings.max_attempts
    queries = run.queries()
    if fault in DEGRADED_OVERPASS:
        assert counts == {"done": jobs, "skipped": 0, "failed": 0}
        assert all(len(q) == 1 for q in queries.values())
        # The fake breaks what it can: relations (missing members) or every other building way (bad geometry).
        assert sum(a["dropped_count"] for a in run.areas.values()) > 0
        return
    assert counts == {"done": 0, "skipped": 0, "failed": jobs}, [j["last_error"] for j in run.jobs]
    assert all(a["fetched_at"] is None for a in run.areas.values()) and not run.buildings
    assert not run.requests["xyz"]  # no tile is fetched for an area without footprints
    for area_id, sent in queries.items():
        assert attempts <= len(sent) <= attempts * 2, (area_id, len(sent))
    if fault == "not_acceptable":
        assert all("User-Agent" in j["last_error"] for j in run.jobs)


def test_overpass_failure_costs_one_query_per_attempt_of_the_area(db, up, world, tmp_path):
    """The jobs of an area share its Overpass answer, so they share its failures too: with every query failing, an
    area of three zooms is asked exactly max_attempts times, not once per job and attempt."""
    up.set_faults("overpass", {"server_error": 1.0})
    # A backoff base of 0.2 s spreads the jobs' jittered retry times over 0.1-0.3 s: wider than the idle poll's slack,
    # so jobs retried one by one would be claimed (and ask Overpass) one by one.
    run = harvest_run(db, up, tmp_path, grid(4), zooms="17,18,19", HARVESTER_BACKOFF_BASE="0.2")
    check_run(run, up, world)
    assert all(j["state"] == "failed" for j in run.jobs)
    per_area = {a: len(q) for a, q in run.queries().items()}
    assert per_area == {a: MAX_ATTEMPTS for a in run.areas}, per_area


@pytest.mark.slow
def test_overpass_faults_mixed_at_meaningful_rates(db, up, world, tmp_path):
    """Every Overpass fault at 3 % of queries (54 % in all) with sound tiles."""
    up.set_faults("overpass", {f: 0.03 for f in OVERPASS_FAULTS})
    run = harvest_run(db, up, tmp_path, grid(30))
    counts = check_run(run, up, world)
    assert counts["done"] > 0 and counts["failed"] > 0, counts
    seen = collections.Counter(r.fault for r in run.requests["overpass"])
    assert len(set(OVERPASS_FAULTS) & set(seen)) >= len(OVERPASS_FAULTS) // 2, seen


def test_overpass_busy_status_is_waited_for(db, up, world, tmp_path):
    """/api/status says no slot is free for 2 s: the first query waits for it, none is refused, all jobs are done."""
    up.set_overpass_busy(2)
    start = time.monotonic()
    run = harvest_run(db, up, tmp_path, grid(6))
    counts = check_run(run, up, world)
    assert counts == {"done": len(run.jobs), "skipped": 0, "failed": 0}
    overpass = run.requests["overpass"]
    first_query = min(r.t for r in overpass if r.path.endswith("/interpreter"))
    assert first_query - start >= 1.5
    assert overpass[0].path.endswith("/status")
    assert not [r for r in overpass if r.status == 429]


def test_overpass_429_silences_every_query_for_the_pause(db, up, world, tmp_path):
    """After a 429 no Overpass request starts for the pause (30 s by default, shortened here), whatever was queued:
    the area slots waiting for the limiter when the 429 arrives wait too."""
    up.set_faults("overpass", {"rate_limited": 0.15, "rate_limited_no_retry_after": 0.15})
    run = harvest_run(db, up, tmp_path, grid(10), HARVESTER_OVERPASS_CONCURRENCY="1")
    check_run(run, up, world)  # _check_limits asserts the silence
    assert any(r.status == 429 for r in run.requests["overpass"])


# -- everything at once ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_fault_family_at_once(db, up, world, tmp_path):
    """All tile faults on Google (sessions expiring mid-run too) and all Overpass faults, 2 % each, three zooms."""
    up.set_faults("google", {f: 0.02 for f in FAULTS if "google" in FAULTS[f]})
    up.set_faults("overpass", {f: 0.02 for f in OVERPASS_FAULTS})

    async def expire_twice(up: FakeUpstreams) -> None:
        for n in (30, 90):
            while sum(1 for r in up.requests("google") if r.key != "createSession") < n:
                await asyncio.sleep(0.01)
            up.expire_google_sessions()

    run = harvest_run(db, up, tmp_path, grid(36, per_area=3), provider="google", zooms="17,18,19",
                      during=expire_twice, HARVESTER_MAX_ATTEMPTS="4")
    counts = check_run(run, up, world, provider="google")
    assert counts["done"] > len(run.jobs) // 2, counts
