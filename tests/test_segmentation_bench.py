"""The segmentation benchmark: its traced outlines, its IoU, and one photo through GrabCut at the default."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from subjectpairs.pipelines.segmenters import SegmenterConfig
from subjectpairs.pipelines.config import PairConfig
from subjectpairs.pipelines.segmenters import build_segmenter

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "segmentation_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("segmentation_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up by name; the script pins thread counts for its own process only
    with mock.patch.dict(sys.modules, {spec.name: module}), mock.patch.dict(os.environ):
        spec.loader.exec_module(module)
        yield module


def test_every_outline_lies_in_its_photo_and_its_box(bench):
    photos = bench.read_outlines()
    assert len(photos) >= 7
    for traced in photos:
        reference = traced.mask()
        assert reference.mean() > 0.01, traced.photo
        # the box is the outline's bounds plus a margin: it holds the whole subject
        assert not (reference & ~bench.box_mask(traced.box, traced.shape)).any(), traced.photo


def test_iou_of_a_right_and_a_wrong_mask(bench):
    astronaut = next(t for t in bench.read_outlines() if t.photo == "skimage:astronaut")
    reference = astronaut.mask()
    assert bench.iou(reference, reference) == 1.0
    assert bench.iou(~reference, reference) == 0.0
    shifted = np.roll(reference, 200, axis=1)
    assert bench.iou(shifted, reference) < 0.3


def test_grabcut_at_the_default_finds_the_rocket_and_reports_what_it_loses(bench):
    rocket = next(t for t in bench.read_outlines() if t.photo == "skimage:rocket")
    image = rocket.image(bench.DREAMBENCH)
    reference = rocket.mask()
    result = bench.measure(rocket, image, build_segmenter(SegmenterConfig(kind="grabcut")), PairConfig())
    assert not result.rejected and set(result.masks) == set(bench.MASKS)
    box = bench.iou(bench.box_mask(rocket.box, rocket.shape), reference)
    assert bench.iou(result.masks["alpha"], reference) >= 0.68 > box + 0.03
    lost = bench.lost_parts(result.masks["alpha"], reference)
    assert 1 <= len(lost) <= bench.LOST_PARTS_SHOWN and "% of the subject" in lost[0]
    assert bench.lost_parts(reference, reference) == []
