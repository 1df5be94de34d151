"""``harvester preview``: a contact sheet of stored samples, each tile with its mask tinted and outlined over it and a
caption (sample id, zoom, split, building cover, buildings).

What is drawn is a deterministic sample of the ``dataset`` view: within each zoom the samples are ranked by
``md5(seed:sample_id)``, and the sheet takes rank 1 of every zoom, then rank 2 of every zoom, and so on, up to
``limit`` (an even mix of the zooms; the same seed and data give the same sheet). Choosing reads only the ids and
zooms of the selection; the images and masks are then read for the chosen ids only, so a sheet of a table of
millions costs one pass over its ids and ``limit`` images. Tiles are decoded by :mod:`harvester.decode` (the trainer's
own decoders, no JAX); one that does not decode is drawn as a grey cell saying why.
"""

from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .decode import TILE_SIZE, DecodeError, decode_image, decode_mask

from . import db
from .errors import ConfigError
from .overlay import draw_mask, font, save_png

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 24
MAX_LIMIT = 1000
COLUMNS = 6  # at least; a sheet of more than 36 tiles gets about sqrt(n) columns
GAP = 6
MARGIN = 10
CAPTION = 34  # two lines of FONT_SIZE under each tile
HEADER = 26
FONT_SIZE = 13
BACKGROUND = (28, 28, 30)
TEXT = (235, 235, 235)
MUTED = (160, 160, 165)
NO_IMAGE = (70, 70, 74)

_PICK_SQL = """
SELECT sample_id, zoom, count(*) OVER () AS matching
FROM (SELECT sample_id, zoom,
             row_number() OVER (PARTITION BY zoom ORDER BY md5($3::text || ':' || sample_id::text), sample_id) AS rank
      FROM dataset
      WHERE ($1::integer IS NULL OR zoom = $1) AND ($2::text IS NULL OR split = $2)) ranked
ORDER BY rank, zoom
LIMIT $4
"""
_ROWS_SQL = """
SELECT sample_id, zoom, split, image, mask, building_pixels, building_count
FROM dataset WHERE sample_id = ANY($1::bigint[])
"""


async def preview(database_url: str, out: Path, *, zoom: int | None = None, split: str | None = None,
                  limit: int = DEFAULT_LIMIT, seed: int = 0) -> dict:
    """Draw the contact sheet into ``out`` (PNG); return ``{"drawn", "matching", "out"}``.

    No sample matching ``zoom`` / ``split``: :class:`ConfigError` (the CLI's exit 2).
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise ConfigError(f"--limit: expected 1..{MAX_LIMIT}, got {limit}")
    conn = await db.connect(database_url)
    try:
        picked = await conn.fetch(_PICK_SQL, zoom, split, str(seed), limit)
        if not picked:
            raise ConfigError(f"no sample to preview: the dataset view holds no sample of {_selection(zoom, split)}"
                              " (harvest first with `harvester run`, or change --zoom / --split)")
        rows = {r["sample_id"]: r for r in await conn.fetch(_ROWS_SQL, [r["sample_id"] for r in picked])}
    finally:
        await conn.close()
    # by zoom, then by rank: each zoom's tiles together; a row that left the view since the pick is not drawn
    order = sorted(range(len(picked)), key=lambda i: (picked[i]["zoom"], i))
    samples = [rows[picked[i]["sample_id"]] for i in order if picked[i]["sample_id"] in rows]
    matching = picked[0]["matching"]
    title = (f"{len(samples)} of {matching:,} samples of {_selection(zoom, split)}, seed {seed}"
             "   (cyan: building mask)")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_png(contact_sheet(samples, title), out)
    except OSError as exc:
        raise ConfigError(f"--out: cannot write {out}: {exc.strerror or exc}") from None
    log.info("preview: drew %d of %d samples into %s", len(samples), matching, out)
    return {"drawn": len(samples), "matching": matching, "out": str(out)}


def contact_sheet(samples: list, title: str) -> Image.Image:
    """A grid of tiles (mask over each) with their captions, under a one-line title."""
    n = len(samples)
    columns = max(1, min(n, max(COLUMNS, math.ceil(math.sqrt(n)))))
    rows = math.ceil(n / columns)
    cell_w, cell_h = TILE_SIZE, TILE_SIZE + CAPTION
    width = 2 * MARGIN + columns * cell_w + (columns - 1) * GAP
    height = 2 * MARGIN + HEADER + rows * cell_h + (rows - 1) * GAP
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((MARGIN, MARGIN), title, fill=TEXT, font=font(FONT_SIZE + 2))
    for k, sample in enumerate(samples):
        row, column = divmod(k, columns)
        x = MARGIN + column * (cell_w + GAP)
        y = MARGIN + HEADER + row * (cell_h + GAP)
        tile, problem = _tile(sample)
        sheet.paste(Image.fromarray(tile), (x, y))
        if problem:
            draw.multiline_text((x + 8, y + 8), "\n".join(textwrap.wrap(problem, 34)[:8]), fill=TEXT,
                                font=font(FONT_SIZE))
        cover = sample["building_pixels"] / (TILE_SIZE * TILE_SIZE)
        draw.text((x, y + TILE_SIZE + 3), f"#{sample['sample_id']}   z{sample['zoom']}   {sample['split']}",
                  fill=TEXT, font=font(FONT_SIZE))
        draw.text((x, y + TILE_SIZE + 3 + FONT_SIZE + 3),
                  f"cover {cover:.1%}   {_buildings(sample['building_count'])}", fill=MUTED, font=font(FONT_SIZE))
    return sheet


def _tile(sample) -> tuple[np.ndarray, str | None]:
    """The tile with its mask drawn over it, or a grey cell and the reason it cannot be shown."""
    try:
        image = decode_image(sample["image"])
    except DecodeError as exc:
        return np.full((TILE_SIZE, TILE_SIZE, 3), NO_IMAGE, np.uint8), f"image does not decode: {exc}"
    try:
        mask = decode_mask(sample["mask"])
    except DecodeError as exc:
        return np.asarray(image), f"mask does not decode: {exc}"
    return draw_mask(image, mask), None


def _selection(zoom: int | None, split: str | None) -> str:
    return f"zoom {zoom if zoom is not None else 'any'}, split {split or 'any'}"



def _buildings(count: int) -> str:
    return f"{count} building{'' if count == 1 else 's'}"
