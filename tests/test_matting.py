"""Closed-form matting on composites with a known alpha, made from real photos."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pymatting import estimate_alpha_cf

from subjectpairs.pipelines.config import MattingConfig
from subjectpairs.pipelines.images import to_uint8
from subjectpairs.pipelines.known_alpha import CASES, known_alpha_composite
from subjectpairs.pipelines.matting import estimate_alpha, matte
from subjectpairs.pipelines.trimap import BACKGROUND, FOREGROUND, UNKNOWN


def full_solve(image, trimap):
    with contextlib.redirect_stdout(io.StringIO()):
        return estimate_alpha_cf(image, trimap / 255.0)


@pytest.mark.parametrize("strands", [False, True], ids=["smooth-edge", "strands"])
@pytest.mark.parametrize("subject,backdrop", CASES)
def test_fast_path_is_within_ten_percent_of_a_full_solve(subject, backdrop, strands):
    case = known_alpha_composite(512, subject, backdrop, band=4, strands=strands)
    fast, scale, _ = estimate_alpha(case.image, case.trimap, MattingConfig())
    assert scale < 1.0, "this case should take the reduced-resolution path"
    full = full_solve(case.image, case.trimap)
    print(f"{subject}/{backdrop} strands={strands}: SAD fast {case.sad(fast):.0f} full {case.sad(full):.0f}; "
          f"MSE {case.mse(fast):.4f} {case.mse(full):.4f}")
    assert case.sad(fast) <= 1.10 * case.sad(full)
    assert case.mse(fast) <= 1.10 * case.mse(full)
    # and it is matting, not guessing: far better than a flat 0.5 over the unknown region
    assert case.sad(fast) < 0.5 * case.sad(np.full_like(fast, 0.5))


def test_cropping_the_solve_to_the_unknown_region_changes_nothing():
    case = known_alpha_composite(256, "coffee", "grass", band=2)
    cropped, scale, box = estimate_alpha(case.image, case.trimap, MattingConfig(max_solve_unknown=10**9))
    assert scale == 1.0 and box != (0, case.image.shape[1], 0, case.image.shape[0])
    assert np.abs(cropped - full_solve(case.image, case.trimap)).max() < 1e-3


def test_known_pixels_are_kept_exactly():
    case = known_alpha_composite(512, "chelsea", "gravel", band=4)
    alpha, _, _ = estimate_alpha(case.image, case.trimap, MattingConfig())
    assert (alpha[case.trimap == FOREGROUND] == 1.0).all() and (alpha[case.trimap == BACKGROUND] == 0.0).all()
    assert 0.0 <= alpha.min() and alpha.max() <= 1.0


@pytest.mark.parametrize("subject,backdrop", CASES)
def test_estimated_foreground_recomposites_better_than_the_raw_photo(subject, backdrop):
    case = known_alpha_composite(256, subject, backdrop, band=2)
    image, trimap, truth, fg = case.image, case.trimap, case.alpha, case.foreground
    result = matte(to_uint8(image), trimap, MattingConfig())
    estimated_fg = result.foreground / 255.0
    new_background = np.zeros_like(image)
    new_background[..., 1] = 1.0  # pure green: any of the old background that leaks shows
    soft = (trimap == UNKNOWN) & (truth > 0.05) & (truth < 0.95)
    a = result.alpha[:, :, None]
    expected = truth[:, :, None] * fg + (1 - truth[:, :, None]) * new_background
    with_foreground = a * estimated_fg + (1 - a) * new_background
    with_photo = a * image + (1 - a) * new_background
    assert np.abs(with_foreground - expected)[soft].mean() < np.abs(with_photo - expected)[soft].mean()
    assert 0.0 <= result.residual < 0.05


def test_a_trimap_without_unknown_pixels_needs_no_solve():
    image = to_uint8(known_alpha_composite(128, "coffee", "grass", band=2).image)
    trimap = np.zeros(image.shape[:2], np.uint8)
    trimap[30:90, 40:120] = FOREGROUND
    result = matte(image, trimap, MattingConfig())
    assert np.array_equal(result.alpha, (trimap == FOREGROUND).astype(float))
    assert result.residual == 0.0
