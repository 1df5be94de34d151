"""All fake upstreams on 127.0.0.1, one port each, each served by its own event loop in its own thread.

    with FakeUpstreams(World(seed=1), latency_s=0.0, faults={"xyz": {"unavailable": 0.1}}) as up:
        ... up.xyz_url, up.ign_url, up.google_url, up.overpass_url, up.google_key ...
        up.set_faults("overpass", {"timeout_remark": 0.5}); up.requests("xyz"); up.max_concurrency("overpass")

Knobs given to the constructor apply to every server (see ``faults.Knobs``), ``overrides`` per server; the Overpass
server requires a proper User-Agent unless overridden. For the fakes run as a process (``__main__``), every port also
answers ``GET /_fakes/stats`` (counts per server), ``GET /_fakes/requests?kind=K`` (the log), and ``POST
/_fakes/{faults,knobs,overpass-busy,expire-google-sessions,restore}`` with a JSON body, e.g.
{"xyz": {"unavailable": 0.5}}.
"""

from __future__ import annotations

import collections
import dataclasses

from aiohttp import web

from .faults import KINDS, Knobs, RequestRecord, Service, max_in_window
from .google import SESSIONS, google_app
from .osm import tile_bounds
from .overpass import SLOTS, overpass_app
from .ql import element_json
from .threaded import AppThread
from .tiles import ign_app, xyz_app
from .world import World, tile_for

APPS = {"xyz": xyz_app, "ign": ign_app, "google": google_app, "overpass": overpass_app}
ORDER = ("xyz", "ign", "google", "overpass")


class FakeUpstreams:
    def __init__(
        self,
        world: World,
        *,
        host: str = "127.0.0.1",
        port: int = 0,  # 0: ephemeral ports; N: xyz on N, ign on N+1, google on N+2, overpass on N+3
        seed: int = 0,  # seeds the fault choice (and the Google session tokens)
        faults: dict[str, dict[str, float]] | None = None,  # server -> fault -> probability per request
        overrides: dict[str, dict] | None = None,  # server -> knobs for that server only
        **knobs,  # Knobs fields for every server
    ):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fakes listen on the loopback interface only")
        unknown = set(faults or {}) | set(overrides or {})
        if unknown - KINDS:
            raise ValueError(f"unknown servers {sorted(unknown - KINDS)}; known: {sorted(KINDS)}")
        self.world, self.host, self.port = world, host, port
        base = Knobs(**knobs)
        self.services: dict[str, Service] = {}
        for kind in ORDER:
            specific = {"require_user_agent": True} if kind == "overpass" else {}
            specific.update((overrides or {}).get(kind, {}))
            self.services[kind] = Service(kind, base.replace(**specific), (faults or {}).get(kind), seed)
        self._initial = {kind: (svc.knobs, dict(svc.faults)) for kind, svc in self.services.items()}
        self.ports: dict[str, int] = {}
        self._apps: dict[str, web.Application] = {}
        self._threads: list[AppThread] = []

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def __enter__(self) -> FakeUpstreams:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Each server on its own port, event loop and thread (see ``threaded``); returns once all listen."""
        try:
            for i, kind in enumerate(ORDER):
                app = APPS[kind](self.services[kind], self.world)
                app.add_routes(self._control_routes())
                self._apps[kind] = app
                server = AppThread(app, host=self.host, port=self.port + i if self.port else 0, name=f"fake-{kind}",
                                   handler_cancellation=True)
                server.start()
                self._threads.append(server)
                self.ports[kind] = server.port
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for server in self._threads:
            server.stop()
        self._threads.clear()

    # -- URLs ------------------------------------------------------------------------------------------------------

    def _base(self, kind: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.ports[kind]}"

    @property
    def xyz_url(self) -> str:
        ext = "png" if self.services["xyz"].knobs.image_format == "png" else "jpg"
        return self._base("xyz") + "/xyz/{z}/{x}/{y}." + ext

    @property
    def ign_url(self) -> str:
        return self._base("ign") + "/wmts"

    @property
    def google_url(self) -> str:
        return self._base("google")

    @property
    def google_key(self) -> str:
        return self.services["google"].knobs.api_key

    @property
    def overpass_url(self) -> str:
        return self._base("overpass") + "/api/interpreter"

    @property
    def overpass_status_url(self) -> str:
        return self._base("overpass") + "/api/status"

    def env(self) -> dict[str, str]:
        """The harvester's settings pointing at these fakes."""
        return {
            "HARVESTER_TILE_URL": self.xyz_url,
            "HARVESTER_IGN_URL": self.ign_url,
            "HARVESTER_GOOGLE_URL": self.google_url,
            "GOOGLE_MAPS_API_KEY": self.google_key,
            "HARVESTER_OVERPASS_URL": self.overpass_url,
        }

    # -- control (thread-safe) ---------------------------------------------------------------------------------------

    def set_faults(self, kind: str, probabilities: dict[str, float]) -> None:
        self.services[kind].set_faults(probabilities)

    def set_knobs(self, kind: str | None = None, **knobs) -> None:
        """Change knobs of one server, or of all when ``kind`` is None."""
        for name in [kind] if kind else ORDER:
            self.services[name].set_knobs(**knobs)

    def restore(self) -> None:
        """Back to the constructor's knobs and faults, Overpass slots free, logs cleared (between tests)."""
        for kind, (knobs, faults) in self._initial.items():
            self.services[kind].knobs = knobs
            self.services[kind].set_faults(faults)
            self.services[kind].clear()
        self._apps["overpass"][SLOTS].free()

    def set_overpass_busy(self, seconds: float) -> None:
        """Every Overpass slot taken for ``seconds``: queries get 429, /api/status says when slots free up."""
        service = self.services["overpass"]
        self._apps["overpass"][SLOTS].block(service.knobs.slots, seconds)

    def expire_google_sessions(self) -> None:
        """Every Google session issued so far expires now."""
        self._apps["google"][SESSIONS].expire_all()

    def prewarm(self, points, zooms=(17, 18)) -> int:
        """Render and cache the tiles of these (lon, lat) points and serialize their buildings' Overpass elements,
        so a benchmark then measures the client, not the fakes. Returns the number of tiles cached."""
        tiles = {(z, *tile_for(lon, lat, z)) for lon, lat in points for z in zooms}
        self.world.reserve(cells=len(tiles) * 2, tiles=len(tiles))
        for z, x, y in sorted(tiles):
            self.world.tile_bytes(z, x, y, quality=self.services["xyz"].knobs.jpeg_quality)
            for item in self.world.candidates(tile_bounds(z, x, y)):
                element_json(item)
                for way in item.ways():
                    element_json(way)
        return len(tiles)

    # -- observation -----------------------------------------------------------------------------------------------

    def requests(self, kind: str) -> list[RequestRecord]:
        """Every request the server received so far (control endpoints excluded), in arrival order."""
        return self.services[kind].records()

    def max_concurrency(self, kind: str) -> int:
        """The most requests this server had in flight at once."""
        return self.services[kind].max_in_flight

    def clear(self, kind: str | None = None) -> None:
        """Forget the logs (and the fault draw counters) of one server or all."""
        for name in [kind] if kind else ORDER:
            self.services[name].clear()

    def stats(self) -> dict:
        out = {}
        for kind in ORDER:
            records = self.requests(kind)
            out[kind] = {
                "requests": len(records),
                "by_status": dict(collections.Counter(str(r.status) for r in records)),
                "by_fault": dict(collections.Counter(str(r.fault) for r in records if r.fault)),
                "max_concurrency": self.max_concurrency(kind),
                "max_per_second": max_in_window([r.t for r in records], 1.0),
            }
        return out

    def _control_routes(self) -> list:
        """/_fakes/... on every port: the same control, as JSON, for the fakes run as a process."""

        async def stats(request):
            return web.json_response(self.stats())

        async def requests(request):
            records = self.requests(request.query.get("kind", "xyz"))
            return web.json_response([dataclasses.asdict(r) for r in records])

        async def control(request):
            body = await request.json() if request.can_read_body else {}
            action = request.match_info["action"]
            try:
                if action == "faults":  # {"xyz": {"unavailable": 0.5}}
                    for kind, probabilities in body.items():
                        self.set_faults(kind, probabilities)
                elif action == "knobs":  # {"overpass": {"slots": 1}}
                    for kind, knobs in body.items():
                        self.set_knobs(kind, **{k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()})
                elif action == "overpass-busy":  # {"seconds": 5}
                    self.set_overpass_busy(float(body["seconds"]))
                elif action == "expire-google-sessions":
                    self.expire_google_sessions()
                elif action == "restore":
                    self.restore()
                else:
                    raise web.HTTPNotFound(text=f"unknown control action {action!r}")
            except (KeyError, TypeError, ValueError) as exc:
                raise web.HTTPBadRequest(text=f"{action}: {exc}") from exc
            return web.json_response({"ok": True})

        return [
            web.get("/_fakes/stats", stats),
            web.get("/_fakes/requests", requests),
            web.post("/_fakes/{action}", control),
        ]
