"""One bounded upstream: a rate limit over any one-second window, a cap on requests in flight, a timeout on every
request, and a cap on the body size. Every request to that upstream (first tries and retries alike) passes here.

The rate is held with an ``aiolimiter.AsyncLimiter`` of capacity 1 refilled every ``SPACING_MARGIN / rate`` s: a leaky
bucket with no burst allowance (a bucket of capacity ``rate`` would let ``2 * rate`` through in the first second). The
3 % margin on the spacing is what keeps the limit true where the upstream measures it: between the limiter's grant and
the request reaching the server, scheduling delays of a busy event loop shift starts by milliseconds; spaced exactly
``1/rate`` apart, any such shift would put ``rate + 1`` starts in some one-second window, while 3 % absorbs shifts of
up to about 30 ms and still sends 97 % of the allowed rate.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import aiohttp
from aiolimiter import AsyncLimiter

from .errors import UpstreamError

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


SPACING_MARGIN = 1.03


class Upstream:
    """Limits shared by every request to one upstream service (tile server, Overpass)."""

    def __init__(self, name: str, *, rate: float, concurrency: int, timeout: float, max_bytes: int):
        self.name = name
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._limiter = AsyncLimiter(1, SPACING_MARGIN / rate)
        self._slots = asyncio.Semaphore(concurrency)
        self.requests_sent = 0

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
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> Response:
        """Send one request; return its response whatever the status. Network errors, timeouts and oversized
        bodies raise :class:`UpstreamError` whose message names ``what`` (never the URL: it may hold a key)."""
        async with self._slots:
            await self._limiter.acquire()
            if before_send is not None:  # e.g. a pause the upstream imposed while this request was queued
                await before_send()
            self.requests_sent += 1
            try:
                async with asyncio.timeout(self.timeout):
                    async with session.request(method, url, params=params, data=data, json=json,
                                               allow_redirects=True) as resp:
                        body = await self._read_capped(resp, what)
                        return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, body)
            except TimeoutError:
                raise UpstreamError(f"{self.name}: {what}: no complete answer within {self.timeout:g} s") from None
            except aiohttp.ClientError as exc:
                raise UpstreamError(f"{self.name}: {what}: {type(exc).__name__}: {_safe(exc)}") from None

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
