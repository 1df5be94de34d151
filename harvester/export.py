"""``harvester export``: the samples of one zoom as NumPy batches ``DIR/z{Z}_{split}_{k}.npz`` with ``images`` uint8
[N,256,256,3] and ``masks`` uint8 [N,256,256] (0/1), in ``sample_id`` order, streamed (memory bounded by a batch)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from . import db
from .decode import decode_mask
from .splits import SPLITS

log = logging.getLogger(__name__)


def decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


async def export(database_url: str, zoom: int, out: Path, *, batch_size: int = 256,
                 splits: tuple[str, ...] = SPLITS) -> dict[str, int]:
    """Write the batches; return the number of samples written per split."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    conn = await db.connect(database_url)
    try:
        for split in splits:
            written[split] = 0
            k = 0
            async with conn.transaction():
                cursor = conn.cursor("SELECT image, mask FROM dataset WHERE zoom = $1 AND split = $2"
                                     " ORDER BY sample_id", zoom, split, prefetch=batch_size)
                images, masks = [], []
                async for row in cursor:
                    images.append(decode_rgb(row["image"]))
                    masks.append(decode_mask(row["mask"]))
                    if len(images) == batch_size:
                        _write(out / f"z{zoom}_{split}_{k}.npz", images, masks)
                        written[split] += len(images)
                        k += 1
                        images, masks = [], []
                if images:
                    _write(out / f"z{zoom}_{split}_{k}.npz", images, masks)
                    written[split] += len(images)
    finally:
        await conn.close()
    return written


def _write(path: Path, images: list[np.ndarray], masks: list[np.ndarray]) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=np.stack(images), masks=np.stack(masks))
    tmp.replace(path)  # a reader never sees a half-written batch
    log.info("wrote %s (%d samples)", path, len(images))
