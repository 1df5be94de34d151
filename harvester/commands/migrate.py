"""``harvester migrate``: apply ``migrations/`` to ``DATABASE_URL`` (idempotent, safe to run concurrently)."""

from __future__ import annotations

import argparse
import logging

from .. import db
from ..config import Settings, add_setting_flags

log = logging.getLogger(__name__)

HELP = "apply migrations/ to DATABASE_URL (idempotent)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setting_flags(parser, ("DATABASE_URL",))


async def main(args: argparse.Namespace, settings: Settings) -> int:
    applied = await db.migrate(settings.database_url)
    log.info("migrations applied: %s", ", ".join(applied) if applied else "none (up to date)")
    return 0
