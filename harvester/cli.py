"""The ``harvester`` command line: a dispatch over :mod:`harvester.commands`, one module per command (``migrate``,
``run``, ``status``, ``export``, ``import-osm``, ``preview``, ``rebuild-instances``).

Every setting comes from its environment variable, and its flag wins over it (see ``harvester.config``). A bad setting
or input file prints one line naming it and exits with status 2; another failure of ours prints one line, exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from . import __version__
from .commands import COMMANDS
from .config import flags_from_args, load_settings
from .errors import ConfigError, HarvesterError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2, like our config errors
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="harvester", allow_abbrev=False,
                     description="Aerial tiles, OpenStreetMap building footprints and their masks, in PostgreSQL.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command in COMMANDS.items():
        # Subparsers refuse abbreviations too: --zoom would otherwise be taken silently as --zooms.
        command.add_arguments(sub.add_parser(name, help=command.HELP, allow_abbrev=False))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("rasterio").setLevel(max(logging.WARNING, logging.getLogger().level))  # GDAL's chatter
    try:
        settings = load_settings(flags=flags_from_args(args))
        return asyncio.run(COMMANDS[args.command].main(args, settings))
    except ConfigError as exc:
        print(f"harvester: error: {exc}", file=sys.stderr)
        return 2
    except HarvesterError as exc:
        print(f"harvester: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
