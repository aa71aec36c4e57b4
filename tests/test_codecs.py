"""Image codecs: every odd input a client can send decodes to RGB or fails clearly."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from engine import codecs
from engine.api import ErrorCode, OutputFormat


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w: int, h: int) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    return np.stack([x, x[:, ::-1], np.full_like(x, 100)], -1)


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width``×``height`` with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_rgba_png_keeps_alpha():
    rgba = Image.fromarray(np.dstack([gradient(20, 10), np.full((10, 20), 128, np.uint8)]), "RGBA")
    decoded = codecs.decode_image(encode(rgba, "PNG"))
    assert decoded.rgb.mode == "RGB" and decoded.alpha is not None
    out = Image.open(io.BytesIO(codecs.encode_image(decoded, OutputFormat.PNG)))
    assert out.mode == "RGBA" and np.asarray(out)[..., 3].max() == 128


def test_opaque_alpha_is_dropped():
    rgba = Image.fromarray(np.dstack([gradient(20, 10), np.full((10, 20), 255, np.uint8)]), "RGBA")
    assert codecs.decode_image(encode(rgba, "PNG")).alpha is None


def test_exif_orientation_is_applied():
    image = Image.fromarray(gradient(30, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    decoded = codecs.decode_image(encode(image, "JPEG", exif=exif))
    assert decoded.rgb.size == (10, 30)


@pytest.mark.parametrize(
    "make",
    [
        lambda: encode(Image.new("CMYK", (16, 12), (10, 20, 30, 40)), "JPEG"),
        lambda: encode(Image.fromarray(np.full((12, 16), 40000, np.uint16)), "PNG"),
        lambda: encode(Image.new("L", (16, 12), 77), "PNG"),
        lambda: encode(Image.new("LA", (16, 12), (77, 100)), "PNG"),
        lambda: encode(Image.new("P", (16, 12), 3), "PNG", transparency=3),
        lambda: encode(Image.new("RGB", (16, 12), (1, 2, 3)), "WEBP"),
        lambda: encode(Image.new("RGB", (16, 12), (1, 2, 3)), "BMP"),
    ],
    ids=["cmyk-jpeg", "png16", "gray", "gray-alpha", "palette-transparency", "webp", "bmp"],
)
def test_odd_modes_decode_to_rgb(make):
    decoded = codecs.decode_image(make())
    assert decoded.rgb.mode == "RGB" and decoded.rgb.size == (16, 12)


def test_sixteen_bit_png_is_scaled_not_clipped():
    decoded = codecs.decode_image(encode(Image.fromarray(np.full((12, 16), 32768, np.uint16)), "PNG"))
    assert 120 <= np.asarray(decoded.rgb)[0, 0, 0] <= 135


def test_decompression_bomb_is_refused_quickly():
    start = time.perf_counter()
    with pytest.raises(codecs.ImageError) as err:
        codecs.decode_image(bomb_png(20000, 20000))
    assert err.value.code is ErrorCode.IMAGE_TOO_LARGE
    assert "20000×20000" in str(err.value) or "too many pixels" in str(err.value)
    assert time.perf_counter() - start < 2


def test_over_the_pixel_limit():
    with pytest.raises(codecs.ImageError) as err:
        codecs.decode_image(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=5000)
    assert err.value.code is ErrorCode.IMAGE_TOO_LARGE


def test_animated_gif_is_refused():
    frames = [Image.new("RGB", (16, 16), (80 * i, 255 - 80 * i, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(codecs.ImageError, match="animated") as err:
        codecs.decode_image(buf.getvalue())
    assert err.value.code is ErrorCode.INVALID_IMAGE


NOISE_PNG = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)), "PNG")


@pytest.mark.parametrize(
    "data",
    [b"", b"definitely not an image", NOISE_PNG[: len(NOISE_PNG) // 2]],
    ids=["empty", "text", "truncated"],
)
def test_garbage_and_truncation_are_refused(data):
    with pytest.raises(codecs.ImageError) as err:
        codecs.decode_image(data)
    assert err.value.code is ErrorCode.INVALID_IMAGE


@pytest.mark.parametrize("size", [(1, 1), (7, 100)])
def test_too_small_is_refused(size):
    with pytest.raises(codecs.ImageError) as err:
        codecs.decode_image(encode(Image.new("RGB", size), "PNG"))
    assert err.value.code is ErrorCode.IMAGE_TOO_SMALL


def test_padding_keeps_the_original_region():
    array = np.random.default_rng(0).random((53, 37, 3), dtype=np.float32)
    padded = codecs.pad_to_multiple(array, 32, min_size=64)
    assert padded.shape == (64, 64, 3)
    assert np.array_equal(padded[:53, :37], array)
    small = codecs.pad_to_multiple(array[:8, :9], 32, min_size=64)
    assert small.shape == (64, 64, 3) and np.array_equal(small[:8, :9], array[:8, :9])
    assert codecs.pad_to_multiple(np.zeros((96, 128, 3)), 32, min_size=64).shape == (96, 128, 3)


@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_encode_round_trip(fmt):
    image = codecs.array_to_image(gradient(24, 16).astype(np.float32) / 255)
    data = codecs.encode_image(image, fmt, 90)
    assert codecs.sniff_media_type(data) == fmt.media_type
    assert codecs.decode_image(data).rgb.size == (24, 16)


def test_array_to_image_resizes_alpha():
    alpha = Image.new("L", (10, 5), 200)
    image = codecs.array_to_image(np.zeros((10, 20, 3), np.float32), alpha)
    assert image.alpha.size == (20, 10)


def test_colour_key_transparency_becomes_alpha():
    image = Image.fromarray(gradient(16, 12))
    image.putpixel((0, 0), (1, 2, 3))
    decoded = codecs.decode_image(encode(image, "PNG", transparency=(1, 2, 3)))
    assert decoded.alpha is not None and decoded.alpha.getpixel((0, 0)) == 0
    assert decoded.alpha.getpixel((5, 5)) == 255


def test_bomb_message_names_the_size_and_limit():
    with pytest.raises(codecs.ImageError) as err:
        codecs.decode_image(bomb_png(3000, 3000))  # under Pillow's own limit, over ours
    assert str(err.value) == "image is 3000×3000 = 9000000 pixels, over the limit of 4194304"


def test_unconvertible_mode_is_an_image_error():
    image = Image.new("LAB", (16, 12))  # Pillow has no LAB → RGB conversion
    buf = io.BytesIO()
    image.save(buf, format="TIFF")
    try:
        decoded = codecs.decode_image(buf.getvalue())
    except codecs.ImageError as err:
        assert err.code is ErrorCode.INVALID_IMAGE
    else:
        assert decoded.rgb.mode == "RGB"


def test_pixels_match_diffusers_conversions():
    data = gradient(33, 17)
    decoded = codecs.decode_image(encode(Image.fromarray(data), "PNG"))
    array = codecs.image_to_array(decoded)
    assert array.dtype == np.float32 and array.shape == (17, 33, 3)
    np.testing.assert_array_equal(array, data.astype(np.float32) / 255)
    back = codecs.array_to_image(array, None)
    np.testing.assert_array_equal(np.asarray(back.rgb), data)
    wild = codecs.array_to_image(np.full((8, 8, 3), 1.7, np.float32), None)  # clipped, not wrapped
    assert np.asarray(wild.rgb).min() == 255


def test_pad_without_min_size_and_tiny_inputs():
    array = np.random.default_rng(2).random((53, 37, 3)).astype(np.float32)
    padded = codecs.pad_to_multiple(array)
    assert padded.shape == (64, 64, 3) and np.array_equal(padded[:53, :37], array)
    # reflection continues the image: the row below the last mirrors the one above it
    np.testing.assert_array_equal(padded[53, :37], array[51])
    one = codecs.pad_to_multiple(np.ones((1, 1, 3), np.float32), 32)
    assert one.shape == (32, 32, 3) and one.min() == 1


def test_nearest_2x_keeps_alpha():
    rgba = Image.fromarray(np.dstack([gradient(10, 8), np.full((8, 10), 9, np.uint8)]), "RGBA")
    up = codecs.resize_nearest_2x(codecs.decode_image(encode(rgba, "PNG")))
    assert (up.width, up.height) == (20, 16) and up.alpha is not None and up.alpha.size == (20, 16)
    webp = Image.open(io.BytesIO(codecs.encode_image(up, OutputFormat.WEBP, 90)))
    assert webp.mode == "RGBA"
    jpg = Image.open(io.BytesIO(codecs.encode_image(up, OutputFormat.JPG, 90)))
    assert jpg.mode == "RGB"


@pytest.mark.parametrize(
    ("fmt", "media_type"),
    [
        ("PNG", "image/png"),
        ("JPEG", "image/jpeg"),
        ("WEBP", "image/webp"),
        ("GIF", "image/gif"),
        ("BMP", "image/bmp"),
    ],
)
def test_sniff_media_type(fmt, media_type):
    assert codecs.sniff_media_type(encode(Image.new("RGB", (8, 8)), fmt)) == media_type


def test_sniff_unknown():
    assert codecs.sniff_media_type(b"hello world") is None
    assert codecs.sniff_media_type(b"") is None


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize(
    ("size", "orientation"), [((40, 24), None), ((100, 33), 1), ((64, 200), 6), ((70, 20), 8), ((300, 70), None)]
)
def test_latent_shape_from_the_header_is_the_engines(size, orientation, fmt):
    """A cluster queues work by latent shape read from the header alone (a PNG's pixels
    are not decoded; one without EXIF is read without Pillow): it must be the shape the
    engine gives the decoded, EXIF-rotated, padded image."""
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    data = encode(Image.new("RGB", size, (90, 40, 20)), fmt, exif=exif)
    decoded = codecs.image_to_array(codecs.decode_image(data))
    padded = codecs.pad_to_multiple(decoded, codecs.PAD_MULTIPLE, min_size=codecs.PAD_MIN)
    assert codecs.latent_shape(data) == (padded.shape[0] // 8, padded.shape[1] // 8)
    assert codecs.latent_shape(b"not an image") is None
    assert codecs.latent_shape(data[:30]) is None  # (a header cut short)
