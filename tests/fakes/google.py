"""Fake Google Map Tiles API, 2D tiles (https://developers.google.com/maps/documentation/tile/2d-tiles-overview).

POST /v1/createSession?key=K with a JSON body (mapType, language, region required; highDpi, imageFormat optional)
answers {session, expiry (unix seconds, as a string), tileWidth, tileHeight, imageFormat}; GET
/v1/2dtiles/{z}/{x}/{y}?session=S&key=K answers the tile. Errors are Google's JSON envelope
{"error": {"code", "message", "status"}}: a bad or missing key is 403 PERMISSION_DENIED, an unknown session 400
INVALID_ARGUMENT, an expired one ``expired_session_status`` (401 UNAUTHENTICATED by default).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid

from aiohttp import web

from .faults import RECORD, SERVICE, Service, common_fault, make_observer
from .tiles import WORLD, answer_tile, tile_exists
from .world import World

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    406: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
MESSAGES = {
    403: "The provided API key is invalid.",
    404: "Tile not found.",
    429: "Quota exceeded for quota metric 'Tile requests' of service 'tile.googleapis.com'.",
    500: "Internal error encountered.",
    502: "The service is currently unavailable.",
    503: "The service is currently unavailable.",
    504: "The request timed out.",
}
MAP_TYPES = ("roadmap", "satellite", "terrain", "streetview")


def google_error(status: int, message: str | None = None) -> web.Response:
    body = {
        "error": {
            "code": status,
            "message": message or MESSAGES.get(status, "Error."),
            "status": STATUS_NAMES.get(status, "UNKNOWN"),
        }
    }
    return web.Response(status=status, text=json.dumps(body, indent=2), content_type="application/json")


class Sessions:
    """Issued session tokens (UUIDs, deterministic in the seed) and what each asked for."""

    def __init__(self, seed: int):
        self.seed = seed
        self._lock = threading.Lock()
        self._issued: dict[str, dict] = {}

    def create(self, lifetime_s: float, tile_px: int, image_format: str) -> tuple[str, float]:
        with self._lock:
            digest = hashlib.blake2b(f"{self.seed}|session|{len(self._issued)}".encode(), digest_size=16).digest()
            token = str(uuid.UUID(bytes=digest, version=4))
            expiry = time.time() + lifetime_s
            self._issued[token] = {"expiry": expiry, "tile_px": tile_px, "format": image_format}
        return token, expiry

    def get(self, token: str) -> dict | None:
        with self._lock:
            return self._issued.get(token)

    def expire_all(self) -> None:
        """Make every issued session expired now (as if two weeks had passed)."""
        with self._lock:
            for session in self._issued.values():
                session["expiry"] = min(session["expiry"], time.time() - 1)


SESSIONS = web.AppKey("sessions", Sessions)


def _key_error(request: web.Request) -> web.Response | None:
    key = request.query.get("key")
    if not key:
        return google_error(403, "The request is missing a valid API key.")
    if key != request.app[SERVICE].knobs.api_key:
        return google_error(403, "API key not valid. Please pass a valid API key.")
    return None


async def create_session(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    denied = _key_error(request)
    if denied is not None:
        return denied
    try:
        body = json.loads(await request.text())
    except ValueError:
        return google_error(400, "Invalid JSON payload received.")
    if not isinstance(body, dict):
        return google_error(400, "Invalid JSON payload received. Expected an object.")
    for field in ("mapType", "language", "region"):
        if not isinstance(body.get(field), str) or not body[field]:
            return google_error(400, f"Invalid request: '{field}' is required.")
    if body["mapType"] not in MAP_TYPES:
        return google_error(400, f"Invalid value at 'map_type' ({body['mapType']}).")
    request[RECORD].key = "createSession"
    fault = service.pick("createSession", request[RECORD]) if service.knobs.session_faults else None
    response = await common_fault(request, service, fault, google_error)
    if response is not None:
        return response
    knobs = service.knobs
    tile_px = 512 if body.get("highDpi") is True else knobs.tile_px
    image_format = body.get("imageFormat") or ("jpeg" if body["mapType"] == "satellite" else "png")
    if image_format not in ("jpeg", "png"):
        return google_error(400, f"Invalid value at 'image_format' ({image_format}).")
    token, expiry = request.app[SESSIONS].create(knobs.session_lifetime_s, tile_px, image_format)
    answer = {
        "session": token,
        "expiry": str(int(expiry)),
        "tileWidth": tile_px,
        "tileHeight": tile_px,
        "imageFormat": image_format,
    }
    return web.json_response(answer)


def _expired(service: Service) -> web.Response:
    status = service.knobs.expired_session_status
    return google_error(
        status,
        "The session token has expired. Create a new session."
        if status == 401
        else "Invalid session token: the session has expired.",
    )


async def tile(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    request[RECORD].key = "/".join(request.match_info[k] for k in "zxy")  # also for auth and session errors
    denied = _key_error(request)
    if denied is not None:
        return denied
    token = request.query.get("session")
    if not token:
        return google_error(400, "Invalid request: 'session' is required.")
    session = request.app[SESSIONS].get(token)
    if session is None:
        return google_error(400, "Invalid session token.")
    if session["expiry"] <= time.time():
        return _expired(service)
    try:
        z, x, y = (int(request.match_info[k]) for k in "zxy")
    except ValueError:
        return google_error(400, "Invalid tile coordinates.")
    if not tile_exists(service, z, x, y):
        return google_error(404)
    fault = service.pick(f"{z}/{x}/{y}", request[RECORD])
    if fault == "session_expired":
        request[RECORD].fault = fault
        return _expired(service)
    response = await common_fault(request, service, fault, google_error)
    if response is not None:
        return response
    return await answer_tile(request, fault, z, x, y, session["tile_px"], session["format"])


def google_app(service: Service, world: World) -> web.Application:
    app = web.Application(middlewares=[make_observer(service, lambda: google_error(406))])
    app[SERVICE], app[WORLD], app[SESSIONS] = service, world, Sessions(service.seed)
    app.router.add_post("/v1/createSession", create_session)
    app.router.add_get("/v1/2dtiles/{z}/{x}/{y}", tile)
    return app
