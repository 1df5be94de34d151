"""harvester.decode: tiles of any format and mode to RGB uint8, mask PNGs to 0/1, and every failure a DecodeError."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from harvester.decode import DecodeError, decode_image, decode_mask, sniff_format

RNG = np.random.default_rng(7)
RGB = np.asarray(Image.fromarray(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((256, 256)))
MASK = np.kron((RNG.random((8, 8)) < 0.4).astype(np.uint8), np.ones((32, 32), np.uint8))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize(("fmt", "mode"), [("PNG", m) for m in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16")]
                         + [("WEBP", m) for m in ("RGB", "RGBA", "L", "LA", "P", "1")])
def test_lossless_images_of_every_mode_decode_to_their_rgb(fmt, mode):
    source = Image.fromarray(RGB).convert(mode)
    options = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(encode(source, fmt, **options))
    assert decoded.shape == (256, 256, 3) and decoded.dtype == np.uint8
    expected = np.asarray(source.convert("RGB"))
    if fmt == "WEBP" and mode in ("P", "1"):  # saved through an RGB(A) conversion of their own
        assert np.abs(decoded.astype(int) - expected).max() <= 1
    else:
        np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_of_every_colour_space_decodes_to_rgb(mode):
    data = encode(Image.fromarray(RGB).convert(mode), "JPEG", quality=95)
    decoded = decode_image(data)
    assert decoded.shape == (256, 256, 3) and decoded.dtype == np.uint8
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert np.abs(decoded.astype(int) - reference).mean() < 2
    if mode == "L":
        assert (decoded[..., 0] == decoded[..., 1]).all() and (decoded[..., 1] == decoded[..., 2]).all()


def test_lossy_webp_decodes():
    decoded = decode_image(encode(Image.fromarray(RGB), "WEBP", quality=80))
    assert decoded.shape == (256, 256, 3)
    assert np.abs(decoded.astype(int) - RGB).mean() < 10


def test_format_is_read_from_the_bytes():
    jpeg, png = encode(Image.fromarray(RGB), "JPEG"), encode(Image.fromarray(RGB), "PNG")
    webp = encode(Image.fromarray(RGB), "WEBP")
    assert [sniff_format(d) for d in (jpeg, png, webp, b"GIF89a....", b"")] == ["jpeg", "png", "webp", None, None]


@pytest.mark.parametrize("name, data", [
    ("empty", b""),
    ("text", b"<html>404 Not Found</html>"),
    ("gif", encode(Image.fromarray(RGB).convert("P"), "GIF")),
    ("jpeg magic then garbage", b"\xff\xd8\xff" + bytes(range(256)) * 4),
    ("truncated jpeg", encode(Image.fromarray(RGB), "JPEG")[:3000]),
    ("truncated png", encode(Image.fromarray(RGB), "PNG")[:5000]),
    ("truncated webp", encode(Image.fromarray(RGB), "WEBP")[:200]),
    ("png magic then garbage", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
    ("jpeg 128x256", encode(Image.fromarray(RGB[:128]), "JPEG")),
    ("png 512x512", encode(Image.fromarray(RGB).resize((512, 512)), "PNG")),
    ("webp 256x255", encode(Image.fromarray(RGB[:255]), "WEBP")),
])
def test_bad_images_raise_decode_error(name, data):
    with pytest.raises(DecodeError) as caught:
        decode_image(data)
    assert isinstance(caught.value, ValueError)  # the harvester's and the trainer's callers catch it by name
    assert str(caught.value)


def test_wrong_size_is_refused_before_decoding():
    with pytest.raises(DecodeError, match="128x256, expected 256x256"):
        decode_image(encode(Image.fromarray(RGB[:, :128]), "JPEG"))
    assert decode_image(encode(Image.fromarray(RGB[:64, :64]), "PNG"), size=64).shape == (64, 64, 3)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` grey pixels but holds almost no data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused():
    bomb = _png_header_only(20000, 20000)  # 400 Mpx once decoded
    with pytest.raises(DecodeError):
        decode_image(bomb)
    with pytest.raises(DecodeError):
        decode_mask(bomb)


@pytest.mark.parametrize("mode, scale", [("L", 1), ("L", 255), ("1", 255), ("P", 255), ("I;16", 1000)])
def test_one_channel_masks_decode_to_zero_one(mode, scale):
    image = Image.fromarray(MASK.astype(np.uint16 if mode == "I;16" else np.uint8) * scale)
    if mode in ("1", "P"):
        image = image.convert(mode)
    decoded = decode_mask(encode(image, "PNG"))
    assert decoded.dtype == np.uint8 and decoded.shape == (256, 256)
    np.testing.assert_array_equal(decoded, MASK)


def test_colour_masks_are_building_where_any_channel_is_nonzero():
    rgb = np.zeros((256, 256, 3), np.uint8)
    rgb[..., 2] = MASK * 7
    np.testing.assert_array_equal(decode_mask(encode(Image.fromarray(rgb), "PNG")), MASK)
    rgba = np.dstack([rgb, np.full((256, 256), 255, np.uint8)])
    np.testing.assert_array_equal(decode_mask(encode(Image.fromarray(rgba), "PNG")), MASK)
    grey_alpha = Image.fromarray(MASK * 255).convert("LA")
    np.testing.assert_array_equal(decode_mask(encode(grey_alpha, "PNG")), MASK)


@pytest.mark.parametrize("data", [
    b"",
    encode(Image.fromarray(MASK * 255), "JPEG"),  # masks are PNG only
    encode(Image.fromarray(MASK * 255), "PNG")[:60],
    encode(Image.fromarray(MASK[:100] * 255), "PNG"),
])
def test_bad_masks_raise_decode_error(data):
    with pytest.raises(DecodeError):
        decode_mask(data)


@settings(max_examples=150, deadline=None)
@given(prefix=st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBP"]),
       body=st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_decode_error(prefix, body):
    for decode in (decode_image, decode_mask):
        try:
            out = decode(prefix + body)
        except DecodeError:
            continue
        assert out.shape[:2] == (256, 256)


ENCODED = [encode(Image.fromarray(RGB), fmt) for fmt in ("JPEG", "PNG", "WEBP")]


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10_000), flip=st.integers(min_value=1, max_value=255))
def test_damaged_real_encodings_decode_or_raise_decode_error(cut, flip):
    for source in ENCODED:
        damaged = bytearray(source)
        position = cut % len(damaged)
        damaged[position] ^= flip
        try:
            out = decode_image(bytes(damaged))
        except DecodeError:
            continue
        assert out.shape == (256, 256, 3) and out.dtype == np.uint8


def test_instances_png_round_trips_through_the_trainers_decoder():
    from harvester.rasterize import encode_instances_png, encode_mask_png
    from harvester.decode import decode_instances

    instances = np.zeros((256, 256), np.uint16)
    instances[10:40, 10:40] = 1
    instances[10:40, 40:90] = 2
    instances[200:256, 0:30] = 65535  # the largest id a 16-bit PNG holds
    decoded = decode_instances(encode_instances_png(instances))
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, instances)
    with pytest.raises(DecodeError, match="16-bit"):
        decode_instances(encode_mask_png(instances > 0))  # an 8-bit mask is not an instance map
    with pytest.raises(DecodeError, match="expected 256x256"):
        decode_instances(encode_instances_png(instances[:128]))
