"""harvester.imagery: tile bodies checked before they are stored (real Kampala tiles, synthetic bad and blank ones)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFile, ImageFont

from harvester.errors import BadTile, TileUnavailable
from harvester.imagery import BLANK_SHARE, blank_share, sniff_format, validate_tile

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
KAMPALA = SHARED / "kampala-oam"
DUBAI = SHARED / "dubai-aerial"
needs_kampala = pytest.mark.skipif(not KAMPALA.is_dir(), reason=f"real tiles not present at {KAMPALA}")
needs_dubai = pytest.mark.skipif(not DUBAI.is_dir(), reason=f"real imagery not present at {DUBAI}")

FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def encode(image: Image.Image | np.ndarray, image_format: str = "jpeg", **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    out = io.BytesIO()
    image.save(out, format=FORMATS[image_format], **options)
    return out.getvalue()


def textured(size: int = 256, seed: int = 0) -> np.ndarray:
    """A smooth, varied RGB picture (not blank)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    base = np.stack([128 + 100 * np.sin(6 * xx + c) * np.cos(5 * yy - c) for c in range(3)], axis=-1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def kampala_bodies() -> dict[str, bytes]:
    if not KAMPALA.is_dir():
        pytest.skip(f"real tiles not present at {KAMPALA}")
    return {p.name: p.read_bytes() for p in sorted(KAMPALA.glob("OAM-*.png"))}


# --- real tiles -----------------------------------------------------------------------------------------------------

@needs_kampala
def test_real_tiles_are_valid_and_stored_as_sent(kampala_bodies):
    formats = []
    for body in kampala_bodies.values():
        tile = validate_tile(body, "image/png")
        assert tile.data is body  # stored exactly as the provider sent it
        assert tile.rgb.shape == (256, 256, 3) and tile.rgb.dtype == np.uint8
        formats.append(tile.image_format)
        with Image.open(io.BytesIO(body)) as image:
            rgba = np.asarray(image.convert("RGBA"))
        opaque = rgba[..., 3] == 255
        np.testing.assert_array_equal(tile.rgb[opaque], rgba[..., :3][opaque])
        assert not tile.rgb[~opaque].any()  # transparent (no data) pixels are black
    assert len(formats) == 147 and formats.count("jpeg") == 24 and formats.count("png") == 123


@needs_kampala
def test_real_tiles_are_far_from_blank(kampala_bodies):
    shares = [blank_share(validate_tile(body, None).rgb) for body in kampala_bodies.values()]
    assert max(shares) < 0.5 * BLANK_SHARE


@needs_dubai
@pytest.mark.parametrize(("path", "x", "y", "what"), [
    ("Tile_5/images/image_part_005.jpg", 768, 256, "calm dark sea: mean 8, std 2.4"),
    ("Tile_7/images/image_part_009.jpg", 384, 1280, "84 % black no-data padding beside shore and sea"),
])
def test_real_dark_tiles_are_not_blank(path, x, y, what):
    with Image.open(DUBAI / path) as image:
        crop = image.convert("RGB").crop((x, y, x + 256, y + 256))
    tile = validate_tile(encode(crop, quality=90), "image/jpeg")
    assert blank_share(tile.rgb) < BLANK_SHARE, what


# --- formats and refusals -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image_format", ["jpeg", "png", "webp"])
def test_formats_come_from_the_bytes(image_format):
    body = encode(textured(), image_format)
    for content_type in (None, "image/png", "text/html", "application/octet-stream"):
        tile = validate_tile(body, content_type)
        assert tile.image_format == image_format and tile.data is body
    assert sniff_format(body) == image_format


@pytest.mark.parametrize(("body", "content_type", "shown"), [
    (b"<!DOCTYPE html><html><body>Service unavailable</body></html>", "text/html", "<!DOCTYPE html>"),
    (b'{"error": {"code": 403, "message": "quota"}}', "application/json", '{"error"'),
    (b"", "image/jpeg", "empty body"),
    (b"GIF89a" + b"\x00" * 40, "image/gif", "GIF89a"),
    (b"BM" + b"\x00" * 60, "image/bmp", "BM"),
    (b"\x00\x01\x02binary\xff", None, "binary"),
])
def test_non_images_are_refused(body, content_type, shown):
    with pytest.raises(BadTile) as caught:
        validate_tile(body, content_type)
    message = str(caught.value)
    assert shown in message and repr(content_type) in message


def test_tiff_is_refused_even_if_pillow_reads_it():
    tiff = io.BytesIO()
    Image.fromarray(textured()).save(tiff, format="TIFF")
    with pytest.raises(BadTile, match="not a JPEG, PNG or WebP"):
        validate_tile(tiff.getvalue(), "image/tiff")


@pytest.mark.parametrize("image_format", ["jpeg", "png", "webp"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9, 0.99])
def test_truncated_images_are_refused(image_format, keep):
    body = encode(textured(), image_format)
    with pytest.raises(BadTile, match="cannot be decoded|not a JPEG"):
        validate_tile(body[: int(len(body) * keep)], "image/jpeg")


def test_corrupt_png_is_refused():
    body = bytearray(encode(textured(), "png"))
    body[len(body) // 2] ^= 0xFF  # inside IDAT: the zlib stream or the chunk CRC breaks
    with pytest.raises(BadTile):
        validate_tile(bytes(body), "image/png")


def test_truncated_images_stay_refused():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("size", [(128, 128), (300, 300), (256, 128), (1024, 1024), (257, 256)])
def test_wrong_sizes_are_refused(size):
    body = encode(Image.new("RGB", size, (10, 200, 30)).resize(size), "png")
    with pytest.raises(BadTile, match=f"{size[0]}x{size[1]}"):
        validate_tile(body, "image/png")


def test_decompression_bomb_is_refused_before_decoding():
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 10^10 RGB pixels, claimed
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + \
        chunk(b"IEND", b"")
    with pytest.raises(BadTile):
        validate_tile(bomb, "image/png")


@pytest.mark.parametrize("image_format", ["jpeg", "png", "webp"])
def test_512_tiles_are_reduced_and_re_encoded(image_format):
    big = textured(512, seed=3)
    body = encode(big, image_format, **({"quality": 95} if image_format != "png" else {}))
    tile = validate_tile(body, None)
    assert tile.image_format == image_format and tile.data != body
    with Image.open(io.BytesIO(tile.data)) as stored:
        assert stored.size == (256, 256) and stored.format == FORMATS[image_format]
        np.testing.assert_array_equal(np.asarray(stored.convert("RGB")), tile.rgb)  # rgb is what was stored
    area_mean = big.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    assert np.abs(tile.rgb.astype(float) - area_mean).mean() < 3.0


def test_transparency_is_composited_over_black_exactly():
    """Every colour value under every alpha: the pixels are those of Pillow's alpha_composite over opaque black."""
    value, alpha = np.meshgrid(np.arange(256), np.arange(256))
    rgba = Image.fromarray(np.dstack([value, 255 - value, (7 * value) % 256, alpha]).astype(np.uint8), "RGBA")
    tile = validate_tile(encode(rgba, "png"), "image/png")
    expected = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    np.testing.assert_array_equal(tile.rgb, np.asarray(expected))
    assert tile.rgb.flags.c_contiguous


def test_512_tiles_with_transparency_are_reduced_over_black():
    big = np.dstack([textured(512, seed=5), np.full((512, 512), 255, np.uint8)])
    big[:, :200, 3] = 0  # no data on the west side
    tile = validate_tile(encode(Image.fromarray(big, "RGBA"), "png"), None)
    with Image.open(io.BytesIO(tile.data)) as stored:
        assert stored.size == (256, 256)
        np.testing.assert_array_equal(np.asarray(stored.convert("RGB")), tile.rgb)
    assert not tile.rgb[:, :100].any() and tile.rgb[:, 100:].all(axis=-1).mean() > 0.9


@pytest.mark.parametrize("mode", ["P", "L", "LA", "RGBA", "1", "I;16", "CMYK"])
def test_other_modes_become_rgb(mode):
    picture = Image.fromarray(textured())
    grey = np.asarray(picture.convert("L"))
    if mode == "I;16":
        converted = Image.fromarray(grey.astype(np.uint16) * 257)  # 16-bit grey, the same picture
    else:
        converted = picture.convert(mode)
    tile = validate_tile(encode(converted, "jpeg" if mode == "CMYK" else "png"), None)
    assert tile.rgb.shape == (256, 256, 3) and tile.rgb.dtype == np.uint8
    if mode in ("L", "LA", "I;16"):
        np.testing.assert_array_equal(tile.rgb, np.repeat(grey[..., None], 3, axis=-1))
    elif mode in ("P", "RGBA"):  # lossless PNG: exactly the colours
        np.testing.assert_array_equal(tile.rgb, np.asarray(converted.convert("RGB")))
    elif mode == "CMYK":  # through JPEG
        assert np.abs(tile.rgb.astype(int) - np.asarray(converted.convert("RGB"))).mean() < 6


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBP"]), st.binary(max_size=600))
def test_garbage_behind_a_magic_number_is_a_bad_tile(magic, rest):
    with pytest.raises(BadTile):
        validate_tile(magic + rest, "image/jpeg")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 4000))
def test_any_cut_of_a_real_jpeg_is_a_bad_tile(cut):
    body = encode(textured(seed=1), "jpeg", quality=85)
    cut = cut % (len(body) - 2)
    with pytest.raises(BadTile):
        validate_tile(body[:cut], "image/jpeg")


# --- blank tiles ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("colour", [(255, 255, 255), (0, 0, 0), (228, 226, 222), (12, 40, 80)])
@pytest.mark.parametrize("image_format", ["jpeg", "png", "webp"])
def test_uniform_tiles_are_blank(colour, image_format):
    body = encode(Image.new("RGB", (256, 256), colour), image_format)
    with pytest.raises(TileUnavailable, match="blank tile"):
        validate_tile(body, "image/jpeg")


def test_transparent_tile_is_blank():
    rng = np.random.default_rng(0)
    hidden = np.dstack([rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), np.zeros((256, 256), np.uint8)])
    with pytest.raises(TileUnavailable, match="blank tile"):
        validate_tile(encode(Image.fromarray(hidden, "RGBA"), "png"), "image/png")


@pytest.mark.parametrize("background", [(228, 226, 222), (255, 255, 255), (0, 0, 0), (204, 204, 204)])
@pytest.mark.parametrize("quality", [50, 75, 95])
def test_no_imagery_notice_is_blank(background, quality):
    """A line of text on a uniform background, the way providers say they have no imagery here."""
    notice = Image.new("RGB", (256, 256), background)
    ink = tuple(255 - v // 2 if sum(background) < 300 else v // 2 for v in background)
    ImageDraw.Draw(notice).text((10, 120), "Map data not yet available", fill=ink,
                                font=ImageFont.load_default(size=14))
    with pytest.raises(TileUnavailable, match="blank tile"):
        validate_tile(encode(notice, quality=quality), "image/jpeg")


@pytest.mark.parametrize(("mean", "std"), [(8, 2.4), (30, 3.0), (245, 2.5), (120, 2.0)])
def test_dark_bright_and_flat_but_real_tiles_are_kept(mean, std):
    """Calm water, snow, a field: low contrast, yet noise-like variation; JPEG-encoded as a provider would."""
    rng = np.random.default_rng(int(mean))
    field = np.clip(rng.normal(mean, std, (256, 256, 3)) + np.array([0, 2, 4]), 0, 255).astype(np.uint8)
    tile = validate_tile(encode(field, quality=90), "image/jpeg")
    assert blank_share(tile.rgb) < BLANK_SHARE


def test_blank_share():
    uniform = np.full((256, 256, 3), 77, np.uint8)
    assert blank_share(uniform) == 1.0
    half = uniform.copy()
    half[:, 128:] = 200
    assert blank_share(half) == pytest.approx(0.5)
    assert blank_share(textured()) < 0.1
