"""The ``harvester`` command line: ``migrate``, ``run``, ``status``, ``export``, ``import-osm``, ``preview``.

Every setting comes from its environment variable, and its flag wins over it (see ``harvester.config``). A bad setting
prints one line naming it and exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from . import __version__, db, import_osm
from .config import Settings, add_setting_flags, flags_from_args, load_settings
from .errors import ConfigError, HarvesterError
from .splits import SPLITS

log = logging.getLogger("harvester")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2, like our config errors
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="harvester", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # Subparsers must refuse abbreviations too: --zoom would otherwise be taken silently as --zooms.
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, allow_abbrev=False, **k)

    p = sub.add_parser("migrate", help="apply migrations/ to DATABASE_URL (idempotent)")
    add_setting_flags(p, ("DATABASE_URL",))

    p = sub.add_parser("run", help="sample coordinates, queue their tiles and harvest them")
    add_setting_flags(p)

    p = sub.add_parser("status", help="jobs by state and by zoom")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_setting_flags(p, ("DATABASE_URL",))

    p = sub.add_parser("export", help="write the samples of one zoom as .npz batches")
    p.add_argument("--zoom", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--split", choices=SPLITS, help="only this split (default: each split to its own files)")
    add_setting_flags(p, ("DATABASE_URL",))

    import_osm.add_parser(sub)

    p = sub.add_parser("preview", help="contact sheet of stored samples, masks drawn over their tiles (PNG)")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--zoom", type=int, help="only this zoom (default: an even mix of every zoom)")
    p.add_argument("--split", choices=SPLITS, help="only this split (default: any)")
    p.add_argument("--limit", type=int, default=24, help="tiles to draw (default 24)")
    p.add_argument("--seed", type=int, default=0, help="which samples: same seed, same sheet (default 0)")
    add_setting_flags(p, ("DATABASE_URL",))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("rasterio").setLevel(max(logging.WARNING, logging.getLogger().level))  # GDAL's chatter
    try:
        settings = load_settings(flags=flags_from_args(args))
        if args.command == "export" and args.batch_size < 1:
            raise ConfigError("--batch-size: must be >= 1")
        return asyncio.run(_dispatch(args, settings))
    except ConfigError as exc:
        print(f"harvester: error: {exc}", file=sys.stderr)
        return 2
    except HarvesterError as exc:
        print(f"harvester: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "migrate":
        applied = await db.migrate(settings.database_url)
        log.info("migrations applied: %s", ", ".join(applied) if applied else "none (up to date)")
        return 0
    if args.command == "import-osm":
        return await import_osm.main(args, settings)
    if args.command == "status":
        from .labels.extract import active_extract
        from .queue import counts

        conn = await db.connect(settings.database_url)
        try:
            result = await counts(conn)
            extract = await active_extract(conn)
        finally:
            await conn.close()
        if extract is not None:  # only then: the JSON keys stay those of SPEC.md on a database without an extract
            result["extract"] = extract
        print(json.dumps(result) if args.json else _status_table(result))
        return 0
    if args.command == "export":
        from .export import export

        written = await export(settings.database_url, args.zoom, args.out, batch_size=args.batch_size,
                               splits=(args.split,) if args.split else SPLITS)
        log.info("exported %s", ", ".join(f"{k}={v}" for k, v in written.items()))
        return 0
    if args.command == "preview":
        from .preview import preview

        await preview(settings.database_url, args.out, zoom=args.zoom, split=args.split, limit=args.limit,
                      seed=args.seed)
        return 0
    from .run import harvest, install_signal_handlers

    log.info("settings: %s", json.dumps(settings.public()))
    stop = asyncio.Event()
    install_signal_handlers(stop)
    final = await harvest(settings, stop)
    log.info("finished: %s", json.dumps({k: v for k, v in final.items() if k != "by_zoom"}))
    return 0


def _status_table(result: dict) -> str:
    states = ("pending", "in_progress", "done", "failed", "skipped")
    lines = [f"{'zoom':>6} " + " ".join(f"{s:>11}" for s in states)]
    for zoom, c in result["by_zoom"].items():
        lines.append(f"{zoom:>6} " + " ".join(f"{c[s]:>11}" for s in states))
    lines.append(f"{'all':>6} " + " ".join(f"{result[s]:>11}" for s in states))
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
