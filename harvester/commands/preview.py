"""``harvester preview --out FILE.png``: a contact sheet of stored samples (see :mod:`harvester.preview`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Settings, add_setting_flags
from ..splits import SPLITS

HELP = "contact sheet of stored samples, masks drawn over their tiles (PNG)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--zoom", type=int, help="only this zoom (default: an even mix of every zoom)")
    parser.add_argument("--split", choices=SPLITS, help="only this split (default: any)")
    parser.add_argument("--limit", type=int, default=24, help="tiles to draw (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="which samples: same seed, same sheet (default 0)")
    add_setting_flags(parser, ("DATABASE_URL",))


async def main(args: argparse.Namespace, settings: Settings) -> int:
    from ..preview import preview

    await preview(settings.database_url, args.out, zoom=args.zoom, split=args.split, limit=args.limit,
                  seed=args.seed)
    return 0
