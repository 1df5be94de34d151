"""``harvester import-osm FILE.osm.pbf``: import the building footprints of an OSM extract into ``DATABASE_URL``.

The footprints become the active extract that ``HARVESTER_LABELS=extract`` reads (see :mod:`harvester.labels.extract`);
running it again with the same or a newer extract replaces them atomically. A missing, truncated or non-PBF file:
one line, exit status 2, the previous import untouched.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..config import Settings, add_setting_flags

log = logging.getLogger(__name__)

HELP = "import the building footprints of an OSM extract (.osm.pbf)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, metavar="FILE.osm.pbf", help="the extract, e.g. Geofabrik's france-latest.osm.pbf")
    p.add_argument("--node-cache", metavar="STORAGE",
                   help="pyosmium node location storage (default: sparse_file_array in a temporary file; "
                        "e.g. flex_mem for a small extract, or sparse_file_array,/big/disk/nodes.idx)")
    add_setting_flags(p, ("DATABASE_URL",))


async def main(args: argparse.Namespace, settings: Settings) -> int:
    from ..labels.extract import import_extract

    result = await import_extract(settings.database_url, args.file, node_cache=args.node_cache)
    rate = result.kept / result.seconds if result.seconds > 0 else 0.0
    print(f"imported {result.file_name}: kept {result.kept} footprints ({result.repaired} repaired), dropped "
          f"{sum(result.dropped.values())} {json.dumps(result.dropped, sort_keys=True)} in {result.seconds:.0f} s "
          f"({rate:.0f} footprints/s)")
    return 0
