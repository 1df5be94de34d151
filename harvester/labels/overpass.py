"""A polite Overpass API client (wiki.openstreetmap.org/wiki/Overpass_API, "Commons" usage policy).

- Every request carries the configured User-Agent and passes the Overpass :class:`Upstream` (rate and concurrency,
  ``HARVESTER_OVERPASS_CONCURRENCY`` 1 by default).
- Before the first query, and after a 429, it reads ``/api/status`` and waits for a free slot.
- After a 429 it waits at least 30 s (or ``Retry-After`` if longer) before any further query; after a 504 it backs off
  too. Both pauses go through the upstream's limiter, so with the shared budget every worker waits. Both count as a
  failed attempt of the jobs that needed the answer.
- A 200 whose ``remark`` starts with ``runtime error`` is a failed attempt (the answer is incomplete).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

import aiohttp

from ..errors import OverpassError, UpstreamError
from ..http import Response, Upstream, http_error
from .osm import ParsedBuildings, building_query, parse_buildings

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_SLOTS_NOW = re.compile(r"^(\d+) slots? available now", re.M)
_SLOT_AFTER = re.compile(r"^Slot available after: (\S+), in (-?\d+) seconds?", re.M)


def status_url(interpreter_url: str) -> str:
    """The status page: the interpreter URL with its last path segment replaced by ``status``."""
    base, _, _ = interpreter_url.split("?")[0].rstrip("/").rpartition("/")
    return f"{base}/status"


def seconds_until_slot(status_text: str) -> float | None:
    """0 when a slot is free now, else the seconds until the first slot frees, or None if the page is unreadable."""
    now = _SLOTS_NOW.search(status_text)
    if now and int(now.group(1)) > 0:
        return 0.0
    waits = [max(0, int(m.group(2))) for m in _SLOT_AFTER.finditer(status_text)]
    if waits:
        return float(min(waits))
    if now:  # "0 slots available now" with every slot running a query: ask again shortly
        return 3.0
    return None


class OverpassClient:
    def __init__(self, upstream: Upstream, url: str, *, query_timeout: int, maxsize: int = 256 * 1024 * 1024,
                 pause_after_429: float = 30.0, pause_after_504: float = 10.0, max_status_wait: float = 300.0):
        self.upstream = upstream
        # The upstream pauses on a 429 before it frees the slot, so no query of any worker slips in before the pause.
        upstream.pause_after_429 = max(upstream.pause_after_429, pause_after_429)
        self.url = url
        self.status_url = status_url(url)
        self.query_timeout = query_timeout
        self.maxsize = maxsize
        self.pause_after_429 = pause_after_429
        self.pause_after_504 = pause_after_504
        self.max_status_wait = max_status_wait
        self._must_check_status = True
        self._status_lock = asyncio.Lock()

    async def fetch_buildings(self, session: aiohttp.ClientSession, bounds: tuple[float, float, float, float]
                              ) -> ParsedBuildings:
        """Building footprints intersecting ``bounds`` (west, south, east, north), whole (never cut at the bbox)."""
        await self._wait_for_slot(session)
        query = building_query(bounds, self.query_timeout, self.maxsize)
        resp = await self.upstream.request(session, "POST", self.url, data={"data": query}, what="building query")
        await self._check_status(resp)
        try:
            payload = json.loads(resp.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise OverpassError(f"overpass: malformed JSON ({exc.__class__.__name__}: {str(exc)[:80]})") from None
        return parse_buildings(payload)

    async def _check_status(self, resp: Response) -> None:
        if resp.status == 200:
            if resp.content_type and "json" not in resp.content_type:
                raise OverpassError(f"overpass: expected JSON, got {resp.content_type}: "
                                    f"{resp.body[:120].decode('utf-8', 'replace')!r}")
            return
        err = http_error("overpass", "building query", resp)
        if resp.status == 429:
            pause = max(self.pause_after_429, err.retry_after or 0.0)  # the upstream has paused for it already
            self._must_check_status = True
            err.retry_after = pause
        elif resp.status == 504:
            pause = max(self.pause_after_504, err.retry_after or 0.0)
            await self.upstream.pause(pause)
            err.retry_after = pause
        elif resp.status == 406:
            err = UpstreamError(f"{err} (Overpass refuses requests without an identifying User-Agent: set "
                                "HARVESTER_USER_AGENT to name the application and a contact)", status=406)
        raise err

    async def _wait_for_slot(self, session: aiohttp.ClientSession) -> None:
        async with self._status_lock:  # the status request waits for any pause in the upstream's limiter
            if not self._must_check_status:
                return
            waited = 0.0
            while True:
                resp = await self.upstream.request(session, "GET", self.status_url, what="status")
                text = resp.body.decode("utf-8", "replace") if resp.status == 200 else ""
                wait = seconds_until_slot(text)
                if wait is None:
                    log.info("overpass: status page unreadable (HTTP %s); querying anyway", resp.status)
                    break
                if wait <= 0:
                    break
                if waited >= self.max_status_wait:
                    raise UpstreamError(f"overpass: no free slot after waiting {waited:.0f} s", retry_after=wait)
                log.info("overpass: no free slot, waiting %.0f s", wait)
                await asyncio.sleep(wait)
                waited += wait
            self._must_check_status = False


