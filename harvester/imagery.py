"""Checking a tile body before it is stored: a real 256x256 JPEG, PNG or WebP image, fully decodable, not blank.

The format is read from the body's first bytes (the magic numbers of JPEG, PNG and WebP: ISO/IEC 10918-1, RFC 2083,
the RIFF/WEBP container), never from a file name or the Content-Type header: providers send HTML error pages with
``image/jpeg`` and JPEG bytes in ``.png`` files. The whole image is decoded (``Image.load``), so a truncated or
corrupt body is refused here rather than in the trainer; Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False.

A body refused as an image raises :class:`BadTile` (counted as a failed attempt); an image that holds no imagery
(a uniform no-data tile, or a "no imagery here" notice on a uniform background) raises :class:`TileUnavailable`.
"""

from __future__ import annotations

import functools
import io
import struct
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import simplejpeg
from PIL import Image

from .errors import BadTile, TileUnavailable

TILE_SIZE = 256
#: Pixel limit for Pillow's decompression-bomb check, for the harvester and the trainer alike (harvester.decode takes
#: it from here). Process-wide (Pillow has only a global knob), so set in this one place; 4096^2 is far above any tile
#: and any image this project reads (the largest, a Dubai source image, is 2149 x 2062), and far below what would
#: exhaust memory.
MAX_IMAGE_PIXELS = 4096 * 4096
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

#: A tile is blank when at least BLANK_SHARE of its pixels are within BLANK_TOLERANCE (every channel) of the
#: per-channel most common value. Measured: real aerial tiles reach at most 0.87 (a Dubai tile, 84 % black no-data
#: padding next to sea and shore; calm dark sea alone 0.63), uniform tiles are 1.0 and a line of text on a uniform
#: background, even as a quality-50 JPEG, 0.958 or more (tests/unit/test_imagery.py).
BLANK_SHARE = 0.92
BLANK_TOLERANCE = 2

ImageFormat = Literal["jpeg", "png", "webp"]
PILLOW_FORMATS: dict[ImageFormat, str] = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
# What Pillow raises on malformed input, besides its own DecompressionBombError: its decoders are not consistent.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, ZeroDivisionError, struct.error,
                  Image.DecompressionBombError)


@dataclass(frozen=True, eq=False)
class ValidTile:
    """A checked tile: the bytes to store, their format, and the decoded image (256x256, RGB or premultiplied RGBa)."""

    data: bytes
    image_format: ImageFormat
    image: Image.Image = field(repr=False)

    @functools.cached_property
    def rgb(self) -> np.ndarray:
        """The decoded pixels (uint8, (256, 256, 3), RGB; transparent ones black), made on first use only.

        A harvest stores the bytes and never reads these: copying them out of Pillow costs about a quarter of the
        decode, so it is not done for every tile.
        """
        pixels = np.asarray(self.image)  # a copy
        return pixels if self.image.mode == "RGB" else np.ascontiguousarray(pixels[..., :3])  # RGBa: R, G, B


def sniff_format(body: bytes) -> ImageFormat | None:
    """The image format named by the body's magic number, or None."""
    if body[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if body[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "webp"
    return None


def validate_tile(body: bytes, content_type: str | None) -> ValidTile:
    """Check a provider's tile body; return it with its format and pixels, or raise BadTile / TileUnavailable.

    A 256x256 tile is stored as the provider sent it. A 512x512 tile (a "retina" provider) is reduced to 256x256 on
    purpose, by 2x2 area averaging, and re-encoded in its own format (JPEG quality 92, lossless PNG, WebP quality 92):
    only then is the stored image not the provider's bytes. Any other size is refused.

    One decode and one histogram of one channel: that is all a real tile costs (the blank test needs the other
    channels only when the first looks blank, and the pixels are copied out only when ``rgb`` is read). Measured by
    ``python -m bench.bench_cores``.
    """
    image_format = sniff_format(body)
    if image_format is None:
        raise BadTile(f"tile body is not a JPEG, PNG or WebP image (content type {content_type!r}, "
                      f"{len(body)} bytes, starting {_summary(body)})")
    try:
        # Not closed by a with block: the decoded image lives on in the ValidTile (a BytesIO holds no resource).
        image = Image.open(io.BytesIO(body), formats=[PILLOW_FORMATS[image_format]])
        if image.size not in ((TILE_SIZE, TILE_SIZE), (2 * TILE_SIZE, 2 * TILE_SIZE)):
            raise BadTile(f"{image_format} tile is {image.width}x{image.height} pixels, expected "
                          f"{TILE_SIZE}x{TILE_SIZE} (or {2 * TILE_SIZE}x{2 * TILE_SIZE}, which is reduced)")
        if image_format == "jpeg":
            # libjpeg-turbo in strict mode: Pillow only warns about corrupt entropy-coded data and returns grey
            # pixels (which would then pass as a blank tile); strict mode raises on it. One decode either way.
            rgb_image = Image.fromarray(simplejpeg.decode_jpeg(body, colorspace="RGB", strict=True))
        else:
            image.load()  # the full decode: truncated and corrupt data fail here, not in the trainer
            rgb_image = _to_rgb(image)
        if rgb_image.size != (TILE_SIZE, TILE_SIZE):
            if rgb_image.mode == "RGBa":
                rgb_image = Image.fromarray(np.asarray(rgb_image)[..., :3])
            # The stored pixels are those of the re-encoded bytes (JPEG and WebP are lossy): check those.
            return validate_tile(_reduce_and_encode(rgb_image, image_format), content_type)
        # Pillow counts in C straight from its own buffer; np.bincount would first widen the pixels to intp.
        red_histogram = np.array(rgb_image.getchannel(0).histogram(), dtype=np.int64)
    except _DECODE_ERRORS as exc:
        raise BadTile(f"{image_format} tile cannot be decoded ({len(body)} bytes, content type {content_type!r}): "
                      f"{type(exc).__name__}: {exc}") from exc
    tile = ValidTile(body, image_format, rgb_image)
    _refuse_blank(tile, red_histogram)
    return tile


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels, or RGBa ones (premultiplied: its R, G, B are the RGB pixels): transparent pixels become black.

    Premultiplying by alpha is compositing over opaque black, to the bit (Pillow's ``MULDIV255`` rounding equals its
    ``alpha_composite`` over black, for every colour and alpha), and leaves opaque pixels as they are: one pass,
    whatever the alpha channel holds.
    """
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return (image if image.mode == "RGBA" else image.convert("RGBA")).convert("RGBa")
    if image.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert would clip, not scale
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def blank_share(rgb: np.ndarray, histogram: np.ndarray | None = None) -> float:
    """The share of pixels within BLANK_TOLERANCE of the per-channel most common value (1.0 for a uniform tile).

    ``histogram`` (3 x 256 counts, as Pillow's ``Image.histogram``) saves recounting. When one channel alone has
    fewer than BLANK_SHARE of its values near its mode, the least such share is returned: an upper bound, and the
    answer for every real tile, which is what keeps this cheap.
    """
    if histogram is None:
        histogram = _histograms(rgb)
    near_mode = [_near_mode(channel) for channel in histogram]
    upper_bound = min(near_mode) / (rgb.shape[0] * rgb.shape[1])
    if upper_bound < BLANK_SHARE:
        return float(upper_bound)
    values = np.arange(256)
    near = np.ones(rgb.shape[:2], dtype=bool)
    for c, m in enumerate(histogram.argmax(axis=1)):
        near &= (np.abs(values - m) <= BLANK_TOLERANCE)[rgb[..., c]]
    return float(near.mean())


def _histograms(rgb: np.ndarray) -> np.ndarray:
    return np.stack([np.bincount(rgb[..., c].ravel(), minlength=256) for c in range(3)])


def _near_mode(histogram: np.ndarray) -> int:
    """How many values of one channel lie within BLANK_TOLERANCE of its mode."""
    mode = int(histogram.argmax())
    return int(histogram[max(mode - BLANK_TOLERANCE, 0):mode + BLANK_TOLERANCE + 1].sum())


def _refuse_blank(tile: ValidTile, red_histogram: np.ndarray) -> None:
    # The red channel alone bounds the share from above (blank_share): a real tile is decided here, with no more
    # than that histogram; only a tile that may be blank is counted in full.
    if _near_mode(red_histogram) < BLANK_SHARE * TILE_SIZE * TILE_SIZE:
        return
    histogram = _histograms(tile.rgb)
    share = blank_share(tile.rgb, histogram)
    if share >= BLANK_SHARE:
        colour = tuple(int(v) for v in histogram.argmax(axis=1))
        raise TileUnavailable(f"blank tile: {share:.1%} of pixels are within {BLANK_TOLERANCE} of the colour "
                              f"{colour} (threshold {BLANK_SHARE:.0%})")


def _reduce_and_encode(image: Image.Image, image_format: ImageFormat) -> bytes:
    out = io.BytesIO()
    reduced = image.reduce(2)  # 2x2 box average: the area rule, no ringing
    options = {"jpeg": {"quality": 92}, "png": {"compress_level": 6}, "webp": {"quality": 92}}[image_format]
    reduced.save(out, format=PILLOW_FORMATS[image_format], **options)
    return out.getvalue()


def _summary(body: bytes, limit: int = 32) -> str:
    """The body's first bytes, printable: enough to recognise an HTML page or a JSON error."""
    head = body[:limit]
    text = head.decode("ascii", errors="replace")
    shown = "".join(ch if ch.isprintable() else "." for ch in text)
    return f"{shown!r}{'...' if len(body) > limit else ''}" if body else "(empty body)"
