"""Trimaps from probability maps: the authors' thresholds, clean-up, band, gating, rejections."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from subjectpairs.pipelines.boxes import WHOLE_IMAGE, Box
from subjectpairs.pipelines.config import TrimapConfig
from subjectpairs.pipelines.rejections import PairRejected
from subjectpairs.pipelines.trimap import BACKGROUND, FOREGROUND, UNKNOWN, make_trimap, read_trimap

RAW = TrimapConfig(cleanup_px=0, band_px=0)


def ramp(width: int = 1001) -> np.ndarray:
    """Columns whose normalized value is exactly column / (width - 1)."""
    return np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (8, 1))


def test_default_thresholds_are_the_authors():
    config = TrimapConfig()
    assert (config.low, config.high) == (0.121, 0.578)


def test_thresholds_split_the_normalized_map():
    trimap, normalized = make_trimap(ramp(), WHOLE_IMAGE, RAW)
    row = trimap[0]
    values = normalized[0]
    assert (row[values <= 0.121] == BACKGROUND).all()
    assert (row[(values > 0.121) & (values <= 0.578)] == UNKNOWN).all()
    assert (row[values > 0.578] == FOREGROUND).all()
    assert row[121] == BACKGROUND and row[122] == UNKNOWN and row[578] == UNKNOWN and row[579] == FOREGROUND


def test_per_image_normalization_makes_the_scale_irrelevant():
    prob = ramp()
    squeezed = prob * 0.3 + 0.05  # a timid model: the same ranking, a narrow range
    assert np.array_equal(make_trimap(prob, WHOLE_IMAGE, RAW)[0], make_trimap(squeezed, WHOLE_IMAGE, RAW)[0])
    unnormalized = TrimapConfig(cleanup_px=0, band_px=0, normalize=False)
    with pytest.raises(PairRejected) as raised:
        make_trimap(squeezed, WHOLE_IMAGE, unnormalized)  # nothing above 0.578 without normalization
    assert raised.value.reason == "no_foreground"


def test_thresholds_are_configurable():
    trimap, _ = make_trimap(ramp(), WHOLE_IMAGE, TrimapConfig(low=0.3, high=0.7, cleanup_px=0, band_px=0))
    assert trimap[0, 300] == BACKGROUND and trimap[0, 301] == UNKNOWN and trimap[0, 701] == FOREGROUND
    with pytest.raises(ValueError):
        TrimapConfig(low=0.7, high=0.3)


def disk_map(size: int = 200, radius: int = 50, center=(100, 100)) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius ** 2).astype(np.float32)


def test_band_opens_an_unknown_ring_of_the_configured_width():
    for band in (3, 8):
        trimap, _ = make_trimap(disk_map(), WHOLE_IMAGE, TrimapConfig(cleanup_px=0, band_px=band))
        row = trimap[100]
        unknown_columns = np.flatnonzero(row == UNKNOWN)
        left_ring = unknown_columns[unknown_columns < 100]
        # band pixels each side of the edge at column 50 (one more where the circle's diagonal is near)
        assert 2 * band <= len(left_ring) <= 2 * band + 1
        assert left_ring.min() == 50 - band
        assert row[100] == FOREGROUND and row[0] == BACKGROUND


def test_cleanup_removes_specks():
    prob = disk_map()
    prob[10, 10] = prob[190, 20] = 1.0  # isolated false positives
    trimap, _ = make_trimap(prob, WHOLE_IMAGE, TrimapConfig(cleanup_px=2, band_px=0))
    assert trimap[10, 10] != FOREGROUND and trimap[190, 20] != FOREGROUND
    assert trimap[100, 100] == FOREGROUND


def test_box_gate_drops_blobs_outside_the_padded_box():
    prob = np.maximum(disk_map(radius=30, center=(60, 60)), disk_map(radius=20, center=(160, 160)))
    box = Box(0.15, 0.45, 0.15, 0.45)  # around the first disk only
    plain, _ = make_trimap(prob, box, TrimapConfig(band_px=2))
    gated, _ = make_trimap(prob, box, TrimapConfig(band_px=2, box_gate=True))
    assert plain[160, 160] == FOREGROUND
    assert gated[160, 160] == BACKGROUND and gated[60, 60] == FOREGROUND


def test_no_foreground_and_no_background_are_rejections():
    with pytest.raises(PairRejected) as raised:
        make_trimap(np.full((50, 50), 0.7, np.float32), WHOLE_IMAGE, TrimapConfig())
    assert (raised.value.stage, raised.value.reason) == ("trimap", "no_foreground")
    almost_all = np.ones((50, 50), np.float32)
    almost_all[0, 0] = 0.0  # one background pixel, removed as a speck
    with pytest.raises(PairRejected) as raised:
        make_trimap(almost_all, WHOLE_IMAGE, TrimapConfig())
    assert raised.value.reason == "no_background"
    with pytest.raises(PairRejected) as raised:
        make_trimap(disk_map(radius=3), WHOLE_IMAGE, TrimapConfig(band_px=6))  # the band eats the subject
    assert raised.value.reason == "no_foreground"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_given_trimap_is_snapped_and_resized():
    drawn = np.zeros((100, 150), np.uint8)
    drawn[20:80, 30:120] = 120  # a grey that is not exactly 128
    drawn[35:65, 50:100] = 250
    trimap = read_trimap(_png(drawn), (200, 300))
    assert trimap.shape == (200, 300)
    assert set(np.unique(trimap)) == {BACKGROUND, UNKNOWN, FOREGROUND}
    assert trimap[100, 150] == FOREGROUND and trimap[50, 80] == UNKNOWN and trimap[5, 5] == BACKGROUND


def test_given_trimap_without_foreground_is_rejected():
    with pytest.raises(PairRejected) as raised:
        read_trimap(_png(np.full((40, 40), 128, np.uint8)), (40, 40))
    assert raised.value.reason == "no_foreground"
    with pytest.raises(PairRejected) as raised:
        read_trimap(b"garbage", (40, 40))
    assert raised.value.reason == "decode_error"
