"""The fake upstreams themselves: the world, the protocols, the faults (no network beyond 127.0.0.1)."""

from __future__ import annotations

import asyncio
import io
import json
import re

import aiohttp
import numpy as np
import pytest
from PIL import Image

from tests.fakes.faults import max_in_window, proper_user_agent
from tests.fakes.osm import tile_bounds
from tests.fakes.process import start_fakes_process
from tests.fakes.render import roof_labels
from tests.fakes.servers import FakeUpstreams
from tests.fakes.world import World, tile_for

UA = {"User-Agent": "tilesmith-tests/0.1 (+https://github.com/tilesmith/tilesmith; tests@example.org)"}
LON, LAT = 2.2945, 48.8584  # tests sample in France
Z17 = tile_for(LON, LAT, 17)
BBOX17 = tile_bounds(17, *Z17)
QUERY = (
    '[out:json][timeout:25][maxsize:{maxsize}];\n(way["building"]["building"!="no"]({b});\n'
    ' relation["type"="multipolygon"]["building"]["building"!="no"]({b}););\nout geom;'
)
WMTS = {
    "SERVICE": "WMTS",
    "REQUEST": "GetTile",
    "VERSION": "1.0.0",
    "LAYER": "ORTHOIMAGERY.ORTHOPHOTOS",
    "STYLE": "normal",
    "TILEMATRIXSET": "PM",
    "FORMAT": "image/jpeg",
}


def overpass_query(bounds=BBOX17, maxsize=100_000_000) -> str:
    west, south, east, north = bounds
    return QUERY.format(b=f"{south},{west},{north},{east}", maxsize=maxsize)


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=7, empty_fraction=0.0, buildings_per_km2=900)


@pytest.fixture(scope="module")
def upstreams(world):
    with FakeUpstreams(world, seed=1) as up:
        yield up


@pytest.fixture
def up(upstreams):
    upstreams.restore()
    yield upstreams
    upstreams.restore()


async def fetch(method: str, url: str, headers=UA, timeout: float = 10, **kwargs):
    """(status, headers, body) of one request."""
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.request(method, url, **kwargs) as response:
            return response.status, response.headers, await response.read()


# -- the world --


def test_world_is_deterministic_and_holds_every_shape(world):
    box = (LON - 0.01, LAT - 0.01, LON + 0.01, LAT + 0.01)
    objects = world.buildings_in(*box)
    again = World(seed=7, empty_fraction=0.0, buildings_per_km2=900).buildings_in(*box)
    assert [(o.type, o.id, o.polygons) for o in objects] == [(o.type, o.id, o.polygons) for o in again]
    relations = [o for o in objects if o.type == "relation"]
    assert any(any(m.role == "inner" for m in o.members) for o in relations)
    assert any(sum(m.role == "outer" for m in o.members) >= 2 for o in relations)  # a ring split over ways
    assert any(o.tags.get("building") == "no" for o in objects)
    assert any("building:part" in o.tags and "building" not in o.tags for o in objects)
    assert all(o.shape().is_valid for o in objects if o.is_footprint)
    assert len(world.footprints_in(*box)) == sum(o.is_footprint for o in objects)


@pytest.mark.parametrize("z, size", [(17, 256), (18, 256), (19, 512)])
def test_roofs_are_exactly_the_expected_mask(world, z, size):
    x, y = tile_for(LON, LAT, z)
    for dx in range(3):
        labels = roof_labels(z, x + dx, y, size, world.candidates(tile_bounds(z, x + dx, y)))
        mask = world.expected_mask(z, x + dx, y, size)
        assert np.array_equal(labels > 0 if labels is not None else np.zeros_like(mask, bool), mask > 0)
    rgb = world.render_tile(z, x, y, size)
    assert rgb.shape == (size, size, 3) and rgb.dtype == np.uint8


def test_some_building_crosses_a_tile_edge_and_comes_whole_from_both_sides(world):
    x, y = tile_for(LON, LAT, 18)
    left, right = tile_bounds(18, x, y), tile_bounds(18, x + 1, y)
    shared = {o.id: o for o in world.buildings_in(*left)}.keys() & {o.id for o in world.buildings_in(*right)}
    for dy in range(1, 6):  # look a few rows further if this edge happens to be crossed by nothing
        if shared:
            break
        left, right = tile_bounds(18, x, y + dy), tile_bounds(18, x + 1, y + dy)
        shared = {o.id for o in world.buildings_in(*left)} & {o.id for o in world.buildings_in(*right)}
    assert shared


def test_from_geojson_serves_the_given_polygons(tmp_path):
    square = [[32.58, 0.34], [32.5801, 0.34], [32.5801, 0.3401], [32.58, 0.3401], [32.58, 0.34]]
    hole = [[32.58003, 0.34003], [32.58006, 0.34003], [32.58006, 0.34006], [32.58003, 0.34006], [32.58003, 0.34003]]
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}, "properties": {"osm_id": 42}},
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[c[0] + 0.001, c[1]] for c in square], hole]},
            "properties": {"osm_id": None},
        },
    ]
    path = tmp_path / "labels.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    world = World.from_geojson(path)
    objects = world.buildings_in(32.579, 0.339, 32.582, 0.342)
    assert [(o.type, o.id) for o in objects][0] == ("way", 42)
    assert objects[1].type == "relation" and [m.role for m in objects[1].members] == ["outer", "inner"]
    x, y = tile_for(32.58005, 0.34005, 19)
    assert world.expected_mask(19, x, y).sum() > 0


def test_kampala_labels_render_on_their_tiles(shared_data):
    world = World.from_geojson(shared_data / "kampala-oam" / "labels.geojson")
    tiles = sorted(shared_data.glob("kampala-oam/OAM-*-21.png"))[:4]
    assert tiles
    for path in tiles:
        x, y, z = (int(v) for v in path.stem.split("-")[1:])
        labels = roof_labels(z, x, y, 256, world.candidates(tile_bounds(z, x, y)))
        mask = world.expected_mask(z, x, y)
        assert np.array_equal(labels > 0 if labels is not None else np.zeros_like(mask, bool), mask > 0)
    assert sum(world.building_count(z, x, y) for x, y, z in [(int(v) for v in p.stem.split("-")[1:]) for p in tiles])


# -- protocols --


async def test_xyz_and_ign_serve_the_same_jpeg_and_ign_errors_are_exception_reports(up):
    x, y = tile_for(LON, LAT, 18)
    status, headers, body = await fetch("GET", up.xyz_url.format(z=18, x=x, y=y))
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(body)).size == (256, 256)
    params = {**{k.lower(): v for k, v in WMTS.items()}, "TileMatrix": "18", "TILEROW": str(y), "tilecol": str(x)}
    status, headers, same = await fetch("GET", up.ign_url, params=params)
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and same == body
    status, _, xml = await fetch("GET", up.ign_url, params={**params, "layer": "ORTHOIMAGERY.ORTHOPHOTOS.BDORTHO"})
    assert status == 400 and b'exceptionCode="InvalidParameterValue" locator="LAYER"' in xml
    status, _, xml = await fetch("GET", up.ign_url, params={k: v for k, v in params.items() if k != "TILEROW"})
    assert status == 400 and b"MissingParameterValue" in xml
    status, _, xml = await fetch("GET", up.ign_url, params={**params, "TILEROW": str(1 << 18)})
    assert status == 400 and b"TileOutOfRange" in xml
    up.set_knobs("ign", blank_zones=(tile_bounds(18, x, y),))
    status, _, body = await fetch("GET", up.ign_url, params=params)
    assert status == 200 and np.asarray(Image.open(io.BytesIO(body))).min() >= 250
    assert up.prewarm([(LON, LAT)], zooms=(17, 18)) == 2
    up.set_knobs(coverage=(-5.0, 41.0, 2.0, 45.0))
    assert (await fetch("GET", up.xyz_url.format(z=18, x=x, y=y)))[0] == 404


async def test_google_sessions_keys_and_expiry(up):
    base, key = up.google_url, up.google_key
    request = {"mapType": "satellite", "language": "en-US", "region": "FR"}
    status, _, body = await fetch("POST", f"{base}/v1/createSession", params={"key": key}, json=request)
    session = json.loads(body)
    assert (
        status == 200
        and session["tileWidth"] == 256
        and int(session["expiry"]) > 0
        and session["imageFormat"] == "jpeg"
    )
    x, y = tile_for(LON, LAT, 18)
    tile = f"{base}/v1/2dtiles/18/{x}/{y}"
    assert (await fetch("GET", tile, params={"session": session["session"], "key": key}))[0] == 200
    status, _, body = await fetch("GET", tile, params={"session": session["session"], "key": "wrong"})
    assert status == 403 and json.loads(body)["error"]["status"] == "PERMISSION_DENIED"
    status, _, body = await fetch("GET", tile, params={"session": "nope", "key": key})
    assert status == 400 and json.loads(body)["error"]["status"] == "INVALID_ARGUMENT"
    status, _, body = await fetch(
        "POST", f"{base}/v1/createSession", params={"key": key}, json={**request, "highDpi": True}
    )
    hidpi = json.loads(body)
    _, _, image = await fetch("GET", tile, params={"session": hidpi["session"], "key": key})
    assert hidpi["tileWidth"] == 512 and Image.open(io.BytesIO(image)).size == (512, 512)
    up.expire_google_sessions()
    status, _, body = await fetch("GET", tile, params={"session": session["session"], "key": key})
    assert status == 401 and json.loads(body)["error"]["status"] == "UNAUTHENTICATED"


async def test_overpass_answers_filtered_whole_geometries(up, world):
    status, headers, body = await fetch("POST", up.overpass_url, data={"data": overpass_query()})
    answer = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert answer["version"] == 0.6 and "osm3s" in answer and "remark" not in answer
    expected = [(o.type, o.id) for o in world.buildings_in(*BBOX17) if o.is_footprint]
    assert [(e["type"], e["id"]) for e in answer["elements"]] == expected
    for element in answer["elements"]:
        obj = next(o for o in world.buildings_in(*BBOX17) if o.id == element["id"] and o.type == element["type"])
        if element["type"] == "way":
            assert [(p["lon"], p["lat"]) for p in element["geometry"]] == list(obj.members[0].way.coords)
            assert element["nodes"][0] == element["nodes"][-1] and element["tags"]["building"] != "no"
        else:
            assert [m["ref"] for m in element["members"]] == [m.way.id for m in obj.members]
            assert all(len(m["geometry"]) >= 2 for m in element["members"])
    west, south, east, north = BBOX17  # a building crossing the bbox edge comes whole
    assert any(
        any(not (west <= p["lon"] <= east and south <= p["lat"] <= north) for p in e.get("geometry", []))
        for e in answer["elements"]
    )
    status, _, _ = await fetch("GET", up.overpass_url, params={"data": overpass_query()})
    assert status == 200
    status, _, page = await fetch("POST", up.overpass_url, data={"data": "[out:json];wat[building];out geom;"})
    assert status == 400 and b"parse error" in page


async def test_overpass_tolerates_layout_and_applies_filters_honestly(up, world):
    south, west, north, east = BBOX17[1], BBOX17[0], BBOX17[3], BBOX17[2]
    loose = (
        f"/* buildings */ [timeout:25]\n  [out:json] ;\n( // ways first\n  way [building] [ 'building' != 'no' ]"
        f" ( {south} , {west} , {north} , {east} ) ;\n  rel[type=multipolygon][building][building!=no]"
        f"({south},{west},{north},{east});\n) ;\nout body geom ;"
    )
    _, _, strict = await fetch("POST", up.overpass_url, data={"data": overpass_query()})
    _, _, relaxed = await fetch("POST", up.overpass_url, data={"data": loose})
    assert json.loads(strict)["elements"] == json.loads(relaxed)["elements"]
    unfiltered = overpass_query().replace('["building"!="no"]', "")
    _, _, body = await fetch("POST", up.overpass_url, data={"data": unfiltered})
    assert any(e.get("tags", {}).get("building") == "no" for e in json.loads(body)["elements"])
    _, _, body = await fetch("POST", up.overpass_url, data={"data": overpass_query().replace("out geom;", "out;")})
    assert b"out geom" in body


async def test_overpass_user_agent_slots_and_status_page(up):
    for headers in ({}, {"User-Agent": f"Python/3.11 aiohttp/{aiohttp.__version__}"}):
        async with aiohttp.ClientSession(headers=headers, skip_auto_headers=["User-Agent"] if not headers else ()) as s:
            async with s.post(up.overpass_url, data={"data": overpass_query()}) as response:
                assert response.status == 406
    assert not proper_user_agent(None) and proper_user_agent(UA["User-Agent"])
    _, headers, text = await fetch("GET", up.overpass_url.replace("interpreter", "status"))
    assert re.fullmatch(
        r"Connected as: \d+\nCurrent time: \S+Z\nAnnounced endpoint: none\nRate limit: 2\n"
        r"2 slots available now\.\nCurrently running queries \(pid, space limit, time limit, start time\):\n",
        text.decode(),
    )
    up.set_overpass_busy(5)
    _, _, text = await fetch("GET", up.overpass_status_url)
    assert re.search(r"Slot available after: \S+Z, in [45] seconds\.", text.decode())
    status, _, page = await fetch("POST", up.overpass_url, data={"data": overpass_query()})
    assert status == 429 and b"rate_limited" in page
    up.restore()
    up.set_knobs("overpass", query_s=0.3, slots=1)
    statuses = await asyncio.gather(
        *(fetch("POST", up.overpass_url, data={"data": overpass_query()}) for _ in range(3))
    )
    assert sorted(s for s, _, _ in statuses) == [200, 429, 429]
    assert up.max_concurrency("overpass") >= 2


# -- faults --


@pytest.mark.parametrize(
    "fault, status, check",
    [
        ("rate_limited", 429, lambda h, b: h["Retry-After"] == "1"),
        ("rate_limited_no_retry_after", 429, lambda h, b: "Retry-After" not in h),
        ("server_error", 500, None),
        ("bad_gateway", 502, None),
        ("unavailable", 503, None),
        ("gateway_timeout", 504, None),
        ("missing", 404, None),
        ("html_200", 200, lambda h, b: h["Content-Type"].startswith("text/html")),
        ("wrong_content_type", 200, lambda h, b: h["Content-Type"].startswith("text/plain")),
        ("blank", 200, lambda h, b: np.ptp(np.asarray(Image.open(io.BytesIO(b)))) < 8),
        ("corrupt_image", 200, lambda h, b: b[:2] == b"\xff\xd8" and _undecodable(b)),
        ("cut_image", 200, lambda h, b: _undecodable(b)),
    ],
)
async def test_tile_faults_do_what_they_say(up, fault, status, check):
    up.set_faults("xyz", {fault: 1.0})
    x, y = tile_for(LON, LAT, 18)
    got, headers, body = await fetch("GET", up.xyz_url.format(z=18, x=x, y=y))
    assert got == status and (check is None or check(headers, body))
    assert up.requests("xyz")[-1].fault == fault and up.requests("xyz")[-1].status == status


def _undecodable(body: bytes) -> bool:
    try:
        Image.open(io.BytesIO(body)).load()
    except (OSError, SyntaxError, ValueError):
        return True
    return False


async def test_connection_faults(up):
    url = up.xyz_url.format(z=18, x=Z17[0] * 2, y=Z17[1] * 2)
    up.set_faults("xyz", {"reset": 1.0})
    with pytest.raises(aiohttp.ClientConnectionError):
        await fetch("GET", url)
    assert up.requests("xyz")[-1].reset
    up.set_faults("xyz", {"truncated": 1.0})
    with pytest.raises(aiohttp.ClientPayloadError):
        await fetch("GET", url)
    up.set_faults("xyz", {"hang": 1.0})
    up.set_knobs("xyz", hang_s=1.0)
    with pytest.raises(asyncio.TimeoutError):
        await fetch("GET", url, timeout=0.2)


@pytest.mark.parametrize(
    "fault",
    [
        "timeout_remark",
        "memory_remark",
        "malformed_json",
        "missing_members",
        "bad_geometry",
        "oversize",
        "wrong_content_type",
    ],
)
async def test_overpass_faults(up, fault):
    up.set_faults("overpass", {fault: 1.0})
    up.set_knobs("overpass", oversize_bytes=300_000)
    status, headers, body = await fetch("POST", up.overpass_url, data={"data": overpass_query()})
    assert status == 200
    if fault == "malformed_json":
        with pytest.raises(ValueError):
            json.loads(body)
        return
    if fault == "wrong_content_type":
        assert headers["Content-Type"].startswith("application/osm3s+xml") and body.startswith(b"<?xml")
        return
    answer = json.loads(body)
    elements = answer["elements"]
    if fault in ("timeout_remark", "memory_remark"):
        assert answer["remark"].startswith("runtime error: Query") and ("timed out" in answer["remark"]) == (
            fault == "timeout_remark"
        )
    elif fault == "missing_members":
        assert all(any("geometry" not in m for m in e["members"]) for e in elements if e["type"] == "relation")
    elif fault == "bad_geometry":
        ways = [e for e in elements if e["type"] == "way"]
        assert any(w["geometry"][0] != w["geometry"][-1] for w in ways)  # unclosed
    elif fault == "oversize":
        assert len(body) >= 300_000 and elements


async def test_overpass_maxsize_gives_a_memory_remark(up):
    _, _, body = await fetch("POST", up.overpass_url, data={"data": overpass_query(maxsize=1000)})
    answer = json.loads(body)
    assert answer["elements"] == [] and "out of memory" in answer["remark"]


async def test_faults_are_deterministic_and_drawn_anew_per_retry(up):
    up.set_faults("xyz", {"unavailable": 0.5})
    x, y = tile_for(LON, LAT, 18)
    urls = [up.xyz_url.format(z=18, x=x + i, y=y) for i in range(12)] * 2
    first = [(await fetch("GET", url))[0] for url in urls]
    up.restore()
    up.set_faults("xyz", {"unavailable": 0.5})
    second = [(await fetch("GET", url))[0] for url in urls]
    assert first == second and {200, 503} <= set(first) and first[:12] != first[12:]
    with pytest.raises(ValueError):
        up.set_faults("xyz", {"timeout_remark": 0.1})


def test_max_in_window():
    assert max_in_window([]) == 0
    assert max_in_window([0.0, 0.5, 0.99, 1.0, 1.5, 1.6]) == 4
    assert max_in_window([0, 2, 4], window=1.0) == 1


def test_standalone_process_prints_urls_and_serves(tmp_path):
    process, env = start_fakes_process("--latency", "0", "--fault", "xyz:unavailable=1")
    try:
        assert env["HARVESTER_OVERPASS_URL"].endswith("/api/interpreter")
        status, _, _ = asyncio.run(fetch("GET", env["HARVESTER_TILE_URL"].format(z=18, x=1, y=1)))
        assert status == 503
        stats = json.loads(asyncio.run(fetch("GET", env["FAKES_STATS_URL"]))[2])
        assert stats["xyz"]["by_fault"] == {"unavailable": 1}
        control = env["FAKES_STATS_URL"].replace("/stats", "/faults")
        assert asyncio.run(fetch("POST", control, json={"xyz": {}}))[0] == 200
        assert asyncio.run(fetch("GET", env["HARVESTER_TILE_URL"].format(z=18, x=1, y=1)))[0] == 200
    finally:
        process.terminate()
        assert process.wait(10) == 0
