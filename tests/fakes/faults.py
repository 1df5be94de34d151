"""Per-server state shared by the fake upstreams: knobs, deterministic fault choice, the request log.

A fault is chosen per request from the server's probabilities by hashing (seed, server, request key, how many
times that key was seen), so a run with the same requests meets the same faults whatever the concurrency, and a
retry of a failed request draws anew. Knobs and probabilities may be changed while the server runs (thread-safe).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass

from aiohttp import web

Bounds = tuple[float, float, float, float]
TILE_KINDS = frozenset({"xyz", "ign", "google"})
KINDS = TILE_KINDS | {"overpass"}
ALL = KINDS
FAULTS: dict[str, frozenset[str]] = {
    "rate_limited": ALL,  # 429 with Retry-After: <retry_after_s>
    "rate_limited_no_retry_after": ALL,  # 429 without Retry-After
    "server_error": ALL,  # 500
    "bad_gateway": ALL,  # 502
    "unavailable": ALL,  # 503
    "gateway_timeout": ALL,  # 504 (Overpass: its dispatcher timeout page)
    "reset": ALL,  # the connection is reset (RST) without any response
    "hang": ALL,  # sleeps <hang_s> before answering normally: past any sane client timeout
    "truncated": ALL,  # Content-Length of the whole body, half of it sent, then the connection closed
    "html_200": ALL,  # 200 with an HTML error page (captive portal, CDN error)
    "wrong_content_type": ALL,  # tiles: image bytes as text/plain; Overpass: XML output instead of JSON
    "corrupt_image": TILE_KINDS,  # a valid JPEG/PNG header followed by garbage
    "cut_image": TILE_KINDS,  # half of the image bytes, with a Content-Length that matches (valid HTTP)
    "blank": TILE_KINDS,  # a uniform tile (white, black or grey)
    "missing": TILE_KINDS,  # 404: no imagery here
    "forbidden": frozenset({"google"}),  # 403 PERMISSION_DENIED even with a good key
    "session_expired": frozenset({"google"}),  # the expired-session error even for a fresh session
    "timeout_remark": frozenset({"overpass"}),  # 200, half of the elements, remark "Query timed out"
    "memory_remark": frozenset({"overpass"}),  # 200, no elements, remark "Query run out of memory"
    "malformed_json": frozenset({"overpass"}),  # 200, the JSON cut in the middle
    "missing_members": frozenset({"overpass"}),  # relations with a member lacking geometry, and an unknown member
    "bad_geometry": frozenset({"overpass"}),  # some ways bow-tied (self-intersecting), some unclosed
    "oversize": frozenset({"overpass"}),  # valid JSON padded past <oversize_bytes>
    "not_acceptable": frozenset({"overpass"}),  # 406 whatever the User-Agent
}
LOG_LIMIT = 500_000  # requests kept per server (the oldest are dropped past this)
STATUS_FAULTS = {
    "rate_limited": 429,
    "rate_limited_no_retry_after": 429,
    "server_error": 500,
    "bad_gateway": 502,
    "unavailable": 503,
    "gateway_timeout": 504,
    "missing": 404,
    "forbidden": 403,
    "not_acceptable": 406,
}
LIBRARY_USER_AGENT = re.compile(
    r"^\s*(Python/[\d.]+\s+aiohttp/[\w.]+|python-requests/\S+|Python-urllib/\S+|python-httpx/\S+|httpx/\S+"
    r"|curl/\S+|Wget/\S+|Go-http-client/\S+|Java/\S+|okhttp/\S+|node-fetch/\S+|undici|axios/\S+|Mozilla/5\.0)\s*$",
    re.IGNORECASE,
)


@dataclass
class Knobs:
    """Behaviour of one fake server; each field applies to the servers named in its comment."""

    latency_s: float = 0.0  # all: sleep before answering every request
    hang_s: float = 90.0  # all: how long the "hang" fault waits before answering (default: past 60 s timeouts)
    retry_after_s: int = 1  # all: the Retry-After value of "rate_limited"
    require_user_agent: bool = False  # all: 406 for a missing or bare library User-Agent (on for Overpass)
    coverage: Bounds | None = None  # tiles: lon/lat box with imagery, 404 outside (None: the whole world)
    min_zoom: int = 0  # tiles
    max_zoom: int = 21  # tiles
    image_format: str = "jpeg"  # xyz: jpeg | png (the URL's extension must match)
    jpeg_quality: int = 85  # tiles
    layer: str = "ORTHOIMAGERY.ORTHOPHOTOS"  # ign: the one layer served (TILEMATRIXSET=PM, STYLE=normal)
    blank_zones: tuple[Bounds, ...] = ()  # ign: tiles meeting these lon/lat boxes are blank white (sensitive sites)
    api_key: str = "test-key"  # google: the key that works
    session_lifetime_s: float = 14 * 86400.0  # google: session validity (real: about two weeks)
    tile_px: int = 256  # google: tile size of sessions (512 also when a session asks for highDpi)
    expired_session_status: int = 401  # google: 401 UNAUTHENTICATED or 400 INVALID_ARGUMENT for an expired session
    session_faults: bool = True  # google: faults also hit createSession (False: only tile requests draw faults)
    slots: int = 2  # overpass: queries run at once; one more gets 429
    slot_cooldown_s: float = 0.0  # overpass: a slot stays taken this long after its query ends
    query_s: float = 0.0  # overpass: simulated run time of a query; past the query's [timeout:] it times out
    oversize_bytes: int = 8 << 20  # overpass: body size of the "oversize" fault
    default_maxsize: int = 512 << 20  # overpass: [maxsize:] when the query sets none

    def replace(self, **changes) -> Knobs:
        return dataclasses.replace(self, **changes)


@dataclass
class RequestRecord:
    t: float  # time.monotonic() at arrival
    kind: str
    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    user_agent: str | None
    status: int | None = None  # None: the connection was reset, or the handler never finished
    fault: str | None = None
    duration_s: float | None = None
    reset: bool = False  # the connection was aborted without a response
    key: str | None = None  # what the fault draw was keyed on: "z/x/y" for tiles, the query text for Overpass


class Service:
    """One fake server's knobs, fault probabilities, request log and concurrency counters."""

    def __init__(self, kind: str, knobs: Knobs, faults: dict[str, float] | None = None, seed: int = 0):
        self.kind, self.seed = kind, seed
        self.knobs = knobs
        self.faults: dict[str, float] = {}
        self._lock = threading.Lock()
        self._seen: Counter = Counter()
        self.log: collections.deque[RequestRecord] = collections.deque(maxlen=LOG_LIMIT)
        self.in_flight = 0
        self.max_in_flight = 0
        self.set_faults(faults or {})

    def set_faults(self, probabilities: dict[str, float]) -> None:
        """Replace the fault probabilities (per request; they must sum to at most 1)."""
        bad = [f for f in probabilities if self.kind not in FAULTS.get(f, ())]
        if bad:
            valid = sorted(f for f, kinds in FAULTS.items() if self.kind in kinds)
            raise ValueError(f"faults {bad} do not apply to {self.kind}; valid: {valid}")
        if sum(probabilities.values()) > 1.0 + 1e-9 or any(p < 0 for p in probabilities.values()):
            raise ValueError(f"fault probabilities of {self.kind} must be >= 0 and sum to <= 1: {probabilities}")
        with self._lock:
            self.faults = dict(sorted(probabilities.items()))

    def set_knobs(self, **changes) -> None:
        with self._lock:
            self.knobs = self.knobs.replace(**changes)

    def pick(self, key: str, record: RequestRecord | None = None) -> str | None:
        """The fault for this request (None for a normal answer), deterministic in (seed, key, times seen).

        ``record`` (the request's log entry) is given the key, so tests can count the requests per tile or query."""
        if record is not None:
            record.key = key
        with self._lock:
            faults = self.faults
            if not faults:
                return None
            n = self._seen[key]
            self._seen[key] = n + 1
        digest = hashlib.blake2b(f"{self.seed}|{self.kind}|{key}|{n}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2**64
        for name, p in faults.items():
            if u < p:
                return name
            u -= p
        return None

    def begin(self, request: web.Request) -> RequestRecord:
        record = RequestRecord(
            time.monotonic(),
            self.kind,
            request.method,
            request.path,
            dict(request.query),
            dict(request.headers),
            request.headers.get("User-Agent"),
        )
        with self._lock:
            self.log.append(record)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return record

    def end(self, record: RequestRecord) -> None:
        record.duration_s = time.monotonic() - record.t
        with self._lock:
            self.in_flight -= 1

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self.log)

    def clear(self) -> None:
        with self._lock:
            self.log.clear()
            self._seen.clear()
            self.max_in_flight = self.in_flight


RECORD = web.RequestKey("record", RequestRecord)
SERVICE = web.AppKey("service", Service)


def proper_user_agent(value: str | None) -> bool:
    """Overpass asks clients to identify themselves: not missing, not a library's bare default."""
    return bool(value and value.strip()) and not LIBRARY_USER_AGENT.match(value)


def make_observer(service: Service, not_acceptable):
    """Middleware: logs the request, tracks concurrency, applies latency and the User-Agent rule."""

    @web.middleware
    async def observe(request: web.Request, handler):
        if request.path.startswith("/_fakes"):
            return await handler(request)
        record = service.begin(request)
        request[RECORD] = record
        try:
            knobs = service.knobs
            if knobs.latency_s > 0:
                await asyncio.sleep(knobs.latency_s)
            if knobs.require_user_agent and not proper_user_agent(record.user_agent):
                response = not_acceptable()
            else:
                response = await handler(request)
            if not record.reset:
                record.status = response.status
            return response
        except web.HTTPException as exc:
            record.status = exc.status
            raise
        finally:
            service.end(record)

    return observe


def reset_connection(request: web.Request) -> web.Response:
    """Abort the connection with a TCP RST; the response returned is never sent."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    request[RECORD].reset = True
    return web.Response(status=599)


async def send_truncated(request: web.Request, body: bytes, content_type: str) -> web.StreamResponse:
    """Announce the whole body, send half of it, close the connection."""
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.content_length = len(body)
    try:
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
    except ConnectionResetError:  # the client gave up first (its timeout): nothing more to send
        request[RECORD].reset = True
        return response
    if request.transport is not None:
        request.transport.close()
    return response


HTML_ERROR_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Service temporarily unavailable</title></head>\n<body><h1>We'll be back"
    " soon</h1><p>The service is under maintenance. Please try again later.</p></body></html>\n"
)
NGINX_REASONS = {
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
    504: "Gateway Time-out",
    404: "Not Found",
    403: "Forbidden",
}


def nginx_error(status: int) -> web.Response:
    reason = NGINX_REASONS.get(status, "Error")
    title = f"{status} {reason}"
    text = (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n"
        "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )
    return web.Response(status=status, text=text, content_type="text/html")


async def common_fault(request: web.Request, service: Service, fault: str | None, error) -> web.StreamResponse | None:
    """Answer the protocol-independent faults; ``error(status)`` builds the protocol's error response.

    Returns None when the request should go on normally (no fault, a fault applied later, or after a hang).
    """
    request[RECORD].fault = fault
    if fault is None:
        return None
    if fault in STATUS_FAULTS:
        response = error(STATUS_FAULTS[fault])
        if fault == "rate_limited":
            response.headers["Retry-After"] = str(service.knobs.retry_after_s)
        return response
    if fault == "reset":
        return reset_connection(request)
    if fault == "hang":
        await asyncio.sleep(service.knobs.hang_s)
        return None
    if fault == "html_200":
        return web.Response(text=HTML_ERROR_PAGE, content_type="text/html")
    return None


def max_in_window(timestamps, window: float = 1.0) -> int:
    """The most timestamps inside any window of ``window`` seconds (closed on the left, open on the right)."""
    ts = sorted(timestamps)
    best = start = 0
    for end, t in enumerate(ts):
        while t - ts[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


__all__ = ["FAULTS", "Knobs", "RequestRecord", "Service", "max_in_window", "proper_user_agent"]
