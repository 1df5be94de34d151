"""A tiny XYZ tile server over a folder of ``OAM-{x}-{y}-{z}.png`` files (the layout of ``shared/data/kampala-oam``).

    with FileTileServer(Path("../shared/data/kampala-oam")) as tiles:
        ... HARVESTER_TILE_URL=tiles.url ...   # http://127.0.0.1:PORT/tiles/{z}/{x}/{y}.png
        tiles.requests()                      # [FileTileRequest(z, x, y, status, user_agent, t), ...]

``GET /tiles/{z}/{x}/{y}`` (an extension, any, is allowed and ignored) answers the file's bytes exactly as stored,
with the Content-Type of what the bytes are (24 of kampala-oam's ``.png`` files hold JPEG data), and 404 for a tile
the folder does not hold. Files are read once at start; the folder is never written. Runs on its own event loop in a
background thread, on the loopback interface, so a harvest in the calling thread (or a subprocess) can use it.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from .threaded import AppThread

TILE_NAME = re.compile(r"^OAM-(\d+)-(\d+)-(\d+)\.png$")


def content_type(body: bytes) -> str:
    """The media type named by the body's magic number (not by the file name)."""
    if body[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if body[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def scan_folder(root: Path) -> dict[tuple[int, int, int], Path]:
    """``{(z, x, y): path}`` of every ``OAM-{x}-{y}-{z}.png`` file of ``root``."""
    tiles = {}
    for path in sorted(Path(root).iterdir()):
        match = TILE_NAME.match(path.name)
        if match and path.is_file():
            x, y, z = (int(v) for v in match.groups())
            tiles[(z, x, y)] = path
    return tiles


@dataclass(frozen=True)
class FileTileRequest:
    z: int | None  # None: the path was not a tile address
    x: int | None
    y: int | None
    status: int
    user_agent: str | None
    t: float  # time.monotonic() at arrival


class FileTileServer(AppThread):
    def __init__(self, root: str | Path, *, host: str = "127.0.0.1", port: int = 0, latency_s: float = 0.0):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the file tile server listens on the loopback interface only")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"tile folder {self.root} not found")
        self.latency_s = latency_s
        self.paths = scan_folder(self.root)
        self._bodies = {key: path.read_bytes() for key, path in self.paths.items()}
        self._log: list[FileTileRequest] = []
        self._lock = threading.Lock()
        app = web.Application()
        app.router.add_get("/tiles/{z}/{x}/{y}", self._tile)
        super().__init__(app, host=host, port=port, name="file-tiles")

    # -- serving -----------------------------------------------------------------------------------------------------

    async def _tile(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        info = request.match_info
        try:
            z, x, y = int(info["z"]), int(info["x"]), int(info["y"].partition(".")[0])
        except ValueError:
            z = x = y = None
        body = self._bodies.get((z, x, y)) if z is not None else None
        status = 200 if body is not None else 404
        with self._lock:
            self._log.append(FileTileRequest(z, x, y, status, request.headers.get("User-Agent"), arrived))
        if body is None:
            return web.Response(status=404, text="no such tile\n")
        return web.Response(body=body, headers={"Content-Type": content_type(body),
                                                "Cache-Control": "public, max-age=86400"})

    # -- URLs and observation ----------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The XYZ template of this server, with ``{z}``, ``{x}`` and ``{y}``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/tiles/{{z}}/{{x}}/{{y}}.png"

    def requests(self) -> list[FileTileRequest]:
        """Every tile request received so far, in arrival order."""
        with self._lock:
            return list(self._log)

    def request_counts(self) -> Counter:
        """Requests per ``(z, x, y)``."""
        return Counter((r.z, r.x, r.y) for r in self.requests())

    def clear(self) -> None:
        with self._lock:
            self._log.clear()
