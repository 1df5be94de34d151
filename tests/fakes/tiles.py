"""Fake imagery servers: an XYZ tile server and IGN's WMTS (KVP GetTile, as data.geopf.fr/wmts serves it).

XYZ follows the slippy-map convention (https://wiki.openstreetmap.org/wiki/Slippy_map_tilenames): GET
/xyz/{z}/{x}/{y}.jpg, 404 outside coverage. WMTS follows OGC 07-057r7 KVP encoding: parameter names are
case-insensitive, errors are OWS 1.1 ExceptionReports; TILEMATRIXSET=PM is the Web Mercator set whose TILEROW and
TILECOL are the slippy-map y and x. IGN blanks sensitive sites: those tiles come back as white JPEGs.
"""

from __future__ import annotations

import hashlib
from xml.sax.saxutils import escape, quoteattr

from aiohttp import web

from .faults import RECORD, SERVICE, Service, common_fault, make_observer, nginx_error, send_truncated
from .osm import tile_bounds
from .render import blank
from .world import World

WORLD = web.AppKey("world", World)
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
EXTENSIONS = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png"}
BLANK_COLOURS = ((255, 255, 255), (0, 0, 0), (128, 128, 128))


def _meets(bounds, box) -> bool:
    return bounds[0] < box[2] and bounds[2] > box[0] and bounds[1] < box[3] and bounds[3] > box[1]


def tile_exists(service: Service, z: int, x: int, y: int) -> bool:
    """In the zoom range, on the grid, and meeting the coverage box."""
    knobs = service.knobs
    if not (knobs.min_zoom <= z <= knobs.max_zoom and 0 <= x < (1 << z) and 0 <= y < (1 << z)):
        return False
    return knobs.coverage is None or _meets(tile_bounds(z, x, y), knobs.coverage)


def corrupt(body: bytes, seed: str) -> bytes:
    """The image's header kept, everything after it replaced by (deterministic) garbage of the same length."""
    keep = body.find(b"\xff\xda") + 12 if body[:2] == b"\xff\xd8" else 33  # JPEG: up to the scan; PNG: IHDR
    garbage = bytearray()
    while len(garbage) < len(body) - keep:
        garbage += hashlib.blake2b(f"{seed}|{len(garbage)}".encode()).digest()
    return body[:keep] + bytes(garbage[: len(body) - keep]).replace(b"\xff\xd9", b"\x00\xd9")


async def answer_tile(request: web.Request, fault: str | None, z: int, x: int, y: int, size: int, fmt: str):
    """The encoded tile, with the image faults applied."""
    service, world = request.app[SERVICE], request.app[WORLD]
    content_type = CONTENT_TYPES[fmt]
    if fault == "blank":
        body = blank(size, BLANK_COLOURS[(x + y + z) % len(BLANK_COLOURS)], fmt)
    else:
        body = world.tile_bytes(z, x, y, size=size, fmt=fmt, quality=service.knobs.jpeg_quality)
    if fault == "corrupt_image":
        body = corrupt(body, f"{z}/{x}/{y}")
    elif fault == "cut_image":
        body = body[: len(body) // 2]
    elif fault == "truncated":
        return await send_truncated(request, body, content_type)
    elif fault == "wrong_content_type":
        content_type = "text/plain; charset=utf-8"
    return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "public, max-age=86400"})


async def xyz_tile(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    info = request.match_info
    y_text, _, ext = info["y"].partition(".")
    try:
        z, x, y = int(info["z"]), int(info["x"]), int(y_text)
    except ValueError:
        return nginx_error(404)
    request[RECORD].key = f"{z}/{x}/{y}"  # also on the answers given before the fault draw (404s)
    fmt = service.knobs.image_format
    if ext and EXTENSIONS.get(ext.lower()) != fmt or not tile_exists(service, z, x, y):
        return nginx_error(404)
    fault = service.pick(f"{z}/{x}/{y}", request[RECORD])
    response = await common_fault(request, service, fault, nginx_error)
    if response is not None:
        return response
    return await answer_tile(request, fault, z, x, y, 256, fmt)


def xyz_app(service: Service, world: World) -> web.Application:
    app = web.Application(middlewares=[make_observer(service, lambda: nginx_error(406))])
    app[SERVICE], app[WORLD] = service, world
    app.router.add_get("/xyz/{z}/{x}/{y}", xyz_tile)
    return app


# -- IGN WMTS --


def exception_report(status: int, code: str, text: str, locator: str | None = None) -> web.Response:
    """An OWS 1.1 ExceptionReport, as geopf answers bad WMTS requests."""
    where = f" locator={quoteattr(locator)}" if locator else ""
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<ExceptionReport xmlns="http://www.opengis.net/ows/1.1" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
        ' xsi:schemaLocation="http://www.opengis.net/ows/1.1 http://schemas.opengis.net/ows/1.1.0/owsExceptionReport.xsd"'
        ' version="1.0.0" xml:lang="en">\n'
        f"  <Exception exceptionCode={quoteattr(code)}{where}>\n"
        f"    <ExceptionText>{escape(text)}</ExceptionText>\n  </Exception>\n</ExceptionReport>\n"
    )
    return web.Response(status=status, body=xml.encode(), headers={"Content-Type": "application/xml"})


def ign_error(status: int) -> web.Response:
    if status in (403, 404, 406):
        return exception_report(status, "NoApplicableCode", f"HTTP {status}")
    return nginx_error(status)


EXPECTED = {
    "SERVICE": "WMTS",
    "REQUEST": "GetTile",
    "VERSION": "1.0.0",
    "STYLE": "normal",
    "TILEMATRIXSET": "PM",
    "FORMAT": "image/jpeg",
}


async def wmts(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    params = {k.upper(): v for k, v in request.query.items()}
    expected = {**EXPECTED, "LAYER": service.knobs.layer}
    for name in (
        "SERVICE",
        "REQUEST",
        "VERSION",
        "LAYER",
        "STYLE",
        "TILEMATRIXSET",
        "TILEMATRIX",
        "TILEROW",
        "TILECOL",
        "FORMAT",
    ):
        if name not in params:
            return exception_report(400, "MissingParameterValue", f"Missing parameter: {name}", name)
    for name, value in expected.items():
        if params[name] != value and not (name in ("SERVICE", "REQUEST") and params[name].lower() == value.lower()):
            code = "OperationNotSupported" if name == "REQUEST" else "InvalidParameterValue"
            return exception_report(400, code, f"{name} '{params[name]}' is not supported (expected {value})", name)
    try:
        z, y, x = int(params["TILEMATRIX"]), int(params["TILEROW"]), int(params["TILECOL"])
    except ValueError:
        return exception_report(400, "InvalidParameterValue", "TILEMATRIX, TILEROW and TILECOL must be integers")
    request[RECORD].key = f"{z}/{x}/{y}"
    knobs = service.knobs
    if not knobs.min_zoom <= z <= knobs.max_zoom:
        return exception_report(
            400, "InvalidParameterValue", f"TileMatrix '{z}' unknown for TileMatrixSet PM", "TILEMATRIX"
        )
    for name, value in (("TILEROW", y), ("TILECOL", x)):
        if not 0 <= value < (1 << z):
            return exception_report(400, "TileOutOfRange", f"{name} {value} out of range [0, {(1 << z) - 1}]", name)
    if not tile_exists(service, z, x, y):
        return exception_report(404, "TileOutOfRange", f"No data found for tile {z}/{y}/{x}", "TILEROW")
    fault = service.pick(f"{z}/{x}/{y}", request[RECORD])
    response = await common_fault(request, service, fault, ign_error)
    if response is not None:
        return response
    if any(_meets(tile_bounds(z, x, y), zone) for zone in knobs.blank_zones):
        return web.Response(body=blank(256, (255, 255, 255)), headers={"Content-Type": "image/jpeg"})
    return await answer_tile(request, fault, z, x, y, 256, "jpeg")


def ign_app(service: Service, world: World) -> web.Application:
    app = web.Application(middlewares=[make_observer(service, lambda: ign_error(406))])
    app[SERVICE], app[WORLD] = service, world
    app.router.add_get("/wmts", wmts)
    return app
