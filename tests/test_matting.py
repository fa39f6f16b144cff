"""Closed-form matting on composites with a known alpha, made from real photos."""

from __future__ import annotations

import contextlib
import io

import cv2
import numpy as np
import pytest
from pymatting import estimate_alpha_cf
from skimage import data

from subjectpairs.pipelines.config import MattingConfig
from subjectpairs.pipelines.matting import estimate_alpha, matte
from subjectpairs.pipelines.trimap import BACKGROUND, FOREGROUND, UNKNOWN


def known_alpha_composite(short_side: int, subject: str, backdrop: str, band: int):
    """Photo ``subject`` seen through a soft horse-shaped matte over photo ``backdrop``, and a trimap
    drawn from the true alpha (its sure parts eroded by ``band``)."""
    height, width = short_side, short_side * 4 // 3
    fg = cv2.resize(getattr(data, subject)(), (width, height), interpolation=cv2.INTER_AREA) / 255.0
    bg = getattr(data, backdrop)()
    bg = np.repeat(bg[:, :, None], 3, axis=2) if bg.ndim == 2 else bg
    bg = cv2.resize(bg, (width, height), interpolation=cv2.INTER_LINEAR) / 255.0
    silhouette = (~data.horse()).astype(np.float32)
    inner = cv2.resize(silhouette, (int(width * 0.7), int(height * 0.8)), interpolation=cv2.INTER_LINEAR)
    alpha = np.zeros((height, width), np.float32)
    top, left = (height - inner.shape[0]) // 2, (width - inner.shape[1]) // 2
    alpha[top:top + inner.shape[0], left:left + inner.shape[1]] = inner
    alpha = np.clip(cv2.GaussianBlur(alpha, (0, 0), short_side / 256 * 1.5), 0, 1).astype(np.float64)
    image = alpha[:, :, None] * fg + (1 - alpha[:, :, None]) * bg
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    trimap = np.full((height, width), UNKNOWN, np.uint8)
    trimap[cv2.erode((alpha < 0.01).astype(np.uint8), kernel) > 0] = BACKGROUND
    trimap[cv2.erode((alpha > 0.99).astype(np.uint8), kernel) > 0] = FOREGROUND
    return image, trimap, alpha, fg


def full_solve(image, trimap):
    with contextlib.redirect_stdout(io.StringIO()):
        return estimate_alpha_cf(image, trimap / 255.0)


CASES = [("astronaut", "brick"), ("coffee", "grass"), ("chelsea", "gravel")]


@pytest.mark.parametrize("subject,backdrop", CASES)
def test_fast_path_is_within_ten_percent_of_a_full_solve(subject, backdrop):
    image, trimap, truth, _ = known_alpha_composite(512, subject, backdrop, band=4)
    unknown = trimap == UNKNOWN
    fast, scale, _ = estimate_alpha(image, trimap, MattingConfig())
    assert scale < 1.0, "this case should take the reduced-resolution path"
    full = full_solve(image, trimap)
    sad_fast = np.abs(fast - truth)[unknown].sum()
    sad_full = np.abs(full - truth)[unknown].sum()
    mse_fast = ((fast - truth)[unknown] ** 2).mean()
    mse_full = ((full - truth)[unknown] ** 2).mean()
    print(f"{subject}/{backdrop}: SAD fast {sad_fast:.0f} full {sad_full:.0f}; MSE {mse_fast:.4f} {mse_full:.4f}")
    assert sad_fast <= 1.10 * sad_full
    assert mse_fast <= 1.10 * mse_full
    # and it is matting, not guessing: far better than a flat 0.5 over the unknown region
    assert sad_fast < 0.5 * np.abs(0.5 - truth)[unknown].sum()


def test_cropping_the_solve_to_the_unknown_region_changes_nothing():
    image, trimap, _, _ = known_alpha_composite(256, "coffee", "grass", band=2)
    cropped, scale, box = estimate_alpha(image, trimap, MattingConfig(max_solve_unknown=10**9))
    assert scale == 1.0 and box != (0, image.shape[1], 0, image.shape[0])
    assert np.abs(cropped - full_solve(image, trimap)).max() < 1e-3


def test_known_pixels_are_kept_exactly():
    image, trimap, _, _ = known_alpha_composite(512, "chelsea", "gravel", band=4)
    alpha, _, _ = estimate_alpha(image, trimap, MattingConfig())
    assert (alpha[trimap == FOREGROUND] == 1.0).all() and (alpha[trimap == BACKGROUND] == 0.0).all()
    assert 0.0 <= alpha.min() and alpha.max() <= 1.0


@pytest.mark.parametrize("subject,backdrop", CASES)
def test_estimated_foreground_recomposites_better_than_the_raw_photo(subject, backdrop):
    image, trimap, truth, fg = known_alpha_composite(256, subject, backdrop, band=2)
    result = matte(image, trimap, MattingConfig())
    new_background = np.zeros_like(image)
    new_background[..., 1] = 1.0  # pure green: any of the old background that leaks shows
    soft = (trimap == UNKNOWN) & (truth > 0.05) & (truth < 0.95)
    a = result.alpha[:, :, None]
    expected = truth[:, :, None] * fg + (1 - truth[:, :, None]) * new_background
    with_foreground = a * result.foreground + (1 - a) * new_background
    with_photo = a * image + (1 - a) * new_background
    assert np.abs(with_foreground - expected)[soft].mean() < np.abs(with_photo - expected)[soft].mean()
    assert 0.0 <= result.residual < 0.05


def test_a_trimap_without_unknown_pixels_needs_no_solve():
    image, _, _, _ = known_alpha_composite(128, "coffee", "grass", band=2)
    trimap = np.zeros(image.shape[:2], np.uint8)
    trimap[30:90, 40:120] = FOREGROUND
    result = matte(image, trimap, MattingConfig())
    assert np.array_equal(result.alpha, (trimap == FOREGROUND).astype(float))
    assert result.residual == 0.0
