"""``harvester run``: sample coordinates, queue their tiles and harvest them (see :mod:`harvester.run`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

from ..config import Settings, add_setting_flags

log = logging.getLogger(__name__)

HELP = "sample coordinates, queue their tiles and harvest them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setting_flags(parser)


async def main(args: argparse.Namespace, settings: Settings) -> int:
    from ..run import harvest, install_signal_handlers

    log.info("settings: %s", json.dumps(settings.public()))
    stop = asyncio.Event()
    install_signal_handlers(stop)
    final = await harvest(settings, stop)
    log.info("finished: %s", json.dumps({k: v for k, v in final.items() if k != "by_zoom"}))
    return 0
