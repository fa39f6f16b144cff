"""Decoding photos of every kind into upright 8-bit RGB at working size."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from subjectpairs.pipelines.images import decode_image, encode_jpeg, encode_png
from subjectpairs.pipelines.rejections import PairRejected
from subjectpairs.pipelines.trimap import read_trimap


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_short_side_is_brought_to_size_with_aspect_kept():
    photo = cv2.resize(data.astronaut(), (1200, 900))
    rgb = decode_image(_encoded(Image.fromarray(photo), "JPEG", quality=95), 512)
    assert rgb.shape == (512, 683, 3) and rgb.dtype == np.uint8


def test_small_photos_are_never_upscaled():
    rgb = decode_image(_encoded(Image.fromarray(data.chelsea()), "PNG"), 512)
    assert rgb.shape == data.chelsea().shape
    assert np.array_equal(rgb, data.chelsea())  # lossless in, untouched out


def test_draft_decoding_of_big_jpegs_keeps_the_picture():
    big = cv2.resize(data.coffee(), (2400, 1600), interpolation=cv2.INTER_CUBIC)
    fast = decode_image(_encoded(Image.fromarray(big), "JPEG", quality=95), 256)
    reference = cv2.resize(big, (384, 256), interpolation=cv2.INTER_AREA)
    assert fast.shape == reference.shape
    assert np.abs(fast.astype(int) - reference.astype(int)).mean() < 3.0


def test_exif_orientation_is_applied():
    photo = Image.fromarray(data.chelsea())  # 451 wide, 300 high
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    rgb = decode_image(_encoded(photo, "JPEG", quality=95, exif=exif), 512)
    assert rgb.shape[:2] == (451, 300)
    upright = np.asarray(photo.transpose(Image.Transpose.ROTATE_270))
    assert np.abs(rgb.astype(int) - upright.astype(int)).mean() < 4.0


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA"])
def test_every_mode_becomes_rgb(mode):
    photo = Image.fromarray(data.coffee()).convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    rgb = decode_image(_encoded(photo, fmt), 512)
    assert rgb.shape == (400, 600, 3) and rgb.dtype == np.uint8
    expected = np.asarray(photo.convert("RGB")).astype(int)
    assert np.abs(rgb.astype(int) - expected).mean() < 3.0


def test_sixteen_bit_png_keeps_its_tones():
    gray16 = (data.camera().astype(np.uint16) * 257)  # full 16-bit range
    ok, png = cv2.imencode(".png", gray16)
    rgb = decode_image(png.tobytes(), 512)
    assert rgb.shape == (512, 512, 3)
    assert np.abs(rgb[:, :, 0].astype(int) - data.camera().astype(int)).max() <= 1
    rgb16 = (data.coffee().astype(np.uint16) * 257)[:, :, ::-1]  # OpenCV writes BGR
    ok, png = cv2.imencode(".png", rgb16)
    rgb = decode_image(png.tobytes(), 512)
    assert np.abs(rgb.astype(int) - data.coffee().astype(int)).max() <= 1


def test_corrupt_and_truncated_files_are_decode_rejections():
    with pytest.raises(PairRejected) as raised:
        decode_image(b"this is not an image", 512)
    assert (raised.value.stage, raised.value.reason) == ("decode", "decode_error")
    jpeg = _encoded(Image.fromarray(data.coffee()), "JPEG", quality=95)
    with pytest.raises(PairRejected) as raised:
        decode_image(jpeg[: len(jpeg) // 2], 512)
    assert raised.value.reason == "decode_error"


def test_rejection_details_are_the_same_on_every_run():
    # PIL names the BytesIO it read, address and all: rejects.parquet would differ between equal builds
    def detail(function, *args) -> str:
        with pytest.raises(PairRejected) as raised:
            function(*args)
        return raised.value.detail

    for function, args in ((decode_image, (b"not an image", 512)), (read_trimap, (b"not a trimap", (8, 8)))):
        first = detail(function, *args)
        assert "UnidentifiedImageError" in first and "0x" not in first and detail(function, *args) == first


def test_tiny_photos_are_rejected_as_too_small():
    tiny = _encoded(Image.fromarray(data.coffee()[:20, :30]), "PNG")
    with pytest.raises(PairRejected) as raised:
        decode_image(tiny, 512, min_side=64)
    assert raised.value.reason == "too_small" and "30x20" in raised.value.detail


def test_encoders_are_deterministic_and_lossless_where_promised():
    rgb = data.astronaut()
    assert encode_jpeg(rgb) == encode_jpeg(rgb.copy())
    alpha = (data.camera() // 2).astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(alpha)))), alpha)
    rgba = np.dstack([rgb, alpha])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(rgba)))), rgba)
