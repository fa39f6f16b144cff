"""From a subject probability map to a trimap (0 background, 128 unknown, 255 foreground)."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from subjectpairs.pipelines.boxes import Box
from subjectpairs.pipelines.config import TrimapConfig
from subjectpairs.pipelines.rejections import PairRejected, describe_error

BACKGROUND, UNKNOWN, FOREGROUND = 0, 128, 255


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def normalize_map(prob: np.ndarray, config: TrimapConfig) -> np.ndarray:
    """The map as the thresholds see it: per-image min-max normalized when configured (the authors' way)."""
    prob = prob.astype(np.float32, copy=False)
    if not config.normalize:
        return prob
    low, high = float(prob.min()), float(prob.max())
    if high - low < 1e-6:
        raise PairRejected("trimap", "no_foreground", "the segmentation map is flat")
    return (prob - low) * (1.0 / (high - low))


def gate_to_box(prob: np.ndarray, box: Box, padding: float) -> np.ndarray:
    x0, x1, y0, y1 = box.padded(padding).pixels(*prob.shape)
    gated = np.zeros_like(prob)
    gated[y0:y1, x0:x1] = prob[y0:y1, x0:x1]
    return gated


def trimap_from_masks(foreground: np.ndarray, background: np.ndarray, config: TrimapConfig) -> np.ndarray:
    """Clean the two masks, open an unknown band around the foreground edge, and check both are left."""
    foreground = foreground.astype(np.uint8)
    background = background.astype(np.uint8)
    if config.cleanup_px:
        kernel = _disk(config.cleanup_px)
        foreground = cv2.morphologyEx(foreground, cv2.MORPH_OPEN, kernel)
        background = cv2.morphologyEx(background, cv2.MORPH_OPEN, kernel)
    if config.band_px:
        kernel = _disk(config.band_px)
        background &= 1 - cv2.dilate(foreground, kernel)
        foreground = cv2.erode(foreground, kernel, borderType=cv2.BORDER_REPLICATE)
    trimap = np.full(foreground.shape, UNKNOWN, np.uint8)
    trimap[background.astype(bool)] = BACKGROUND
    trimap[foreground.astype(bool)] = FOREGROUND
    return require_both_sides(trimap, "after thresholding")


def require_both_sides(trimap: np.ndarray, where: str) -> np.ndarray:
    """Matting needs known pixels of both kinds; without them the sample is rejected, not retried."""
    if not (trimap == FOREGROUND).any():
        raise PairRejected("trimap", "no_foreground", f"no foreground pixel {where}")
    if not (trimap == BACKGROUND).any():
        raise PairRejected("trimap", "no_background", f"no background pixel {where}")
    return trimap


def make_trimap(prob: np.ndarray, box: Box, config: TrimapConfig) -> tuple[np.ndarray, np.ndarray]:
    """Trimap and normalized map from a probability map at working resolution."""
    normalized = normalize_map(prob, config)
    if config.box_gate:
        normalized = gate_to_box(normalized, box, config.box_padding)
    trimap = trimap_from_masks(normalized > config.high, normalized <= config.low, config)
    return trimap, normalized


def read_trimap(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """A user's trimap (any gray image) snapped to 0/128/255 and brought to the working size, taken as
    drawn: no clean-up, no band."""
    try:
        gray = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    except Exception as exc:
        raise PairRejected("trimap", "decode_error", describe_error(exc)) from exc
    if gray.shape != shape:
        gray = cv2.resize(gray, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    trimap = np.full(shape, UNKNOWN, np.uint8)
    trimap[gray < 64] = BACKGROUND
    trimap[gray > 191] = FOREGROUND
    return require_both_sides(trimap, "in the given trimap")
