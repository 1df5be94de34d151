"""Imagery providers behind one small interface: ``await provider.fetch(session, tile) -> (body, content_type)``.

- ``ign``: IGN Geoplateforme WMTS, KVP GetTile, layer ORTHOIMAGERY.ORTHOPHOTOS, TILEMATRIXSET=PM (OGC 07-057r7,
  section 7.2.2 GetTile KVP). Open licence Etalab 2.0, no key.
- ``google``: Google Map Tiles API, 2D tiles (developers.google.com/maps/documentation/tile/2d-tiles-overview): a
  session from ``POST /v1/createSession?key=`` with ``mapType=satellite``, then ``GET /v1/2dtiles/{z}/{x}/{y}``.
  The session is renewed min(60 s, half its lifetime) before its ``expiry``, and after an auth error.
- ``xyz``: any ``{z}/{x}/{y}`` template.

A 404 means "no imagery here" and raises :class:`TileUnavailable` (the job is skipped); other failures raise
:class:`UpstreamError` (a failed attempt). The API key never enters an error message.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Protocol
from urllib.parse import quote, quote_plus

import aiohttp

from .config import Settings
from .errors import TileUnavailable, UpstreamError
from .http import Response, Upstream, bounded_upstream, http_error, send_time_trace
from .limits import SharedBudget
from .tiles import Tile

MAX_TILE_BYTES = 4 * 1024 * 1024


class TileProvider(Protocol):
    name: str

    async def fetch(self, session: aiohttp.ClientSession, tile: Tile) -> tuple[bytes, str]: ...


def _tile_response(provider: str, tile: Tile, resp: Response) -> tuple[bytes, str]:
    if resp.status == 200:
        return resp.body, resp.content_type
    if resp.status == 404:
        raise TileUnavailable(f"{provider}: no imagery for tile {tile.z}/{tile.x}/{tile.y} (HTTP 404)")
    raise http_error(provider, f"tile {tile.z}/{tile.x}/{tile.y}", resp)


class XyzProvider:
    name = "xyz"

    def __init__(self, upstream: Upstream, template: str):
        self.upstream = upstream
        self.template = template

    async def fetch(self, session: aiohttp.ClientSession, tile: Tile) -> tuple[bytes, str]:
        url = self.template.replace("{z}", str(tile.z)).replace("{x}", str(tile.x)).replace("{y}", str(tile.y))
        resp = await self.upstream.request(session, "GET", url, what=f"tile {tile.z}/{tile.x}/{tile.y}")
        return _tile_response(self.name, tile, resp)


class IgnProvider:
    name = "ign"
    LAYER = "ORTHOIMAGERY.ORTHOPHOTOS"

    def __init__(self, upstream: Upstream, url: str):
        self.upstream = upstream
        self.url = url

    async def fetch(self, session: aiohttp.ClientSession, tile: Tile) -> tuple[bytes, str]:
        params = {
            "SERVICE": "WMTS", "REQUEST": "GetTile", "VERSION": "1.0.0", "LAYER": self.LAYER, "STYLE": "normal",
            "TILEMATRIXSET": "PM", "TILEMATRIX": str(tile.z), "TILEROW": str(tile.y), "TILECOL": str(tile.x),
            "FORMAT": "image/jpeg",
        }
        resp = await self.upstream.request(session, "GET", self.url, params=params,
                                           what=f"tile {tile.z}/{tile.x}/{tile.y}")
        return _tile_response(self.name, tile, resp)


class GoogleProvider:
    name = "google"
    #: Renew this long before ``expiry``, or half the session's lifetime before it when that is shorter (a session
    #: of a few seconds would otherwise be renewed before every tile).
    RENEW_BEFORE_S = 60.0

    def __init__(self, upstream: Upstream, base_url: str, api_key: str):
        self.upstream = upstream
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self._session_token: str | None = None
        self._renew_at = 0.0
        self._lock = asyncio.Lock()
        self.sessions_created = 0

    def __repr__(self) -> str:
        return f"GoogleProvider({self.base_url!r}, key=***)"

    async def _session(self, session: aiohttp.ClientSession) -> str:
        async with self._lock:
            if self._session_token is None or time.time() >= self._renew_at:
                created = time.time()
                self._session_token, expiry = await self._create_session(session)
                self._renew_at = expiry - min(self.RENEW_BEFORE_S, max(0.0, expiry - created) / 2)
            return self._session_token

    async def _create_session(self, session: aiohttp.ClientSession) -> tuple[str, float]:
        resp = await self.upstream.request(
            session, "POST", f"{self.base_url}/v1/createSession", params={"key": self._key},
            json={"mapType": "satellite", "language": "en-US", "region": "FR"}, what="createSession")
        if resp.status != 200:
            raise http_error(self.name, "createSession", resp)
        try:
            payload = json.loads(resp.body)
            token = payload["session"]
            expiry = float(payload["expiry"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamError(f"google: createSession: unusable answer ({type(exc).__name__})") from None
        if not isinstance(token, str) or not token:
            raise UpstreamError("google: createSession: answer holds no session token")
        self.sessions_created += 1
        return token, expiry

    async def fetch(self, session: aiohttp.ClientSession, tile: Tile) -> tuple[bytes, str]:
        try:
            return await self._fetch(session, tile)
        except (UpstreamError, TileUnavailable) as exc:
            # An upstream may echo the request URL (and so the key) in its error page, and an excerpt of that page
            # goes into the message: take the key out, raw and percent-encoded.
            text = str(exc)
            for secret in {self._key, quote(self._key, safe=""), quote_plus(self._key)}:
                text = text.replace(secret, "***")
            exc.args = (text,)
            raise

    async def _fetch(self, session: aiohttp.ClientSession, tile: Tile) -> tuple[bytes, str]:
        token = await self._session(session)
        resp = await self.upstream.request(
            session, "GET", f"{self.base_url}/v1/2dtiles/{tile.z}/{tile.x}/{tile.y}",
            params={"session": token, "key": self._key}, what=f"tile {tile.z}/{tile.x}/{tile.y}")
        if resp.status in (400, 401, 403):
            # An expired or revoked session, or a key problem: renew the session before the next attempt.
            async with self._lock:
                if self._session_token == token:
                    self._session_token = None
        return _tile_response(self.name, tile, resp)


def tile_upstream(settings: Settings, budget: SharedBudget | None = None) -> Upstream:
    """The tile server's upstream: the limits of ``budget`` (``harvester run``), or this process's own."""
    url = {"ign": settings.ign_url, "google": settings.google_url}.get(settings.tile_provider, settings.tile_url)
    return bounded_upstream("tiles", url or "", rate=settings.tile_rate, concurrency=settings.tile_concurrency,
                            timeout=settings.request_timeout, max_bytes=MAX_TILE_BYTES, budget=budget)


def make_provider(settings: Settings, upstream: Upstream | None = None) -> TileProvider:
    upstream = upstream or tile_upstream(settings)
    if settings.tile_provider == "ign":
        return IgnProvider(upstream, settings.ign_url)
    if settings.tile_provider == "google":
        assert settings.google_maps_api_key  # checked by load_settings
        return GoogleProvider(upstream, settings.google_url, settings.google_maps_api_key)
    assert settings.tile_url  # checked by load_settings
    return XyzProvider(upstream, settings.tile_url)


def client_session(settings: Settings) -> aiohttp.ClientSession:
    """The one HTTP session of a process: the configured User-Agent on every request, no cookie sharing surprises."""
    connector = aiohttp.TCPConnector(limit=settings.tile_concurrency + settings.overpass_concurrency + 4)
    session = aiohttp.ClientSession(headers={"User-Agent": settings.user_agent}, connector=connector,
                                    cookie_jar=aiohttp.DummyCookieJar(), trace_configs=[send_time_trace()])
    # aiohttp silently re-sends an idempotent request once when a kept-alive connection is reset: that request would
    # bypass our rate limiter and make an attempt cost two requests. No public switch exists (aiohttp 3.9-3.14), so
    # the private flag is turned off here; tests/integration/test_chaos.py counts exactly one request per attempt.
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False
    return session


async def fetch_tile_once(settings: Settings, zoom: int, x: int, y: int) -> tuple[bytes, str]:
    """Fetch one tile outside the harvest (used by ``trainer predict --lon --lat``)."""
    provider = make_provider(settings)
    async with client_session(settings) as session:
        return await provider.fetch(session, Tile(x, y, zoom))
