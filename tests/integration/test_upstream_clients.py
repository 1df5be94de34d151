"""The Overpass client and the tile providers against the local fakes, including the upstreams' errors."""

from __future__ import annotations

import asyncio
import io
import time

import aiohttp
import pytest
from PIL import Image

from harvester.config import load_settings
from harvester.errors import OverpassError, TileUnavailable, UpstreamError
from harvester.http import Upstream
from harvester.imagery import validate_tile
from harvester.labels.overpass import OverpassClient
from harvester.providers import GoogleProvider, make_provider
from harvester.tiles import Tile, lonlat_bounds, tile_at
from tests.fakes.servers import FakeUpstreams
from tests.fakes.world import World

#: Measures time (rates, timeouts, windows): scripts/test.sh runs it alone, after the parallel part.
pytestmark = pytest.mark.timing

UA = "tilesmith-tests/0.1 (+https://github.com/tilesmith/tilesmith)"
AREA = tile_at(2.3488, 48.8534, 17)  # central Paris


@pytest.fixture(scope="module")
def world():
    return World(seed=3)


def _client(up: FakeUpstreams, **kwargs) -> OverpassClient:
    upstream = Upstream("overpass", rate=100, concurrency=1, timeout=5, max_bytes=kwargs.pop("max_bytes", 1 << 24))
    return OverpassClient(upstream, up.overpass_url, query_timeout=4, **kwargs)


async def _fetch(client: OverpassClient, user_agent: str | None = UA):
    headers = {"User-Agent": user_agent} if user_agent else {}
    async with aiohttp.ClientSession(headers=headers) as session:
        return await client.fetch_buildings(session, lonlat_bounds(AREA))


def test_buildings_match_the_world_and_status_is_read_first(world):
    with FakeUpstreams(world) as up:
        parsed = asyncio.run(_fetch(_client(up)))
        paths = [r.path for r in up.requests("overpass")]
    assert paths == ["/api/status", "/api/interpreter"]
    assert len(parsed.footprints) == len(world.footprints_in(*lonlat_bounds(AREA))) > 0


def test_429_pauses_at_least_the_configured_time_then_reads_status(world):
    with FakeUpstreams(world, faults={"overpass": {"rate_limited": 1.0}}) as up:
        async def scenario():
            client = _client(up, pause_after_429=1.5)
            with pytest.raises(UpstreamError) as err:
                await _fetch(client)
            assert err.value.status == 429 and err.value.retry_after >= 1.5
            up.set_faults("overpass", {})
            up.clear()
            start = time.monotonic()
            await _fetch(client)
            assert time.monotonic() - start >= 1.4

        asyncio.run(scenario())
        assert [r.path for r in up.requests("overpass")] == ["/api/status", "/api/interpreter"]


def test_default_pause_after_429_is_at_least_30_seconds(world):
    with FakeUpstreams(world, faults={"overpass": {"rate_limited_no_retry_after": 1.0}}) as up:
        with pytest.raises(UpstreamError) as err:
            asyncio.run(_fetch(_client(up)))
    assert err.value.retry_after >= 30


def test_status_without_free_slot_waits_for_it(world):
    with FakeUpstreams(world) as up:
        up.set_overpass_busy(2.0)
        start = time.monotonic()
        parsed = asyncio.run(_fetch(_client(up)))
        assert time.monotonic() - start >= 1.0
        assert parsed.footprints
        statuses = [r for r in up.requests("overpass") if r.path == "/api/status"]
        assert len(statuses) >= 2


@pytest.mark.parametrize("fault, error", [
    ("timeout_remark", OverpassError), ("memory_remark", OverpassError), ("malformed_json", OverpassError),
    ("html_200", OverpassError), ("wrong_content_type", OverpassError), ("gateway_timeout", UpstreamError),
    ("server_error", UpstreamError), ("truncated", UpstreamError), ("reset", UpstreamError),
    ("not_acceptable", UpstreamError)])
def test_bad_answers_are_failed_attempts(world, fault, error):
    with FakeUpstreams(world, faults={"overpass": {fault: 1.0}}) as up:
        with pytest.raises(error):
            asyncio.run(_fetch(_client(up, pause_after_504=0.1)))


def test_oversized_answer_is_refused(world):
    with FakeUpstreams(world, faults={"overpass": {"oversize": 1.0}}) as up:
        with pytest.raises(UpstreamError, match="cap"):
            asyncio.run(_fetch(_client(up, max_bytes=200_000)))


def test_missing_user_agent_is_refused_with_a_hint(world):
    with FakeUpstreams(world) as up:
        with pytest.raises(UpstreamError, match="HARVESTER_USER_AGENT"):
            asyncio.run(_fetch(_client(up), user_agent="Python/3.11 aiohttp/3.9.0"))


def test_hang_past_the_timeout_is_abandoned(world):
    with FakeUpstreams(world, hang_s=10, faults={"overpass": {"hang": 1.0}}) as up:
        start = time.monotonic()
        with pytest.raises(UpstreamError, match="within"):
            asyncio.run(_fetch(_client(up)))
        assert time.monotonic() - start < 9


def _settings(up: FakeUpstreams, provider: str):
    return load_settings({**up.env(), "HARVESTER_TILE_PROVIDER": provider, "HARVESTER_REQUEST_TIMEOUT": "5"})


async def _tile(provider, tile):
    async with aiohttp.ClientSession(headers={"User-Agent": UA}) as session:
        return await provider.fetch(session, tile)


def test_google_512_px_tiles_are_resized_to_256(world):
    with FakeUpstreams(world, tile_px=512) as up:
        body, ctype = asyncio.run(_tile(make_provider(_settings(up, "google")), AREA))
    with Image.open(io.BytesIO(body)) as img:
        assert img.size == (512, 512)
    valid = validate_tile(body, ctype)
    assert valid.rgb.shape == (256, 256, 3)


def test_google_session_is_renewed_after_expiry(world):
    with FakeUpstreams(world) as up:
        provider = make_provider(_settings(up, "google"))
        assert isinstance(provider, GoogleProvider)

        async def scenario():
            await _tile(provider, AREA)
            up.expire_google_sessions()
            with pytest.raises(UpstreamError):  # the expired session fails this attempt ...
                await _tile(provider, AREA)
            await _tile(provider, AREA)  # ... and the next one opens a new session

        asyncio.run(scenario())
        assert provider.sessions_created == 2
        assert "test-key" not in repr(provider)


def test_google_session_is_renewed_half_its_lifetime_before_expiry(world, monkeypatch):
    """Renewal at min(60 s, half the lifetime) before ``expiry``: a 30 s session serves tiles for 15 s, then is
    renewed, never before each tile (the provider's clock is moved; the fake's expiry is real time)."""
    clock = {"offset": 0.0}
    real_time = time.time
    monkeypatch.setattr("harvester.providers.time.time", lambda: real_time() + clock["offset"])
    with FakeUpstreams(world, session_lifetime_s=30) as up:
        provider = make_provider(_settings(up, "google"))

        async def scenario():
            for _ in range(3):  # all within the first half of the first session's life
                await _tile(provider, AREA)
            created_first = provider.sessions_created
            clock["offset"] = 13.0  # 29-30 s of life left (expiry is whole seconds): still the first session
            await _tile(provider, AREA)
            still_first = provider.sessions_created
            clock["offset"] = 16.0  # past the renewal point, 15 s before expiry
            await _tile(provider, AREA)
            return created_first, still_first, provider.sessions_created

        assert asyncio.run(scenario()) == (1, 1, 2)


def test_google_short_sessions_are_not_renewed_per_tile(world):
    """A 4 s session (about 3-4 s of it left after rounding) serves ~2 s of tiles: 60 tiles cost a handful of
    sessions, not 60, and every tile is served."""
    with FakeUpstreams(world, session_lifetime_s=4) as up:
        provider = make_provider(load_settings({**up.env(), "HARVESTER_TILE_PROVIDER": "google",
                                                "HARVESTER_TILE_RATE": "40"}))
        tiles = [Tile(AREA.x + i % 8, AREA.y + i // 8, AREA.z) for i in range(60)]

        async def scenario():
            started = time.monotonic()
            async with aiohttp.ClientSession(headers={"User-Agent": UA}) as session:
                for tile in tiles:
                    await provider.fetch(session, tile)
            return time.monotonic() - started

        elapsed = asyncio.run(scenario())
        assert 1 <= provider.sessions_created <= 1 + elapsed / 1.5
        assert provider.sessions_created < 10


def test_404_and_blank_tiles_are_unavailable(world):
    with FakeUpstreams(world, coverage=(0.0, 40.0, 1.0, 41.0)) as up:
        with pytest.raises(TileUnavailable):
            asyncio.run(_tile(make_provider(_settings(up, "xyz")), AREA))
    with FakeUpstreams(world, faults={"ign": {"blank": 1.0}}) as up:
        body, ctype = asyncio.run(_tile(make_provider(_settings(up, "ign")), AREA))
        with pytest.raises(TileUnavailable, match="blank"):
            validate_tile(body, ctype)
