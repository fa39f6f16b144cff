"""Composites with a known alpha, made from real photos that ship with scikit-image.

Matting quality can only be measured against a true alpha; tests and the benchmark build one here: a
subject photo seen through a soft horse-shaped matte over a backdrop photo, I = aF + (1-a)B.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from subjectpairs.pipelines.sample_photos import photo
from subjectpairs.pipelines.trimap import BACKGROUND, FOREGROUND, UNKNOWN

# (subject photo, backdrop photo) pairs with different textures and contrasts.
CASES = (("astronaut", "brick"), ("coffee", "grass"), ("chelsea", "gravel"))


@dataclass
class KnownAlpha:
    image: np.ndarray  # HxWx3 float64 in [0, 1]
    trimap: np.ndarray  # uint8 0/128/255, drawn from the true alpha
    alpha: np.ndarray  # HxW float64, the truth
    foreground: np.ndarray  # HxWx3 float64, the subject photo

    def sad(self, estimate: np.ndarray) -> float:
        """Sum of absolute alpha differences over the unknown region."""
        return float(np.abs(estimate - self.alpha)[self.trimap == UNKNOWN].sum())

    def mse(self, estimate: np.ndarray) -> float:
        return float(((estimate - self.alpha)[self.trimap == UNKNOWN] ** 2).mean())


def known_alpha_composite(
    short_side: int, subject: str, backdrop: str, band: int, strands: bool = False
) -> KnownAlpha:
    """A 4:3 composite of short side ``short_side``; the trimap's sure parts are eroded by ``band`` px.

    With ``strands``, thin grass blades (from scikit-image's grass photo) stick out of the silhouette
    into the background, like fur or hair: the detail a reduced-resolution solve is most likely to lose.
    """
    from skimage import data

    height, width = short_side, short_side * 4 // 3
    fg = cv2.resize(photo(subject), (width, height), interpolation=cv2.INTER_AREA) / 255.0
    bg = cv2.resize(photo(backdrop), (width, height), interpolation=cv2.INTER_LINEAR) / 255.0
    silhouette = (~data.horse()).astype(np.float32)
    inner = cv2.resize(silhouette, (int(width * 0.7), int(height * 0.8)), interpolation=cv2.INTER_LINEAR)
    alpha = np.zeros((height, width), np.float32)
    top, left = (height - inner.shape[0]) // 2, (width - inner.shape[1]) // 2
    alpha[top:top + inner.shape[0], left:left + inner.shape[1]] = inner
    alpha = np.clip(cv2.GaussianBlur(alpha, (0, 0), short_side / 256 * 1.5), 0, 1).astype(np.float64)
    if strands:
        blades = cv2.resize(photo("grass")[:, :, 0], (width, height)).astype(np.float64) / 255.0
        blades = np.clip((blades - 0.55) * 4.0, 0.0, 1.0)
        reach = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * (short_side // 40) + 1,) * 2)
        fringe = (cv2.dilate((alpha > 0.5).astype(np.uint8), reach) > 0) & (alpha < 0.5)
        alpha[fringe] = np.maximum(alpha[fringe], blades[fringe])
    image = alpha[:, :, None] * fg + (1 - alpha[:, :, None]) * bg
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    trimap = np.full((height, width), UNKNOWN, np.uint8)
    trimap[cv2.erode((alpha < 0.01).astype(np.uint8), kernel) > 0] = BACKGROUND
    trimap[cv2.erode((alpha > 0.99).astype(np.uint8), kernel) > 0] = FOREGROUND
    return KnownAlpha(image=image, trimap=trimap, alpha=alpha, foreground=fg)
