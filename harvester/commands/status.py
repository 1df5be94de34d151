"""``harvester status [--json]``: jobs by state and by zoom, and the active OSM extract."""

from __future__ import annotations

import argparse
import json

from ..config import Settings, add_setting_flags

HELP = "jobs by state and by zoom"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_setting_flags(parser, ("DATABASE_URL",))


async def main(args: argparse.Namespace, settings: Settings) -> int:
    # here, not at the top: every ``harvester`` command line imports this module
    from .. import db
    from ..labels.extract import active_extract
    from ..queue import counts

    conn = await db.connect(settings.database_url)
    try:
        result = await counts(conn)
        extract = await active_extract(conn)
    finally:
        await conn.close()
    if extract is not None:  # only then: the JSON keys stay those of SPEC.md on a database without an extract
        result["extract"] = extract
    print(json.dumps(result) if args.json else table(result))
    return 0


def table(result: dict) -> str:
    from ..queue import STATES

    lines = [f"{'zoom':>6} " + " ".join(f"{s:>11}" for s in STATES)]
    for zoom, c in result["by_zoom"].items():
        lines.append(f"{zoom:>6} " + " ".join(f"{c[s]:>11}" for s in STATES))
    lines.append(f"{'all':>6} " + " ".join(f"{result[s]:>11}" for s in STATES))
    extract = result.get("extract")
    if extract is None:
        lines.append("OSM extract: none imported (harvester import-osm FILE.osm.pbf)")
    else:
        replication = ", ".join(filter(None, [extract["replication_timestamp"] and
                                              f"replication {extract['replication_timestamp']}",
                                              extract["replication_sequence"] and
                                              f"sequence {extract['replication_sequence']}"]))
        lines.append(f"OSM extract: {extract['file_name']} ({replication or 'no replication state in its header'}),"
                     f" {extract['kept']} footprints kept, {extract['dropped']} dropped, imported"
                     f" {extract['imported_at']}")
    return "\n".join(lines)
