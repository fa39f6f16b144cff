"""Structure-control images for ControlNet, prepared as LAVIS prepares them (``blip_diffusion_models/utils.py``
and its ControlNet annotator).

- ``canny``: the image as 3-channel uint8, its short side resized to ``resolution`` (512) with both sides
  rounded to multiples of 64 (Lanczos when enlarging, area when shrinking), OpenCV's Canny with LAVIS's
  stylization thresholds (30 and 70), the edge map repeated on three channels;
- ``none``: a ready map (edges, depth, pose, ...), used as it is.

The pipeline then resizes the map to the output size (Lanczos) and scales it to [0, 1], as diffusers' and
LAVIS's ``prepare_cond_image`` do.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
import torch
from PIL import Image

from subjectpairs.errors import InputError

ControlKind = Literal["canny", "none"]
CONTROL_KINDS = ("canny", "none")
CANNY_LOW, CANNY_HIGH = 30, 70  # the LAVIS stylization notebook's thresholds
CANNY_RESOLUTION = 512


def three_channels(image: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3): grey repeated, an alpha channel composed over white (the annotator's ``HWC3``)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        return (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize_to_resolution(array: np.ndarray, resolution: int) -> np.ndarray:
    """Short side to ``resolution``, both sides rounded to multiples of 64 (the annotator's ``resize_image``)."""
    height, width = array.shape[:2]
    scale = float(resolution) / min(height, width)
    size = (max(64, int(np.round(width * scale / 64.0)) * 64), max(64, int(np.round(height * scale / 64.0)) * 64))
    return cv2.resize(array, size, interpolation=cv2.INTER_LANCZOS4 if scale > 1 else cv2.INTER_AREA)


def canny_edges(image: Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH,
                resolution: int = CANNY_RESOLUTION) -> Image.Image:
    if not 0 <= low <= high:
        raise InputError(f"Canny thresholds {low} and {high}: need 0 <= low <= high")
    edges = cv2.Canny(resize_to_resolution(three_channels(image), resolution), low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def control_map(image: Image.Image, kind: ControlKind, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """The map a ControlNet takes, from ``image`` as ``kind`` says."""
    if kind == "canny":
        return canny_edges(image, low, high)
    if kind == "none":
        return Image.fromarray(three_channels(image))
    raise InputError(f"control kind {kind!r}: one of {', '.join(CONTROL_KINDS)}")


def control_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1], resized with Lanczos, as ``prepare_cond_image``."""
    resized = Image.fromarray(three_channels(image)).resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
