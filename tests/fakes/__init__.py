"""Local stand-ins for the upstream services (imagery XYZ, IGN WMTS, Google Map Tiles, Overpass) and the synthetic
world they serve. See ``servers.FakeUpstreams`` for use in tests and ``__main__`` to run them as a process."""

from .faults import FAULTS, Knobs, max_in_window
from .servers import FakeUpstreams
from .world import World, tile_for

__all__ = ["FAULTS", "FakeUpstreams", "Knobs", "World", "max_in_window", "tile_for"]
