"""The quality gate: real photos whose segmentation failed are rejected naming the metric, good ones pass,
and a disabled gate keeps every pair."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from subjectpairs.cli import app
from subjectpairs.pipelines.boxes import Box
from subjectpairs.pipelines.config import PairConfig, QualityConfig
from subjectpairs.pipelines.pairs import PairBuilder, PairRequest
from subjectpairs.pipelines.quality import quality_gate
from subjectpairs.pipelines.rejections import PairRejected, Rejection
from subjectpairs.pipelines.sample_photos import SUBJECT_PHOTOS

# A box around the cat's face: GrabCut keeps only its eyes and nose (a matte of a tenth of the box).
CAT_FACE = Box(0.15, 0.75, 0.05, 1.0)
# Real photos with their hand-placed boxes, which GrabCut segments well.
GOOD = [(name, category, box) for name, category, box in SUBJECT_PHOTOS if name in ("astronaut", "coffee")]


def requests(photos) -> list[PairRequest]:
    return [PairRequest("cat-face", "Cat", photos["chelsea"].read_bytes(), CAT_FACE),
            *(PairRequest(name, category, photos[name].read_bytes(), box) for name, category, box in GOOD)]


@pytest.fixture(scope="module")
def gated_and_kept(photos):
    """The same real photos built with the gate at its defaults and without it."""
    gated = PairBuilder(PairConfig(segmenter={"kind": "grabcut"})).build(requests(photos))
    ungated = PairConfig(segmenter={"kind": "grabcut"}, quality={"enabled": False})
    return gated, PairBuilder(ungated).build(requests(photos))


def test_a_failed_segmentation_on_a_real_photo_is_rejected_naming_the_metric(gated_and_kept):
    (failed, *_), (kept, *_) = gated_and_kept
    bound = QualityConfig().min_alpha_in_box
    assert isinstance(failed, Rejection) and (failed.stage, failed.reason) == ("quality", "low_alpha_in_box")
    value = kept.metrics["alpha_in_box"]
    assert value < bound
    assert failed.detail.startswith(f"alpha_in_box {value:g} < {bound:g} (pair.quality.min_alpha_in_box)")


def test_good_real_photos_pass_unchanged_and_a_disabled_gate_keeps_the_failed_one(gated_and_kept):
    (_, *good_gated), (failed, *good_kept) = gated_and_kept
    assert not isinstance(failed, Rejection) and failed.key == "cat-face" and len(good_gated) == 2
    for gated, kept in zip(good_gated, good_kept, strict=True):
        assert not isinstance(gated, Rejection), gated
        # the gate keeps a pair as it is: same images, same metadata
        assert gated.members() == kept.members() and gated.meta()["metrics"] == kept.meta()["metrics"]


def test_the_pair_command_reports_a_gated_pair_and_keeps_it_without_the_gate(tmp_path, photos):
    runner = CliRunner()
    args = ["pair", str(photos["chelsea"]), "--category", "Cat", "--segmenter", "grabcut",
            "--box", ",".join(str(v) for v in CAT_FACE.as_list())]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "gated")])
    assert result.exit_code == 2
    assert "rejected at quality: low_alpha_in_box (alpha_in_box " in result.output
    assert "(pair.quality.min_alpha_in_box)" in result.output and not (tmp_path / "gated").exists()
    result = runner.invoke(app, [*args, "--no-quality-gate", "--out", str(tmp_path / "kept")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "kept" / "meta.json").read_text())
    assert meta["metrics"]["alpha_in_box"] < QualityConfig().min_alpha_in_box


METRICS = {"alpha_in_box": 0.8, "map_box_iou": 0.9, "alpha_outside_box": 0.01, "unknown_fraction": 0.05,
           "matting_residual": 0.01}


@pytest.mark.parametrize(("setting", "metric", "value", "reason", "detail"), [
    ("min_alpha_in_box", "alpha_in_box", 0.077, "low_alpha_in_box",
     "alpha_in_box 0.077 < 0.3 (pair.quality.min_alpha_in_box)"),
    ("min_map_box_iou", "map_box_iou", 0.1, "low_map_box_iou",
     "map_box_iou 0.1 < 0.3 (pair.quality.min_map_box_iou)"),
    ("max_alpha_outside_box", "alpha_outside_box", 0.4, "high_alpha_outside_box",
     "alpha_outside_box 0.4 > 0.3 (pair.quality.max_alpha_outside_box)"),
    ("max_unknown_fraction", "unknown_fraction", 0.6, "high_unknown_fraction",
     "unknown_fraction 0.6 > 0.5 (pair.quality.max_unknown_fraction)"),
])
def test_each_bound_rejects_with_its_own_reason_unless_off(setting, metric, value, reason, detail):
    config = QualityConfig(min_alpha_in_box=0.3, min_map_box_iou=0.3, max_alpha_outside_box=0.3,
                           max_unknown_fraction=0.5)
    quality_gate(METRICS, config)  # within every bound
    with pytest.raises(PairRejected) as raised:
        quality_gate({**METRICS, metric: value}, config)
    assert (raised.value.stage, raised.value.reason, raised.value.detail) == ("quality", reason, detail)
    quality_gate({**METRICS, metric: value}, config.model_copy(update={"enabled": False}))
    quality_gate({**METRICS, metric: value}, config.model_copy(update={setting: None}))


def test_the_first_failing_bound_names_the_reason_and_the_detail_lists_every_one():
    config = QualityConfig(min_alpha_in_box=0.3, max_unknown_fraction=0.5)
    with pytest.raises(PairRejected) as raised:
        quality_gate({**METRICS, "unknown_fraction": 0.7, "alpha_in_box": 0.1}, config)
    assert raised.value.reason == "low_alpha_in_box"
    assert raised.value.detail == ("alpha_in_box 0.1 < 0.3 (pair.quality.min_alpha_in_box); "
                                   "unknown_fraction 0.7 > 0.5 (pair.quality.max_unknown_fraction)")


def test_a_null_metric_is_not_gated():
    # map_box_iou is null for a given trimap: nothing to compare
    quality_gate({**METRICS, "map_box_iou": None}, QualityConfig(min_map_box_iou=0.9))
