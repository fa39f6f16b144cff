"""Decoding photos and backgrounds into RGB arrays at working size, and encoding outputs.

Every later stage works on the array this module returns, so the rules live here once: EXIF
orientation applied, any mode (grayscale, palette, CMYK, 16-bit, alpha) turned into 8-bit RGB, the short
side brought down to the working size with the aspect kept, never up.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps

from subjectpairs.pipelines.rejections import PairRejected, describe_error

# Photos from the web can be very large; refuse decompression bombs as a rejection, not a crash.
Image.MAX_IMAGE_PIXELS = 200_000_000

# Fixed encoder settings: the same pixels always give the same bytes (shards are compared by hash).
JPEG_QUALITY = 95
JPEG_SUBSAMPLING = 0  # 4:4:4, no chroma loss on subject edges
PNG_COMPRESS_LEVEL = 3  # alpha and trimap are small next to the JPEGs; level 6 cost 40% more time

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's convert("RGB") clips 16-bit values at 255, which turns most of the photo white.
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if values.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(values * 255.0 if values.max(initial=0) <= 1.0 else values), 0, 255)
        return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")  # L, LA, P, PA, RGBA (alpha dropped), CMYK, YCbCr
    return np.asarray(image)


def shrink_to_short_side(rgb: np.ndarray, short_side: int) -> np.ndarray:
    """Resize so the short side is ``short_side`` (aspect kept); images already smaller are left alone."""
    height, width = rgb.shape[:2]
    scale = short_side / min(height, width)
    if scale >= 1.0:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def decode_image(
    data: bytes, short_side: int | None = None, *, min_side: int = 1, draft_side: int | None = None
) -> np.ndarray:
    """Decode image bytes to an RGB uint8 array, upright, with its short side at most ``short_side``.

    ``draft_side`` (default ``short_side``) lets a JPEG decode at a reduced scale as long as both sides
    stay at or above it.

    Raises :class:`PairRejected` (``decode_error`` or ``too_small``) instead of letting a bad file stop a
    job.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            draft_side = draft_side or short_side
            if draft_side is not None and image.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still leaves both sides at or
                # above the target, whichever way EXIF turns the photo: much less work for big photos.
                image.draft("RGB", (draft_side, draft_side))
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except Exception as exc:  # PIL raises many types for truncated or foreign files
        # PIL names the BytesIO it read in some messages; describe_error keeps its address out
        raise PairRejected("decode", "decode_error", describe_error(exc)) from exc
    if min(rgb.shape[:2]) < min_side:
        raise PairRejected(
            "decode", "too_small", f"{rgb.shape[1]}x{rgb.shape[0]} is below the minimum side of {min_side}"
        )
    if short_side is not None:
        rgb = shrink_to_short_side(rgb, short_side)
    return np.ascontiguousarray(rgb)


def encode_jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(
        buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING, optimize=False
    )
    return buffer.getvalue()


def encode_png(array: np.ndarray) -> bytes:
    """PNG of an 8-bit gray (HxW), RGB or RGBA (HxWx3/4) array."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    return buffer.getvalue()


def to_unit_float(rgb: np.ndarray) -> np.ndarray:
    """uint8 to float64 in [0, 1]; float input is taken as already in [0, 1]."""
    return rgb.astype(np.float64) * (1.0 / 255.0) if rgb.dtype == np.uint8 else rgb


def to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
