"""Image codecs: decode anything Pillow reads, encode JPG/PNG/WEBP. No torch here.

Decoding is defensive (decompression bombs, animations, truncation, odd modes) and
every refusal is an :class:`ImageError` whose message a client can read. The pixel
conversions match diffusers' ``VaeImageProcessor`` exactly, so that the engine sees
what the stock pipeline sees.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from .api import ErrorCode, OutputFormat

__all__ = [
    "DecodedImage",
    "ImageError",
    "array_to_image",
    "decode_image",
    "encode_image",
    "image_to_array",
    "pad_to_multiple",
    "resize_nearest_2x",
    "sniff_media_type",
]


class ImageError(ValueError):
    """An input image the engine cannot use; ``code`` is its protocol error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class DecodedImage:
    """A decoded image: what :func:`decode_image` returns and :func:`encode_image` takes."""

    rgb: Image.Image  # mode RGB
    alpha: Image.Image | None = None  # mode L; None when absent or fully opaque

    @property
    def width(self) -> int:
        return self.rgb.width

    @property
    def height(self) -> int:
        return self.rgb.height


def decode_image(data: bytes, *, max_pixels: int = 2048 * 2048, min_side: int = 8) -> DecodedImage:
    """Decode ``data`` (any format Pillow reads) into RGB, with alpha kept aside.

    EXIF orientation is applied. The declared size is checked against ``max_pixels`` and
    ``min_side`` before any pixel is decoded, so a few-KB decompression bomb costs
    nothing. Raises :class:`ImageError` with a code and a message for the client; safe
    to call from several threads at once.
    """
    image = _open(data, max_pixels)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"image is {width}×{height} = {width * height} pixels, over the limit of {max_pixels}",
        )
    if min(width, height) < min_side:
        raise ImageError(
            ErrorCode.IMAGE_TOO_SMALL, f"image is {width}×{height}; each side must be at least {min_side} px"
        )
    try:
        if getattr(image, "n_frames", 1) > 1:
            raise ImageError(ErrorCode.INVALID_IMAGE, "animated images are not supported")
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return _split_alpha(image)
    except ImageError:
        raise
    except Exception as exc:  # untrusted bytes: Pillow's plugins raise many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(ErrorCode.INVALID_IMAGE, f"could not decode image: {reason}") from exc


# EXIF orientations that swap width and height (transposed, rotated 90° or 270°).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
PAD_MULTIPLE = 32  # the engine pads inputs to multiples of this many pixels …
PAD_MIN = 64  # … and to at least this many (the UNet's skip connections need it)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation from the header. (``getexif()`` decodes a whole PNG, to find
    an eXIf chunk after its pixels; one there only costs a batch its shape-mate.)"""
    if image.format == "PNG":
        exif = Image.Exif()
        if image.info.get("exif"):  # an eXIf chunk before the pixels (where the PNG spec puts it)
            exif.load(image.info["exif"])
        return exif.get(0x0112, 1)
    return image.getexif().get(0x0112, 1)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _plain_png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG with no eXIf chunk before its pixels (so its
    orientation is 1, as :func:`_orientation` reads it), from the chunk headers alone:
    a few microseconds where ``Image.open`` takes tens, on each task a cluster gateway
    queues. None for anything else (Pillow reads it)."""
    if not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    at = 8
    while at + 8 <= len(data):
        length, kind = int.from_bytes(data[at : at + 4], "big"), data[at + 4 : at + 8]
        if kind == b"IDAT":
            width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
            bomb = Image.MAX_IMAGE_PIXELS and width * height > 2 * Image.MAX_IMAGE_PIXELS  # Pillow refuses it
            return (width, height) if width and height and not bomb else None
        if kind == b"eXIf":
            return None
        at += 12 + length
    return None


def latent_shape(data: bytes) -> tuple[int, int] | None:
    """The padded latent (h, w) the engine will give this image, read from its header
    alone (no pixel is decoded), or None if the header cannot be read. Requests of one
    latent shape can share UNet calls: a cluster queues work by it."""
    size = _plain_png_size(data)
    if size is not None:
        width, height = size
    else:
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            orientation = _orientation(image)
        except Exception:  # untrusted bytes: the engine reports what is wrong with them
            return None
        if orientation in _SWAPPING_ORIENTATIONS:
            width, height = height, width

    def padded(side: int) -> int:
        return max(-(-side // PAD_MULTIPLE) * PAD_MULTIPLE, PAD_MIN)

    return padded(height) // 8, padded(width) // 8


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Read the header only; Pillow decodes pixels lazily, on ``load()``."""
    if not data:
        raise ImageError(ErrorCode.INVALID_IMAGE, "could not decode image: it is empty")
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        # Pillow refuses sizes over 2 × Image.MAX_IMAGE_PIXELS before we can look.
        raise ImageError(
            ErrorCode.IMAGE_TOO_LARGE, f"image declares too many pixels, over the limit of {max_pixels}"
        ) from exc
    except Exception as exc:
        raise ImageError(
            ErrorCode.INVALID_IMAGE, "could not decode image: not a supported image format"
        ) from exc


def _split_alpha(image: Image.Image) -> DecodedImage:
    """Any mode → RGB, plus its alpha channel (mode L) unless there is none or it is opaque."""
    if "transparency" in image.info and image.mode in ("P", "L", "RGB"):
        image = image.convert("RGBA")  # a palette or colour-key transparency → alpha
    elif image.mode in ("RGBa", "La"):  # premultiplied
        image = image.convert("RGBA" if image.mode == "RGBa" else "LA")
    alpha = None
    if image.mode in ("RGBA", "LA", "PA"):
        alpha = image.getchannel("A")
        if alpha.getextrema() == (255, 255):
            alpha = None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits rather than clipping.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    return DecodedImage(image.convert("RGB"), alpha)


def image_to_array(image: DecodedImage) -> np.ndarray:
    """H×W×3 float32 in [0, 1], as ``VaeImageProcessor.pil_to_numpy``."""
    return np.asarray(image.rgb).astype(np.float32) / 255.0


def pad_to_multiple(array: np.ndarray, multiple: int = 32, *, min_size: int = 0) -> np.ndarray:
    """Pad H and W at the bottom/right, by reflection, up to multiples of ``multiple``
    and at least ``min_size``. The original pixels stay at the top-left."""
    height, width = array.shape[:2]
    target_h = max(-(-height // multiple) * multiple, min_size)
    target_w = max(-(-width // multiple) * multiple, min_size)
    while array.shape[0] < target_h or array.shape[1] < target_w:
        # Reflection needs pad < size, so small images grow in several steps.
        h, w = array.shape[:2]
        reflect = h > 1 and w > 1
        pad_h = min(target_h - h, h - 1) if reflect else target_h - h
        pad_w = min(target_w - w, w - 1) if reflect else target_w - w
        array = np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect" if reflect else "edge")
    return array


def array_to_image(array: np.ndarray, alpha: Image.Image | None = None) -> DecodedImage:
    """Float [0, 1] H×W×3 → an image, rounded as ``numpy_to_pil``; ``alpha`` is resized
    to the new size."""
    # Clipping first changes nothing in [0, 1] and keeps stray values from wrapping.
    rgb = Image.fromarray((np.clip(array, 0, 1) * 255).round().astype("uint8"), "RGB")
    if alpha is not None and alpha.size != rgb.size:
        alpha = alpha.resize(rgb.size, Image.Resampling.LANCZOS)
    return DecodedImage(rgb, alpha)


def resize_nearest_2x(image: DecodedImage) -> DecodedImage:
    """A plain 2× nearest-neighbour upscale (the model-free null engine)."""
    size = (2 * image.width, 2 * image.height)
    alpha = image.alpha.resize(size, Image.Resampling.NEAREST) if image.alpha is not None else None
    return DecodedImage(image.rgb.resize(size, Image.Resampling.NEAREST), alpha)


def encode_image(image: DecodedImage, fmt: OutputFormat, quality: int = 95) -> bytes:
    """Encode as JPG (RGB), PNG or WEBP (RGBA when there is alpha)."""
    out = image.rgb
    if image.alpha is not None and fmt is not OutputFormat.JPG:
        out = image.rgb.copy()
        out.putalpha(image.alpha)
    buf = io.BytesIO()
    if fmt is OutputFormat.JPG:
        out.save(buf, format="JPEG", quality=quality)
    elif fmt is OutputFormat.PNG:
        out.save(buf, format="PNG", compress_level=3)
    else:
        out.save(buf, format="WEBP", quality=quality)
    return buf.getvalue()


_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
]


def sniff_media_type(data: bytes) -> str | None:
    """The media type that ``data``'s magic bytes announce, or None if unknown."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "image/avif"
    for magic, media_type in _MAGIC:
        if data.startswith(magic):
            return media_type
    return None
