"""Settings: every one an environment variable (what docker compose passes) with a CLI flag that wins over it.

Parsed once at start into a frozen :class:`Settings`; a missing or malformed value raises :class:`ConfigError` naming
the variable. The Google key is kept out of ``repr``, logs and ``--help`` (it has no value flag: ``--google-api-key-file``
reads it from a file so it never shows in the process list).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlsplit

from . import DIST_NAME, PROJECT_URL, __version__
from .errors import ConfigError
from .tiles import parse_zooms as parse_zoom_list

log = logging.getLogger(__name__)

PROVIDERS = ("ign", "google", "xyz")
MAX_ZOOM = 22
#: IGN's ORTHOIMAGERY.ORTHOPHOTOS stops at zoom 19 (tile matrix set PM_0_19 since 2025; the very-high-resolution
#: layer was withdrawn): a deeper zoom would queue jobs that can only fail.
IGN_MAX_ZOOM = 19


def _int(name: str, text: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {text!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}: must be <= {maximum}, got {value}")
    return value


def _positive_float(name: str, text: str, maximum: float | None = None) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}: must be a positive number, got {text!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}: must be <= {maximum:g}, got {text!r}")
    return value


def parse_zooms(text: str, name: str = "HARVESTER_ZOOMS") -> tuple[int, ...]:
    try:
        return parse_zoom_list(text, minimum=1, maximum=MAX_ZOOM)  # zoom 0 would make one Overpass area of the whole world
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _url(name: str, text: str) -> str:
    if any(c.isspace() or ord(c) < 32 for c in text.strip()):
        raise ConfigError(f"{name}: a URL holds no spaces or control characters (percent-encode them), got {text!r}")
    try:
        parts = urlsplit(text.strip())
    except ValueError as exc:
        raise ConfigError(f"{name}: malformed URL {text!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: expected an http(s) URL, got {text!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ConfigError(f"{name}: malformed port in {text!r}") from None
    return text.strip()


def _tile_template(name: str, text: str) -> str:
    url = _url(name, text.replace("{z}", "0").replace("{x}", "0").replace("{y}", "0"))
    del url
    missing = [p for p in ("{z}", "{x}", "{y}") if p not in text]
    if missing:
        raise ConfigError(f"{name}: the template must contain {{z}}, {{x}} and {{y}}; missing {', '.join(missing)}")
    return text.strip()


def _path(name: str, text: str) -> Path:
    path = Path(text.strip())
    if not path.is_file():
        raise ConfigError(f"{name}: file {text!r} not found")
    return path


def _region(name: str, text: str):
    from .sampling import parse_region

    return parse_region(text.strip(), name)


def _points(name: str, text: str) -> Path:
    from .sampling import read_points_csv

    path = _path(name, text)
    read_points_csv(path, name)  # junk lines stop the program here, before anything is logged or written
    return path


def _raster(name: str, text: str) -> Path:
    import rasterio

    path = _path(name, text)
    try:
        with rasterio.open(path) as raster:
            if raster.crs is None:
                raise ConfigError(f"{name}: {text!r} has no coordinate reference system")
    except rasterio.errors.RasterioError as exc:
        raise ConfigError(f"{name}: cannot read {text!r} as a GeoTIFF: {exc}") from None
    return path


def _database_url(name: str, text: str) -> str:
    value = text.strip()
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ConfigError(f"{name}: malformed URL ({exc})") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{name}: expected a postgresql:// URL, got scheme {parts.scheme!r}")
    return value


def _provider(name: str, text: str) -> str:
    value = text.strip().lower()
    if value not in PROVIDERS:
        raise ConfigError(f"{name}: expected one of {', '.join(PROVIDERS)}, got {text!r}")
    return value


def _labels(name: str, text: str) -> str:
    from .labels import LABEL_SOURCES

    value = text.strip().lower()
    if value not in LABEL_SOURCES:
        raise ConfigError(f"{name}: expected one of {', '.join(LABEL_SOURCES)}, got {text!r}")
    return value


def _user_agent(name: str, text: str) -> str:
    value = text.strip()
    if not value or any(ord(c) < 32 for c in value):
        raise ConfigError(f"{name}: must be a non-empty single line naming the application and a contact")
    return value


def _key(name: str, text: str) -> str:
    value = text.strip()
    if any(c.isspace() for c in value):
        raise ConfigError(f"{name}: an API key holds no whitespace")
    return value


DEFAULT_USER_AGENT = f"{DIST_NAME}/{__version__} (+{PROJECT_URL})"


@dataclass(frozen=True)
class Setting:
    env: str
    flag: str
    default: str | None
    parse: Callable[[str, str], object]
    help: str
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("DATABASE_URL", "--database-url", "postgresql://postgres@localhost:5432/tiles", _database_url,
            "PostgreSQL (with PostGIS) connection URL"),
    Setting("HARVESTER_SAMPLES", "--samples", "1000", lambda n, t: _int(n, t, minimum=0),
            "coordinates to sample in this run (each gives one sample per zoom)"),
    Setting("HARVESTER_ZOOMS", "--zooms", "17,18", lambda n, t: parse_zooms(t, n), "comma-separated zoom levels"),
    Setting("HARVESTER_SEED", "--seed", "0", lambda n, t: _int(n, t), "seed of the coordinate sampler"),
    Setting("HARVESTER_REGION", "--region", "france", _region,
            "france | dep:75,92 | bbox:W,S,E,N"),
    Setting("HARVESTER_POINTS", "--points", None, _points, "CSV of lon,lat to harvest instead of sampling"),
    Setting("HARVESTER_POPULATION_RASTER", "--population-raster", None, _raster,
            "GeoTIFF of population counts used instead of the embedded data"),
    Setting("HARVESTER_TILE_PROVIDER", "--tile-provider", "ign", _provider, "ign | google | xyz"),
    Setting("HARVESTER_IGN_URL", "--ign-url", "https://data.geopf.fr/wmts", _url, "WMTS endpoint of the ign provider"),
    Setting("HARVESTER_GOOGLE_URL", "--google-url", "https://tile.googleapis.com", _url,
            "base URL of the Google Map Tiles API"),
    Setting("GOOGLE_MAPS_API_KEY", "--google-api-key-file", None, _key,
            "key of the google provider (the flag names a file holding it)", secret=True),
    Setting("HARVESTER_TILE_URL", "--tile-url", None, _tile_template, "template of the xyz provider, {z}/{x}/{y}"),
    Setting("HARVESTER_OVERPASS_URL", "--overpass-url", "https://overpass-api.de/api/interpreter", _url,
            "Overpass interpreter URL"),
    Setting("HARVESTER_TILE_RATE", "--tile-rate", "10", _positive_float, "tile requests per second, at most"),
    Setting("HARVESTER_TILE_CONCURRENCY", "--tile-concurrency", "8",
            lambda n, t: _int(n, t, minimum=1, maximum=256), "tile requests in flight, at most"),
    Setting("HARVESTER_OVERPASS_RATE", "--overpass-rate", "1", _positive_float,
            "Overpass requests per second, at most"),
    Setting("HARVESTER_OVERPASS_CONCURRENCY", "--overpass-concurrency", "1",
            lambda n, t: _int(n, t, minimum=1, maximum=16), "Overpass requests in flight, at most"),
    Setting("HARVESTER_USER_AGENT", "--user-agent", DEFAULT_USER_AGENT, _user_agent,
            "User-Agent sent to every upstream"),
    Setting("HARVESTER_MAX_ATTEMPTS", "--max-attempts", "5", lambda n, t: _int(n, t, minimum=1),
            "attempts per sample before it is marked failed"),
    Setting("HARVESTER_LABELS", "--labels", "overpass", _labels,
            "where building footprints come from: overpass | extract (imported by harvester import-osm)"),
    Setting("HARVESTER_REQUEST_TIMEOUT", "--request-timeout", "60", _positive_float,
            "seconds before one upstream request is abandoned"),
    Setting("HARVESTER_BACKOFF_BASE", "--backoff-base", "2", _positive_float,
            "seconds of the first retry delay (doubles per attempt, with jitter)"),
    Setting("HARVESTER_LEASE_SECONDS", "--lease-seconds", "120", lambda n, t: _positive_float(n, t, maximum=86400),
            "seconds a claimed job stays reserved without a heartbeat before another worker may take it"),
)


@dataclass(frozen=True)
class Settings:
    database_url: str
    samples: int
    zooms: tuple[int, ...]
    seed: int
    region: object  # harvester.sampling.Region
    points: Path | None
    population_raster: Path | None
    tile_provider: str
    ign_url: str
    google_url: str
    google_maps_api_key: str | None = field(repr=False)
    tile_url: str | None
    overpass_url: str
    tile_rate: float
    tile_concurrency: int
    overpass_rate: float
    overpass_concurrency: int
    user_agent: str
    max_attempts: int
    labels: str
    request_timeout: float
    backoff_base: float
    lease_seconds: float

    @property
    def overpass_query_timeout(self) -> int:
        """Overpass' own ``[timeout:]``: below the client's request timeout, so the server gives up first."""
        return max(1, int(self.request_timeout * 0.8))

    def public(self) -> dict[str, object]:
        """Non-secret values, for the start-up log line (the database password is redacted)."""
        from .db import redact_url

        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "google_maps_api_key":
                value = "set" if value else "unset"
            elif f.name == "database_url":
                value = redact_url(value)
            out[f.name] = str(value) if value is not None else None
        return out


def _attr(setting: Setting) -> str:
    return setting.env.lower().removeprefix("harvester_")


def load_settings(environ: Mapping[str, str] | None = None, flags: Mapping[str, str | None] | None = None) -> Settings:
    """Settings from ``environ`` (default ``os.environ``) overridden by CLI ``flags`` ({flag: text} of given flags)."""
    environ = os.environ if environ is None else environ
    flags = flags or {}
    values: dict[str, object] = {}
    given_as: dict[str, str] = {}
    for s in SETTINGS:
        text = flags.get(s.flag)
        name = s.flag if text is not None else s.env
        if text is not None and s.secret:
            text = _read_secret_file(s.flag, text)
        if text is None:
            text = environ.get(s.env)
            if text is not None and text.strip() == "" and s.default is None:
                text = None  # an empty optional variable (docker compose passes "") means unset
        if text is None:
            text = s.default
        given_as[s.env] = name
        values[_attr(s)] = None if text is None else s.parse(name, text)
    settings = Settings(**values)
    if settings.tile_provider == "google" and not settings.google_maps_api_key:
        raise ConfigError("GOOGLE_MAPS_API_KEY: required by HARVESTER_TILE_PROVIDER=google")
    if settings.tile_provider == "ign" and settings.zooms[-1] > IGN_MAX_ZOOM:
        raise ConfigError(f"{given_as['HARVESTER_ZOOMS']}: the ign provider (ORTHOIMAGERY.ORTHOPHOTOS) serves zooms up "
                          f"to {IGN_MAX_ZOOM}, got {settings.zooms[-1]}")
    if settings.tile_provider == "xyz" and not settings.tile_url:
        raise ConfigError("HARVESTER_TILE_URL: required by HARVESTER_TILE_PROVIDER=xyz")
    if settings.request_timeout < 2:
        raise ConfigError(f"{given_as['HARVESTER_REQUEST_TIMEOUT']}: must be at least 2 seconds"
                          " (Overpass' own timeout stays below it)")
    return settings


def _read_secret_file(flag: str, path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read the key file: {exc.strerror}") from None


def add_setting_flags(parser, names: tuple[str, ...] | None = None) -> None:
    """Add the flag of every setting (or of the named env variables) to an argparse parser."""
    for s in SETTINGS:
        if names is not None and s.env not in names:
            continue
        default = "" if s.secret or s.default is None else f" (default {s.default})"
        parser.add_argument(s.flag, dest=s.flag, default=None, metavar="FILE" if s.secret else "VALUE",
                            help=f"{s.help}; env {s.env}{default}")


def flags_from_args(args) -> dict[str, str]:
    return {s.flag: getattr(args, s.flag) for s in SETTINGS if getattr(args, s.flag, None) is not None}
