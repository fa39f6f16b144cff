"""Closed-form alpha matting and foreground colours (pymatting), with a fast path that keeps quality.

A full-image closed-form solve costs 0.8 s at 512x512 and 12 s at 1024x1024 on one core. Only the
unknown pixels are solved for, and only windows touching them enter the Laplacian, so the solve is cut
to the box of the unknown region plus a margin of known pixels (the same answer). When that region
still holds many unknown pixels it is solved at reduced resolution and brought back with the closed-form
model itself: in every small window alpha is a linear function of the colours, a.I + b. The (a, b) fitted
on the coarse solve are upsampled and applied to the full-resolution photo (He and Sun's fast guided
filter), so edges and thin strands come from the photo, not from the coarse grid. Known pixels are put
back exactly.

pymatting compiles its kernels with numba on first import (about a minute); ``make setup`` imports it
once so the on-disk cache is warm, and workers run with ``NUMBA_NUM_THREADS=1`` (one core per task).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from pymatting import estimate_alpha_cf, estimate_foreground_ml  # noqa: E402

from subjectpairs.pipelines.boxes import mask_box  # noqa: E402
from subjectpairs.pipelines.config import MattingConfig  # noqa: E402
from subjectpairs.pipelines.images import to_uint8, to_unit_float  # noqa: E402
from subjectpairs.pipelines.rejections import PairRejected, describe_error  # noqa: E402
from subjectpairs.pipelines.trimap import BACKGROUND, FOREGROUND, UNKNOWN  # noqa: E402

NO_REGION = (0, 0, 0, 0)


@dataclass
class Matte:
    alpha: np.ndarray  # HxW float64 in [0, 1]
    foreground: np.ndarray  # HxWx3 uint8: estimated colours in the solved region, the photo elsewhere
    residual: float  # mean |I - (aF + (1-a)B)| over the unknown pixels
    solve_scale: float  # 1.0 when solved at full resolution
    solve_box: tuple[int, int, int, int]  # x0, x1, y0, y1 holding every fractional alpha


def unknown_region(trimap: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    """Box (x0, x1, y0, y1) of the unknown pixels grown by ``margin``; ``NO_REGION`` if there are none."""
    found = mask_box(trimap == UNKNOWN)
    if found is None:
        return NO_REGION
    x0, x1, y0, y1 = found
    height, width = trimap.shape
    return max(x0 - margin, 0), min(x1 + margin, width), max(y0 - margin, 0), min(y1 + margin, height)


def _solve(image: np.ndarray, trimap: np.ndarray, epsilon: float) -> np.ndarray:
    # pymatting prints a "PERFORMANCE WARNING" whenever its incomplete Cholesky retries with a shift; the
    # solve still converges, and thousands of those lines would bury a job's log.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return estimate_alpha_cf(image, trimap, laplacian_kwargs={"epsilon": epsilon})


def _shrink_trimap(trimap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A coarse pixel is known only when every fine pixel under it is known the same way."""
    fg = cv2.resize((trimap == FOREGROUND).astype(np.float32), size, interpolation=cv2.INTER_AREA)
    bg = cv2.resize((trimap == BACKGROUND).astype(np.float32), size, interpolation=cv2.INTER_AREA)
    small = np.full(fg.shape, 0.5)
    small[fg > 0.999] = 1.0
    small[bg > 0.999] = 0.0
    return small


def local_linear_fit(guide: np.ndarray, values: np.ndarray, radius: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel (a, b) of the least-squares fit values ~ a.guide + b over (2r+1)^2 windows, averaged
    over the windows covering each pixel (the guided filter's coefficients, colour guide)."""
    size = (2 * radius + 1, 2 * radius + 1)

    def mean(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, -1, size, borderType=cv2.BORDER_REFLECT)

    mean_i = mean(guide)
    mean_v = mean(values)
    cov = mean(guide * values[:, :, None]) - mean_i * mean_v[:, :, None]
    m = [mean_i[:, :, c] for c in range(3)]
    g = [guide[:, :, c] for c in range(3)]
    s00, s01, s02 = (mean(g[0] * g[j]) - m[0] * m[j] for j in range(3))
    s11, s12 = (mean(g[1] * g[j]) - m[1] * m[j] for j in (1, 2))
    s22 = mean(g[2] * g[2]) - m[2] * m[2]
    s00, s11, s22 = s00 + eps, s11 + eps, s22 + eps
    # The inverse of the symmetric 3x3 window covariance, from its cofactors, for every pixel at once.
    c00, c01, c02 = s11 * s22 - s12 * s12, s02 * s12 - s01 * s22, s01 * s12 - s02 * s11
    c11, c12, c22 = s00 * s22 - s02 * s02, s01 * s02 - s00 * s12, s00 * s11 - s01 * s01
    det = s00 * c00 + s01 * c01 + s02 * c02
    v0, v1, v2 = (cov[:, :, c] for c in range(3))
    a = np.dstack([c00 * v0 + c01 * v1 + c02 * v2, c01 * v0 + c11 * v1 + c12 * v2, c02 * v0 + c12 * v1 + c22 * v2])
    a /= det[:, :, None]
    b = mean_v - (a * mean_i).sum(axis=2)
    return mean(a), mean(b)


def _solve_reduced(image: np.ndarray, trimap: np.ndarray, scale: float, config: MattingConfig) -> np.ndarray:
    height, width = trimap.shape
    size = (max(round(width * scale), 3), max(round(height * scale), 3))
    small_image = np.clip(cv2.resize(image, size, interpolation=cv2.INTER_AREA), 0.0, 1.0)
    small_trimap = _shrink_trimap(trimap, size)
    if not ((small_trimap == 1.0).any() and (small_trimap == 0.0).any()):
        return _solve(image, trimap / 255.0, config.epsilon)
    small_alpha = _solve(small_image, small_trimap, config.epsilon)
    a, b = local_linear_fit(small_image, small_alpha, config.refine_radius, config.refine_eps)
    a = cv2.resize(a, (width, height), interpolation=cv2.INTER_LINEAR)
    b = cv2.resize(b, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip((a * image).sum(axis=2) + b, 0.0, 1.0)


def estimate_alpha(
    image: np.ndarray, trimap: np.ndarray, config: MattingConfig
) -> tuple[np.ndarray, float, tuple[int, int, int, int]]:
    """Alpha for ``image`` (HxWx3 float64 in [0, 1], or uint8) under ``trimap`` (uint8 0/128/255).

    Returns the alpha, the scale the solve ran at and the box it covered. Only the box is converted to
    floating point.
    """
    alpha = (trimap == FOREGROUND).astype(np.float64)
    x0, x1, y0, y1 = box = unknown_region(trimap, config.margin_px)
    if box == NO_REGION:
        return alpha, 1.0, box
    crop_image = to_unit_float(image[y0:y1, x0:x1])
    crop_trimap = trimap[y0:y1, x0:x1]
    unknown = crop_trimap == UNKNOWN
    unknown_count = int(unknown.sum())
    scale = 1.0
    if unknown_count > config.max_solve_unknown:
        scale = max(float(np.sqrt(config.max_solve_unknown / unknown_count)), config.min_scale)
    try:
        if scale < 1.0:
            crop_alpha = _solve_reduced(crop_image, crop_trimap, scale, config)
        else:
            crop_alpha = _solve(crop_image, crop_trimap / 255.0, config.epsilon)
    except (ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
        raise PairRejected("matting", "solver_error", describe_error(exc)) from exc
    if not np.isfinite(crop_alpha).all():
        raise PairRejected("matting", "solver_error", "the closed-form solve returned non-finite alpha")
    alpha[y0:y1, x0:x1][unknown] = crop_alpha[unknown]
    return alpha, scale, box


def matte(photo: np.ndarray, trimap: np.ndarray, config: MattingConfig) -> Matte:
    """Alpha, foreground colours and the compositing residual for ``photo`` (HxWx3 uint8)."""
    alpha, scale, box = estimate_alpha(photo, trimap, config)
    foreground = photo.copy()
    if box == NO_REGION:
        return Matte(alpha=alpha, foreground=foreground, residual=0.0, solve_scale=scale, solve_box=box)
    x0, x1, y0, y1 = box
    # pymatting's multi-level estimate is local, so the solved box (with its margin) is enough.
    crop = to_unit_float(photo[y0:y1, x0:x1])
    crop_alpha = alpha[y0:y1, x0:x1]
    fg, bg = estimate_foreground_ml(crop, crop_alpha, return_background=True)
    foreground[y0:y1, x0:x1] = to_uint8(fg)
    unknown = trimap[y0:y1, x0:x1] == UNKNOWN
    a = crop_alpha[unknown][:, None]
    residual = float(np.abs(crop[unknown] - (a * fg[unknown] + (1.0 - a) * bg[unknown])).mean())
    return Matte(alpha=alpha, foreground=foreground, residual=residual, solve_scale=scale, solve_box=box)
