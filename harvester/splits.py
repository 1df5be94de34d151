"""The train/val/test split of a sample: a deterministic function of a coarse spatial block.

The block is the zoom-10 tile holding the sampled coordinate (about 30 km wide in France), so every zoom of one place
and its close neighbours share a split and the test split is spatially separate from training. About 80/10/10.
"""

from __future__ import annotations

import hashlib

from .tiles import tile_at

SPLIT_ZOOM = 10
SPLITS = ("train", "val", "test")


def split_of_block(x: int, y: int) -> str:
    """Split of the zoom-10 block (x, y): a stable hash (not Python's salted ``hash``) mapped to 80/10/10."""
    digest = hashlib.blake2b(f"{SPLIT_ZOOM}/{x}/{y}".encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 100
    if bucket < 80:
        return "train"
    if bucket < 90:
        return "val"
    return "test"


def split_for(lon: float, lat: float) -> str:
    tile = tile_at(lon, lat, SPLIT_ZOOM)
    return split_of_block(tile.x, tile.y)
