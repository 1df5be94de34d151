"""One aiohttp application served on 127.0.0.1 by its own event loop in its own thread.

Each fake upstream gets one, as real upstreams are separate services: a CPU-heavy answer of one (an Overpass query
that generates a city) never holds up the arrival of another's requests, so the arrival times a fake logs are
honest enough to check a client's request rate against.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Self

from aiohttp import web


class AppThread:
    def __init__(self, app: web.Application, *, host: str = "127.0.0.1", port: int = 0, name: str = "fake",
                 **runner_options):
        self.app, self.host, self.port, self.name = app, host, port, name
        self._runner_options = {"access_log": None, "shutdown_timeout": 0.5, **runner_options}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Listen; returns once the port is bound (``self.port`` is then the real one)."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"{self.name} did not start within 30 s")
        if self._error is not None:
            raise RuntimeError(f"{self.name} failed to start: {self._error}") from self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); the thread has no one else to tell
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        runner = web.AppRunner(self.app, **self._runner_options)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
