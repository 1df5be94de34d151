"""One bounded upstream: a rate limit over any one-second window, a cap on requests in flight, a pause after a 429,
a timeout on every request, and a cap on the body size. Every request to that upstream (first tries and retries
alike) passes here.

The rate is held in two stages:

1. a :class:`~harvester.limits.Limiter` grants a slot and a start time: in this process only
   (:class:`~harvester.limits.LocalLimiter`, an ``aiolimiter.AsyncLimiter`` of capacity 1 refilled every ``1 / rate``
   s: a bucket of capacity ``rate`` would let ``2 * rate`` through in the first second), or shared by every
   ``harvester run`` on one database (:class:`~harvester.limits.SharedLimiter`);
2. a :class:`SendWindow` then lets at most ``rate`` requests onto the wire in any ``SPACING_MARGIN`` (1.04) s,
   counting each request from the moment it was written to the socket (aiohttp trace hooks). Spacing alone is kept
   at the grant, and a busy event loop or a slow connect shifts the moment a request leaves by milliseconds, which
   bunches starts past the limit where the upstream counts them. Counted at the socket, no shift on our side can;
   the 4 % margin absorbs differences of up to 40 ms in the network's and the server's delays (a 3 % margin let a
   co-hosted fake see 21 starts in a second at 20/s about once in eight benchmark runs).
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import logging
import time
from dataclasses import dataclass
from types import SimpleNamespace

import aiohttp

from .errors import UpstreamError
from .limits import Limiter, LocalLimiter, SharedBudget, spacing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("retry-after"))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP-date (RFC 9110 section 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class SendWindow:
    """At most ``count`` requests sent in any ``window`` seconds, where a request counts from the moment it left.

    A request is *reserved* by :meth:`reserve` (counted as sent now, until it is) and *stamped* by :meth:`sent` when
    it was written to the socket, or by :meth:`release` when it ends (a request that never left counts from then: a
    stamp late by any amount only delays later requests, never lets one through early).
    """

    def __init__(self, count: int, window: float):
        self.count, self.window = count, window
        self._stamps: collections.deque[float] = collections.deque()  # ascending send times (loop clock)
        self._reserved = 0
        self._lock = asyncio.Lock()  # FIFO among waiters
        self._stamped = asyncio.Event()

    @classmethod
    def for_rate(cls, rate: float) -> SendWindow:
        """``rate`` per second over any 1 s (whole requests: 2.5/s allows 2 in any 1 s); below 1/s, one per ``1/rate``
        s. Both with the safety margin."""
        return cls(*spacing(rate))

    async def reserve(self) -> SimpleNamespace:
        loop = asyncio.get_running_loop()
        async with self._lock:
            while True:
                now = loop.time()
                while self._stamps and self._stamps[0] <= now - self.window:
                    self._stamps.popleft()
                if self._reserved + len(self._stamps) < self.count:
                    self._reserved += 1
                    return SimpleNamespace(window=self, at=None)
                if self._stamps:  # the oldest send leaves the window then
                    await asyncio.sleep(self._stamps[0] + self.window - now)
                else:  # all counted requests are still on their way out: wait until one leaves
                    self._stamped.clear()
                    await self._stamped.wait()

    def sent(self, ticket: SimpleNamespace) -> None:
        if ticket.at is None:
            ticket.at = asyncio.get_running_loop().time()
            self._reserved -= 1
            self._stamps.append(ticket.at)
            self._stamped.set()

    release = sent


def _ticket(context) -> SimpleNamespace | None:
    ticket = context.trace_request_ctx
    if isinstance(ticket, SimpleNamespace) and isinstance(getattr(ticket, "window", None), SendWindow):
        return ticket
    return None


async def _on_headers_sent(session, context, params) -> None:
    # aiohttp calls this just before it writes the headers; a request with a body writes them with its first body
    # chunk, possibly a loop iteration later, so that one is stamped by _on_chunk_sent instead.
    ticket = _ticket(context)
    has_body = params.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in params.headers
    if ticket is not None and not has_body:
        ticket.window.sent(ticket)


async def _on_chunk_sent(session, context, params) -> None:
    ticket = _ticket(context)
    if ticket is not None:
        ticket.window.sent(ticket)  # only the first stamp counts


def send_time_trace() -> aiohttp.TraceConfig:
    """The trace that stamps each request's send time for :class:`SendWindow` (install it on the session; without
    it a request counts from its end, which is safe but slower)."""
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_on_headers_sent)
    trace.on_request_chunk_sent.append(_on_chunk_sent)
    return trace


def bounded_upstream(name: str, url: str, *, rate: float, concurrency: int, timeout: float, max_bytes: int,
                     budget: SharedBudget | None = None) -> Upstream:
    """An upstream whose limits are those of ``budget`` (every worker on the database), or this process's own."""
    limiter = None if budget is None else budget.limiter(name, url, rate=rate, concurrency=concurrency,
                                                         timeout=timeout)
    return Upstream(name, rate=rate, concurrency=concurrency, timeout=timeout, max_bytes=max_bytes, limiter=limiter)


class Upstream:
    """Limits shared by every request to one upstream service (tile server, Overpass): those of ``limiter`` (by
    default this process's own), then this process's send window. A 429 pauses the limiter for its ``Retry-After``,
    at least ``pause_after_429`` s."""

    def __init__(self, name: str, *, rate: float, concurrency: int, timeout: float, max_bytes: int,
                 limiter: Limiter | None = None, pause_after_429: float = 1.0):
        self.name = name
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.limiter = limiter or LocalLimiter(name, rate=rate, concurrency=concurrency)
        self.pause_after_429 = pause_after_429
        self._window = SendWindow.for_rate(rate)
        self.requests_sent = 0

    async def pause(self, seconds: float) -> None:
        """Hold every request to this upstream not sent yet (of every worker, with a shared limiter)."""
        await self.limiter.pause(seconds)

    async def request(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        *,
        what: str,
        params: dict[str, str] | None = None,
        data: dict[str, str] | None = None,
        json: object | None = None,
    ) -> Response:
        """Send one request; return its response whatever the status. Network errors, timeouts and oversized
        bodies raise :class:`UpstreamError` whose message names ``what`` (never the URL: it may hold a key)."""
        async with self.limiter.slot():
            ticket = await self._window.reserve()
            try:
                self.requests_sent += 1
                async with asyncio.timeout(self.timeout):
                    async with session.request(method, url, params=params, data=data, json=json,
                                               allow_redirects=True, trace_request_ctx=ticket) as resp:
                        body = await self._read_capped(resp, what)
                        response = Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, body)
                if response.status == 429:  # before the slot is freed: no request of ours goes out meanwhile
                    await self.pause(max(self.pause_after_429, response.retry_after() or 0.0))
                return response
            except TimeoutError:
                raise UpstreamError(f"{self.name}: {what}: no complete answer within {self.timeout:g} s") from None
            except aiohttp.ClientError as exc:
                raise UpstreamError(f"{self.name}: {what}: {type(exc).__name__}: {_safe(exc)}") from None
            finally:
                self._window.release(ticket)

    async def _read_capped(self, resp: aiohttp.ClientResponse, what: str) -> bytes:
        declared = resp.content_length
        if declared is not None and declared > self.max_bytes:
            raise UpstreamError(f"{self.name}: {what}: body of {declared} bytes exceeds the {self.max_bytes} cap")
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(65536):
            size += len(chunk)
            if size > self.max_bytes:
                raise UpstreamError(f"{self.name}: {what}: body exceeds the {self.max_bytes} byte cap")
            chunks.append(chunk)
        return b"".join(chunks)


def _safe(exc: BaseException) -> str:
    """An aiohttp error message without the request URL (whose query may hold an API key)."""
    text = str(exc)
    return text.split("?")[0] if "?" in text else text


def http_error(upstream: str, what: str, resp: Response) -> UpstreamError:
    """The error for an unexpected status, with a short, safe excerpt of the body."""
    excerpt = resp.body[:200].decode("utf-8", "replace").replace("\n", " ").strip()
    return UpstreamError(f"{upstream}: {what}: HTTP {resp.status}: {excerpt}", status=resp.status,
                         retry_after=resp.retry_after())
