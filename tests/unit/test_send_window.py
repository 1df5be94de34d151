"""The rate limit as an upstream counts it: at most N requests leave in any window, whatever delays a request meets
between its grant and the moment it is written to the socket."""

import asyncio
import random

import aiohttp
import pytest
from aiohttp import web
from aiolimiter import AsyncLimiter

from harvester.http import SendWindow, Upstream, send_time_trace
from harvester.limits import SPACING_MARGIN
from tests.fakes.faults import max_in_window
from tests.fakes.threaded import AppThread

#: Measures time (rates, timeouts, windows): scripts/test.sh runs it alone, after the parallel part.
pytestmark = pytest.mark.timing

COUNT, WINDOW = 5, 0.1  # 50/s: a fast limit, so that each case takes about half a second


def delays(seed: int, n: int = 30) -> list[float]:
    """Grant-to-socket delays as a busy loop makes them: mostly none, sometimes tens of milliseconds."""
    rng = random.Random(seed)
    return [rng.choice([0.0, 0.0, 0.0, 0.001, 0.012, 0.025]) for _ in range(n)]


async def send_all(grant, delay_of: list[float], stamp=None) -> list[float]:
    """Each request: ``ticket = await grant()``, then ``delay`` s on its way out, then its send time is logged."""
    loop, sends = asyncio.get_running_loop(), []

    async def one(delay: float) -> None:
        ticket = await grant()
        await asyncio.sleep(delay)
        sends.append(loop.time())
        if stamp is not None:
            stamp(ticket)

    await asyncio.gather(*(one(d) for d in delay_of))
    return sends


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_spacing_alone_bunches_sends_past_the_limit(seed):
    """The hazard is real: grants spaced with the same margin, shifted by these delays, put more than N sends in a window."""
    limiter = AsyncLimiter(1, SPACING_MARGIN * WINDOW / COUNT)
    sends = await send_all(limiter.acquire, delays(seed))
    assert max_in_window(sends, WINDOW) > COUNT


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_send_window_holds_at_the_socket_whatever_the_delays(seed):
    window = SendWindow(COUNT, WINDOW)
    sends = await send_all(window.reserve, delays(seed), stamp=window.sent)
    assert max_in_window(sends, WINDOW) <= COUNT
    assert len(sends) == 30
    # ... and it does not starve: 30 sends need 6 windows, and get them back to back when nothing is late.
    undelayed = await send_all(window.reserve, [0.0] * 30, stamp=window.sent)
    assert max_in_window(undelayed, WINDOW) == COUNT
    assert undelayed[-1] - undelayed[0] < 6.5 * WINDOW


async def test_a_request_that_never_left_counts_from_its_release():
    """No send time (an error before the headers, or a session without the trace): counted from its end, so the
    next request may only leave a window after that."""
    window = SendWindow(1, WINDOW)
    loop = asyncio.get_running_loop()
    ticket = await window.reserve()
    await asyncio.sleep(0.05)
    window.release(ticket)
    released = loop.time()
    await window.reserve()
    assert loop.time() - released >= WINDOW - 0.005


@pytest.mark.parametrize("rate, count, window", [(20, 20, 1.04), (2.5, 2, 1.04), (1, 1, 1.04), (0.5, 1, 2.08)])
def test_window_for_rate(rate, count, window):
    w = SendWindow.for_rate(rate)
    assert (w.count, w.window) == (count, pytest.approx(window))


@pytest.mark.parametrize("method, data", [("GET", None), ("POST", {"data": "[out:json];way[building];out geom;"})])
async def test_upstream_stamps_the_send_time_not_the_end(method, data):
    """With the trace installed, a request counts from when the server saw it arrive, not from when its (slow)
    answer ended: the next window opens on time. A request with a body (an Overpass query) counts from its body."""
    arrivals = []

    async def slow(request: web.Request) -> web.Response:
        arrivals.append(asyncio.get_running_loop().time())
        await request.read()
        await asyncio.sleep(0.5)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/", slow)
    with AppThread(app) as server:
        upstream = Upstream("tiles", rate=1, concurrency=4, timeout=5, max_bytes=1024)
        async with aiohttp.ClientSession(trace_configs=[send_time_trace()]) as session:
            await upstream.request(session, method, f"http://127.0.0.1:{server.port}/", what="probe", data=data)
            stamps = list(upstream._window._stamps)
    # the loop clock is time.monotonic() in both threads
    assert len(stamps) == 1 and abs(stamps[0] - arrivals[0]) < 0.1, (stamps, arrivals)
