"""harvester: population-weighted aerial tiles and OpenStreetMap building masks into PostGIS."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tilesmith")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

DIST_NAME = "tilesmith"
PROJECT_URL = "https://github.com/tilesmith/tilesmith"
