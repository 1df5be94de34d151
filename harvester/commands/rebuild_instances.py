"""``harvester rebuild-instances``: the ``instances`` of samples stored without them (harvested before migration
0005), rebuilt from the footprints stored for their areas by the rule the harvest uses
(:func:`harvester.worker.tile_labels`).

A rebuilt map is stored only when it agrees with the sample's stored mask (nonzero exactly where the mask is); a sample
whose footprints no longer give its mask is left NULL and counted. Samples of external data sets (``trainer.datasets``:
no footprints) stay NULL. Batches of ``--batch-size`` samples, one UPDATE each; safe to interrupt and run again.
"""

from __future__ import annotations

import argparse
import logging

from ..config import Settings, add_setting_flags

log = logging.getLogger(__name__)

HELP = "rebuild the instance maps of samples stored without them, from their stored footprints"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=500, help="samples per batch (default 500)")
    add_setting_flags(parser, ("DATABASE_URL",))


async def main(args: argparse.Namespace, settings: Settings) -> int:
    counts = await rebuild_instances(settings.database_url, batch_size=max(1, args.batch_size))
    log.info("instances: %d rebuilt, %d left NULL (their footprints no longer give their mask)", counts["rebuilt"],
             counts["mismatched"])
    return 0


async def rebuild_instances(dsn: str, *, batch_size: int = 500) -> dict[str, int]:
    import numpy as np  # here, not at the top: every ``harvester`` command line imports this module

    from .. import db
    from ..decode import decode_mask
    from ..rasterize import encode_instances_png
    from ..sql import queries
    from ..store import load_buildings
    from ..tiles import Tile
    from ..worker import tile_labels

    sql = queries("store")
    counts = {"rebuilt": 0, "mismatched": 0}
    conn = await db.connect(dsn)
    try:
        after = 0
        while rows := await conn.fetch(sql["samples_without_instances"], after, batch_size):
            footprints: dict[int, list] = {}
            ids, pngs = [], []
            for r in rows:
                if r["area_id"] not in footprints:
                    footprints[r["area_id"]] = await load_buildings(conn, r["area_id"])
                instances = tile_labels(footprints[r["area_id"]], Tile(r["tile_x"], r["tile_y"], r["zoom"])).instances
                if not np.array_equal(instances != 0, decode_mask(r["mask"]).astype(bool)):
                    log.warning("sample %d: its stored footprints no longer give its mask; instances left NULL",
                                r["sample_id"])
                    counts["mismatched"] += 1
                    continue
                ids.append(r["sample_id"])
                pngs.append(encode_instances_png(instances))
            await conn.execute(sql["set_instances"], ids, pngs)
            counts["rebuilt"] += len(ids)
            after = rows[-1]["sample_id"]
            log.info("instances: %d rebuilt so far", counts["rebuilt"])
    finally:
        await conn.close()
    return counts
