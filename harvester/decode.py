"""Decoding of stored samples: tile images (JPEG, PNG, WebP) to RGB ``uint8``, mask PNGs to 0/1 ``uint8`` and
instance PNGs to ``uint16``. The one reader of the data set's columns: the trainer's input pipeline, ``harvester
preview``, ``export`` and ``rebuild-instances`` all decode through it.

Pure functions without I/O, safe to call from several threads at once. JPEG goes through simplejpeg
(libjpeg-turbo, releases the GIL), PNG and WebP through Pillow (whose decoders release the GIL too).

The format is read from the bytes themselves, not from the stored ``image_format`` nor from a file name: some
providers serve JPEG bytes under a ``.png`` name (see ``shared/data/README.md``, kampala-oam).

Every failure (corrupt or truncated bytes, unknown format, wrong size, decompression bomb) raises
:class:`DecodeError` with the cause chained, never returns a partial image.
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image

# One home for the format rule, the tile size and Pillow's process-wide pixel limit (set by harvester.imagery).
from .imagery import PILLOW_FORMATS, TILE_SIZE, sniff_format


class DecodeError(ValueError):
    """Bytes that are not a decodable image or mask of the expected size. The message says which and why."""


def decode_image(data: bytes, size: int = TILE_SIZE) -> np.ndarray:
    """Decode a JPEG, PNG or WebP tile to a C-contiguous ``uint8`` array ``[size, size, 3]`` (RGB; may be read-only).

    Grey, palette, grey+alpha, RGBA, CMYK and 16-bit inputs are converted to RGB; an alpha channel is dropped (not
    composited). Raises :class:`DecodeError` when the bytes are not such an image or it is not ``size`` x ``size``.
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise DecodeError(f"image is not JPEG, PNG or WebP (starts with {bytes(data[:8])!r})")
    if fmt == "jpeg":
        try:
            return _decode_jpeg(data, size)
        except _FallbackToPillow:
            pass  # a colour space libjpeg-turbo cannot convert to RGB (CMYK, YCCK): Pillow can
    with _open_pillow(data, fmt, size, what="image") as image:
        try:
            if image.mode != "RGB":
                image = image.convert("RGB")
            return np.asarray(image)
        except Exception as exc:  # any decoder failure is a corrupt image; the cause is chained
            raise DecodeError(f"{fmt} image does not decode: {exc}") from exc


def decode_mask(data: bytes, size: int = TILE_SIZE) -> np.ndarray:
    """Decode a mask PNG to a ``uint8`` array ``[size, size]`` of 0/1 (SPEC: nonzero = building).

    One-channel masks (``1``, ``L``, ``P`` by palette index, ``I``, ``I;16``) are read directly; for ``LA`` the
    grey band is used, for ``RGB``/``RGBA`` a pixel is building when any colour channel is nonzero.
    """
    if sniff_format(data) != "png":
        raise DecodeError(f"mask is not a PNG (starts with {bytes(data[:8])!r})")
    with _open_pillow(data, "png", size, what="mask") as image:
        try:
            if image.mode in ("LA", "PA"):
                image = image.getchannel(0)
            elif image.mode in ("RGBA", "RGBX"):
                image = image.convert("RGB")
            values = np.asarray(image)
        except Exception as exc:  # any decoder failure is a corrupt mask; the cause is chained
            raise DecodeError(f"mask PNG does not decode: {exc}") from exc
    building = np.not_equal(values, 0)
    if building.ndim == 3:
        building = building.any(axis=2)
    return building.view(np.uint8)


def decode_instances(data: bytes, size: int = TILE_SIZE) -> np.ndarray:
    """Decode an ``instances`` PNG (SPEC: 16-bit grey, 0 = background, k = k-th footprint) to ``uint16 [size, size]``.

    The one reader of instance PNGs (the harvest checks use it too): a bad row raises :class:`DecodeError`, the size
    is checked, and the harvester's GIS stack is not imported on a GPU host.
    """
    if sniff_format(data) != "png":
        raise DecodeError(f"instances is not a PNG (starts with {bytes(data[:8])!r})")
    with _open_pillow(data, "png", size, what="instances") as image:
        if image.mode not in ("I;16", "I;16B", "I"):
            raise DecodeError(f"instances PNG is {image.mode}, expected 16-bit grey")
        try:
            return np.asarray(image).astype(np.uint16)
        except Exception as exc:  # any decoder failure is a corrupt PNG; the cause is chained
            raise DecodeError(f"instances PNG does not decode: {exc}") from exc


class _FallbackToPillow(Exception):
    """simplejpeg read the header but cannot produce RGB from this JPEG's colour space."""


# Colour spaces that libjpeg-turbo decodes to RGB itself; others (CMYK, YCCK) go to Pillow.
_TURBO_COLOURSPACES = frozenset({"Gray", "YCbCr", "RGB"})


def _decode_jpeg(data: bytes, size: int) -> np.ndarray:
    try:
        height, width, colourspace, _subsampling = simplejpeg.decode_jpeg_header(data)
    except ValueError as exc:
        raise DecodeError(f"jpeg header does not decode: {exc}") from exc
    if (width, height) != (size, size):
        raise DecodeError(f"jpeg image is {width}x{height}, expected {size}x{size}")
    if colourspace not in _TURBO_COLOURSPACES:
        raise _FallbackToPillow(colourspace)
    try:
        # strict: a truncated or corrupt stream raises instead of returning grey-filled rows.
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError as exc:
        raise DecodeError(f"jpeg image does not decode: {exc}") from exc


def _open_pillow(data: bytes, fmt: str, size: int, *, what: str) -> Image.Image:
    """Open with Pillow, restricted to the sniffed format, and check the header's size before any pixel is decoded."""
    # Image.open reads the header only; above harvester.imagery.MAX_IMAGE_PIXELS it warns (refused just below by the size check, as
    # any size but 256 x 256), above twice that it raises. (No warnings.catch_warnings here: not thread-safe.)
    try:
        image = Image.open(io.BytesIO(data), formats=[PILLOW_FORMATS[fmt]])
    except Exception as exc:  # Pillow raises many types on bad input; the cause is chained
        raise DecodeError(f"{what} ({fmt}) does not open: {exc}") from exc
    if image.size != (size, size):
        image.close()
        raise DecodeError(f"{what} is {image.size[0]}x{image.size[1]}, expected {size}x{size}")
    return image
