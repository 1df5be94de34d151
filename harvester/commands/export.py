"""``harvester export --zoom Z --out DIR``: the samples of one zoom as ``.npz`` batches (see :mod:`harvester.export`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import Settings, add_setting_flags
from ..errors import ConfigError
from ..splits import SPLITS

log = logging.getLogger(__name__)

HELP = "write the samples of one zoom as .npz batches"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zoom", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--split", choices=SPLITS, help="only this split (default: each split to its own files)")
    add_setting_flags(parser, ("DATABASE_URL",))


async def main(args: argparse.Namespace, settings: Settings) -> int:
    from ..export import export

    if args.batch_size < 1:
        raise ConfigError("--batch-size: must be >= 1")
    written = await export(settings.database_url, args.zoom, args.out, batch_size=args.batch_size,
                           splits=(args.split,) if args.split else SPLITS)
    log.info("exported %s", ", ".join(f"{k}={v}" for k, v in written.items()))
    return 0
