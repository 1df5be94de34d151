"""Fake Overpass API (https://wiki.openstreetmap.org/wiki/Overpass_API): /api/interpreter and /api/status.

Answers ``[out:json]`` queries with ``out geom`` as the real server does: version, generator, osm3s, elements (ways
with bounds, nodes, geometry; relations with bounds and members carrying their geometry), and a ``remark`` for
runtime errors (timeout, memory), which come with status 200. Like the real server it refuses clients without a
proper User-Agent (406), allows ``slots`` queries at once (429 "rate_limited" page beyond), reports its slots on
/api/status, and answers 504 when its dispatcher gives up.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import math
import threading
import time
from xml.sax.saxutils import escape, quoteattr

from aiohttp import web

from .faults import RECORD, SERVICE, Service, common_fault, make_observer, nginx_error, send_truncated
from .ql import QLError, element_json, evaluate, parse
from .tiles import WORLD
from .world import AreaTooLarge, World

GENERATOR = "Overpass API 0.7.62.5 1bd436f1"
OSM_BASE = "2026-01-01T00:00:00Z"
COPYRIGHT = "The data included in this document is from www.openstreetmap.org. The data is made available under ODbL."
PAGE = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" "http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">
<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">
<head>
  <meta http-equiv="content-type" content="text/html; charset=utf-8" lang="en"/>
  <title>OSM3S Response</title>
</head>
<body>

<p>{copyright}</p>
<p><strong style="color:#FF0000">Error</strong>: {message} </p>

</body>
</html>
"""
DISPATCHER = "runtime error: open64: 0 Success /osm3s_osm_base Dispatcher_Client::request_read_and_idx::"
MESSAGES = {
    429: DISPATCHER + "rate_limited. Please check /api/status for the quota of your IP address.",
    504: DISPATCHER + "timeout. The server is probably too busy to handle your request.",
    406: "runtime error: requests need a User-Agent that names the application and a contact, not a library default.",
}


def osm3s_page(status: int, message: str | None = None) -> web.Response:
    if message is None and status not in MESSAGES:
        return nginx_error(status)
    text = PAGE.format(copyright=COPYRIGHT, message=escape(message or MESSAGES[status]))
    return web.Response(status=status, text=text, content_type="text/html")


class Slots:
    """Query slots: each is free from its ``until`` (monotonic seconds); math.inf while its query runs."""

    def __init__(self):
        self._lock = threading.Lock()
        self.until: list[float] = []
        self.running: dict[int, tuple[int, int, float]] = {}  # slot -> (space limit, time limit, wall start)

    def acquire(self, count: int, maxsize: int, timeout_s: int) -> int | None:
        now = time.monotonic()
        with self._lock:
            self.until += [0.0] * (count - len(self.until))
            for i in range(count):
                if self.until[i] <= now:
                    self.until[i] = math.inf
                    self.running[i] = (maxsize, timeout_s, time.time())
                    return i
        return None

    def release(self, slot: int, cooldown_s: float) -> None:
        with self._lock:
            self.until[slot] = time.monotonic() + cooldown_s
            self.running.pop(slot, None)

    def block(self, count: int, seconds: float) -> None:
        """Every slot taken for ``seconds`` from now (as after heavy use: /api/status shows the wait)."""
        with self._lock:
            self.until += [0.0] * (count - len(self.until))
            release = time.monotonic() + seconds
            self.until = [max(u, release) for u in self.until]

    def free(self) -> None:
        """End every cooldown and block (running queries keep their slots)."""
        with self._lock:
            self.until = [u if u == math.inf else 0.0 for u in self.until]

    def status(self, count: int, client: str) -> str:
        now, wall = time.monotonic(), time.time()
        iso = lambda t: dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
        with self._lock:
            until = (self.until + [0.0] * count)[:count]
            running = dict(self.running)
        free = sum(1 for u in until if u <= now)
        lines = [
            f"Connected as: {client}",
            f"Current time: {iso(wall)}",
            "Announced endpoint: none",
            f"Rate limit: {count}",
        ]
        if free:
            lines.append(f"{free} slots available now.")
        for u in sorted(u for u in until if now < u < math.inf):
            wait = math.ceil(u - now)
            lines.append(f"Slot available after: {iso(wall + wait)}, in {wait} seconds.")
        lines.append("Currently running queries (pid, space limit, time limit, start time):")
        for i, (space, limit, start) in sorted(running.items()):
            lines.append(f"{4000 + i}\t{space}\t{limit}\t{iso(start)}")
        return "\n".join(lines) + "\n"


SLOTS = web.AppKey("slots", Slots)


async def _query_text(request: web.Request) -> str | None:
    if request.method == "GET":
        return request.query.get("data")
    if request.content_type == "application/x-www-form-urlencoded" or request.content_type == "multipart/form-data":
        return (await request.post()).get("data")
    raw = await request.text()
    return raw[5:] if raw.startswith("data=") else raw or request.query.get("data")


HEAD = json.dumps(
    {"version": 0.6, "generator": GENERATOR, "osm3s": {"timestamp_osm_base": OSM_BASE, "copyright": COPYRIGHT}}
)[:-1]


def _body(elements: list[str], remark: str | None = None) -> bytes:
    """The JSON answer, from serialized elements (one per line, like the real server prints them)."""
    tail = f',\n"remark": {json.dumps(remark)}' if remark else ""
    listed = ",\n".join(elements)
    return f'{HEAD},\n"elements": [\n{listed}\n]{tail}\n}}\n'.encode()


def memory_remark(maxsize: int) -> str:
    return f"runtime error: Query run out of memory using about {max(1, maxsize >> 20)} MB of RAM."


def _break_geometry(elements: list[dict]) -> list[dict]:
    """Bow-tie every other building way, leave the others unclosed; unclose each relation's last outer member."""
    out = []
    buildings = 0
    for el in elements:
        if el["type"] == "way" and "building" in el.get("tags", {}) and len(el["geometry"]) >= 4:
            if buildings % 2 == 0:
                for key in ("geometry", "nodes"):
                    el[key][1], el[key][2] = el[key][2], el[key][1]
            else:
                del el["geometry"][-1], el["nodes"][-1]
            buildings += 1
        elif el["type"] == "relation":
            outers = [m for m in el["members"] if m["role"] == "outer"]
            if outers and len(outers[-1]["geometry"]) > 2:
                del outers[-1]["geometry"][-1]
        out.append(el)
    return out


def _drop_members(elements: list[dict]) -> list[dict]:
    """Each relation: its first member loses its geometry, and it gains a member the server does not have."""
    out = []
    for el in elements:
        if el["type"] == "relation":
            el["members"][0].pop("geometry", None)
            el["members"].append({"type": "way", "ref": el["id"] * 8 + 7, "role": "outer"})
        out.append(el)
    return out


def to_xml(elements: list[dict]) -> str:
    """The same answer in Overpass XML (what comes back when [out:json] is lost)."""
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<osm version="0.6" generator="{GENERATOR}">',
        f"<note>{COPYRIGHT}</note>",
        f'<meta osm_base="{OSM_BASE}"/>',
    ]
    for el in elements:
        b = el["bounds"]
        lines += [
            f'  <{el["type"]} id="{el["id"]}">',
            f'    <bounds minlat="{b["minlat"]}" minlon="{b["minlon"]}" '
            f'maxlat="{b["maxlat"]}" maxlon="{b["maxlon"]}"/>',
        ]
        for ref, point in zip(el.get("nodes", []), el.get("geometry", []), strict=False):
            lines.append(f'    <nd ref="{ref}" lat="{point["lat"]}" lon="{point["lon"]}"/>')
        for m in el.get("members", []):
            lines.append(f'    <member type="way" ref="{m["ref"]}" role="{m["role"]}">')
            lines += [f'      <nd lat="{p["lat"]}" lon="{p["lon"]}"/>' for p in m.get("geometry", [])]
            lines.append("    </member>")
        lines += [f"    <tag k={quoteattr(k)} v={quoteattr(v)}/>" for k, v in el.get("tags", {}).items()]
        lines.append(f"  </{el['type']}>")
    return "\n".join(lines + ["</osm>", ""])


async def interpreter(request: web.Request) -> web.StreamResponse:
    service, world, slots = request.app[SERVICE], request.app[WORLD], request.app[SLOTS]
    text = await _query_text(request)
    if not text or not text.strip():
        return osm3s_page(400, "line 1: parse error: No query found (send it as the form field 'data')")
    fault = service.pick(text, request[RECORD])
    try:
        query = parse(text)
    except QLError as exc:
        request[RECORD].fault = fault
        return osm3s_page(400, str(exc))
    knobs = service.knobs
    maxsize = query.maxsize(knobs.default_maxsize)
    slot = slots.acquire(knobs.slots, maxsize, query.timeout_s)
    if slot is None:
        return osm3s_page(429)
    try:
        response = await common_fault(request, service, fault, osm3s_page)
        if response is not None:
            return response
        outs = [s for s in query.program if isinstance(s, tuple)]
        if query.settings.get("out") != "json" or not outs or any("geom" not in modifiers for _, modifiers in outs):
            return osm3s_page(
                400, "line 1: static error: this fake answers only [out:json] queries printed with 'out geom'"
            )
        if knobs.query_s > 0:
            await asyncio.sleep(min(knobs.query_s, query.timeout_s))
        remark = None
        try:
            texts = [element_json(item) for printed in evaluate(query, world) for item in printed]
        except AreaTooLarge:
            texts, remark = [], memory_remark(maxsize)
        if knobs.query_s > query.timeout_s or fault == "timeout_remark":
            texts = texts[: len(texts) // 2]
            remark = f'runtime error: Query timed out in "query" at line 1 after {query.timeout_s} seconds.'
        elif fault == "memory_remark":
            texts, remark = [], memory_remark(maxsize)
        elif fault in ("missing_members", "bad_geometry", "wrong_content_type"):
            elements = [json.loads(t) for t in texts]
            if fault == "wrong_content_type":
                return web.Response(text=to_xml(elements), headers={"Content-Type": "application/osm3s+xml"})
            elements = _drop_members(elements) if fault == "missing_members" else _break_geometry(elements)
            texts = [json.dumps(el, separators=(",", ":")) for el in elements]
        body = _body(texts, remark)
        if len(body) > maxsize:  # the real server counts RAM, not bytes, but it fails the same way
            body = _body([], memory_remark(maxsize))
        if fault == "oversize":
            body = body.rstrip()[:-1] + b" " * max(0, knobs.oversize_bytes - len(body)) + b"}\n"
        elif fault == "malformed_json":
            body = body[: len(body) // 2]
        elif fault == "truncated":
            return await send_truncated(request, body, "application/json")
        return web.Response(body=body, headers={"Content-Type": "application/json"})
    finally:
        slots.release(slot, knobs.slot_cooldown_s)


async def status(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        client = str(int(ipaddress.ip_address(request.remote or "127.0.0.1")))
    except ValueError:
        client = request.remote or "unknown"
    text = request.app[SLOTS].status(service.knobs.slots, client)
    return web.Response(text=text, content_type="text/plain")


def overpass_app(service: Service, world: World) -> web.Application:
    app = web.Application(middlewares=[make_observer(service, lambda: osm3s_page(406))], client_max_size=16 << 20)
    app[SERVICE], app[WORLD], app[SLOTS] = service, world, Slots()
    app.router.add_route("*", "/api/interpreter", interpreter)
    app.router.add_get("/api/status", status)
    return app
