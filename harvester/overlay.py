"""Pictures of tiles and masks (Pillow and numpy only): a mask drawn over its tile, the confusion of a prediction
against the truth in three colours, captions, and atomic PNG writes.

Shared by ``harvester preview`` (stored masks over their tiles), ``trainer predict --overlay`` (predicted buildings
over the input tile) and ``trainer evaluate --report`` (truth, prediction, TP/FP/FN). Arrays are RGB ``uint8``
``[H, W, 3]`` and masks anything whose nonzero pixels are buildings.

Colours are solid where they carry meaning (an outline pixel, a TP/FP/FN pixel is exactly its colour), so a picture can
be read back and checked pixel by pixel.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OUTLINE_COLOUR = (0, 255, 255)  # building outlines: cyan, visible on red and orange roofs, vegetation and asphalt
TINT_ALPHA = 0.3  # share of OUTLINE_COLOUR blended into the inside of a building

TP_COLOUR = (0, 200, 120)  # true positive: building, found (green)
FP_COLOUR = (255, 120, 0)  # false positive: predicted building where there is none (orange)
FN_COLOUR = (170, 60, 255)  # false negative: building the prediction missed (purple)
CONFUSION_BACKGROUND = 0.5  # the tile under a confusion picture: grey, at this share of its brightness


def outline(mask: np.ndarray) -> np.ndarray:
    """The building pixels with a 4-neighbour outside the building: bool, the mask's shape.

    The tile's edge does not count as outside: a building cut by the edge is not outlined along it.
    """
    inside = np.asarray(mask) != 0
    padded = np.pad(inside, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inside & ~interior


def draw_mask(image: np.ndarray, mask: np.ndarray, *, colour: tuple[int, int, int] = OUTLINE_COLOUR,
              tint: float = TINT_ALPHA) -> np.ndarray:
    """``image`` with the buildings of ``mask`` tinted (``tint`` of ``colour``) and outlined in ``colour``.

    Pixels outside the buildings are the image's own; outline pixels are exactly ``colour``.
    """
    inside = np.asarray(mask) != 0
    out = np.array(image, dtype=np.uint8, copy=True)
    if tint > 0:
        blended = (1 - tint) * out[inside] + tint * np.asarray(colour, dtype=np.float64)
        out[inside] = np.rint(blended).astype(np.uint8)
    out[outline(inside)] = colour
    return out


def confusion_picture(image: np.ndarray, truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The tile in dimmed grey, with true positives in TP_COLOUR, false positives in FP_COLOUR and false negatives in
    FN_COLOUR (true negatives keep the grey tile)."""
    truth, predicted = np.asarray(truth) != 0, np.asarray(predicted) != 0
    grey = np.asarray(image, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
    out = np.repeat(np.rint(grey * CONFUSION_BACKGROUND).astype(np.uint8)[..., None], 3, axis=2)
    out[truth & predicted] = TP_COLOUR
    out[~truth & predicted] = FP_COLOUR
    out[truth & ~predicted] = FN_COLOUR
    return out


@functools.lru_cache(maxsize=8)
def font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own font (DejaVu-like, shipped with Pillow; no system font needed) at ``size`` pixels."""
    return ImageFont.load_default(size=size)


def text_width(draw: ImageDraw.ImageDraw, text: str, size: int) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font(size))
    return int(right - left)


def save_png(picture: np.ndarray | Image.Image, path: Path | str) -> Path:
    """Write a PNG atomically (a temporary file renamed into place): a reader never sees half of one."""
    path = Path(path)
    image = picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture, dtype=np.uint8))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG", optimize=True)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
