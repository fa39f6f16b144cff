"""Segmenters: CLIPSeg through the real from_pretrained path (a tiny model), GrabCut on a real photo."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from skimage import data

from subjectpairs.errors import InputError
from subjectpairs.pipelines.boxes import Box
from subjectpairs.pipelines.config import PairConfig
from subjectpairs.pipelines.pairs import PairBuilder, PairRequest
from subjectpairs.pipelines.segmentation import prompt_for
from subjectpairs.pipelines.segmenter_clipseg import DEFAULT_CLIPSEG, ClipSegSegmenter
from subjectpairs.pipelines.segmenter_grabcut import GrabCutSegmenter
from subjectpairs.pipelines.segmenters import SEGMENTERS, SegmenterConfig, build_segmenter, resolve_segmenter

IMAGES = [data.astronaut(), data.coffee(), data.chelsea()]  # 512x512, 400x600, 300x451
PROMPTS = ["person", "coffee cup", "cat"]
BOXES = [Box(0.0, 1.0, 0.0, 1.0)] * 3


def test_clipseg_loads_from_a_saved_folder_and_maps_each_image_at_its_size(tiny_clipseg):
    segmenter = ClipSegSegmenter.from_pretrained(str(tiny_clipseg), device="cpu", batch_size=2)
    maps = segmenter.segment(IMAGES, PROMPTS, BOXES)
    assert [m.shape for m in maps] == [image.shape[:2] for image in IMAGES]
    assert all(m.dtype == np.float32 and 0.0 <= m.min() and m.max() <= 1.0 for m in maps)
    assert segmenter.describe() == {
        "name": "clipseg", "model": str(tiny_clipseg), "device": "cpu", "dtype": "float32"
    }
    assert not any(p.requires_grad for p in segmenter.model.parameters())


def test_clipseg_maps_are_the_models_sigmoid_resized(tiny_clipseg):
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    segmenter = ClipSegSegmenter.from_pretrained(str(tiny_clipseg), device="cpu")
    (mapped,) = segmenter.segment(IMAGES[1:2], PROMPTS[1:2], BOXES[:1])
    processor = CLIPSegProcessor.from_pretrained(str(tiny_clipseg))
    model = CLIPSegForImageSegmentation.from_pretrained(str(tiny_clipseg)).eval()
    shrunk = cv2.resize(IMAGES[1], (64, 64), interpolation=cv2.INTER_AREA)  # the tiny model sees 64x64
    assert segmenter.input_size == (64, 64)
    with torch.no_grad():
        logits = model(**processor(text=["coffee cup"], images=[shrunk], return_tensors="pt")).logits
    expected = cv2.resize(torch.sigmoid(logits).reshape(logits.shape[-2:]).numpy(), (600, 400))
    assert np.allclose(mapped, expected, atol=1e-5)
    assert mapped.std() > 0  # a real map, not a constant


def test_batching_does_not_change_the_maps(tiny_clipseg):
    one_by_one = ClipSegSegmenter.from_pretrained(str(tiny_clipseg), device="cpu", batch_size=1)
    batched = ClipSegSegmenter.from_pretrained(str(tiny_clipseg), device="cpu", batch_size=3)
    for a, b in zip(one_by_one.segment(IMAGES, PROMPTS, BOXES), batched.segment(IMAGES, PROMPTS, BOXES)):
        assert np.allclose(a, b, atol=1e-5)


def test_prompt_is_the_lowercased_category():
    assert prompt_for("Coffee cup") == "coffee cup"


def test_configured_model_selects_clipseg_and_a_missing_one_is_a_clear_error(tiny_clipseg, tmp_path):
    segmenter = build_segmenter(SegmenterConfig(model=str(tiny_clipseg), device="cpu"))
    assert segmenter.describe()["name"] == "clipseg"
    with pytest.raises(InputError, match="cannot load CLIPSeg"):
        build_segmenter(SegmenterConfig(kind="clipseg", model=str(tmp_path / "nothing-here")))


def test_auto_falls_back_to_grabcut_without_weights_and_says_why(hub_cache):
    choice = resolve_segmenter(SegmenterConfig())
    assert (choice.name, choice.requested, choice.fallback) == ("grabcut", "auto", True)
    warning = choice.warning()
    assert warning is not None and "\n" not in warning
    assert f"--model {DEFAULT_CLIPSEG}" in warning and "--segmenter grabcut" in warning
    assert choice.record() == {"name": "grabcut", "requested": "auto", "reason": choice.reason, "fallback": True}
    info = build_segmenter(SegmenterConfig(), choice).describe()
    assert info["name"] == "grabcut" and "not on disk" in info["why"]


def test_grabcut_chosen_knowingly_is_no_fallback():
    choice = resolve_segmenter(SegmenterConfig(kind="grabcut"))
    assert choice.name == "grabcut" and not choice.fallback and choice.warning() is None
    assert "why" not in build_segmenter(SegmenterConfig(kind="grabcut"), choice).describe()


def test_require_clipseg_makes_the_fallback_a_one_line_error(hub_cache):
    with pytest.raises(InputError, match="--require-clipseg") as raised:
        resolve_segmenter(SegmenterConfig(require_clipseg=True))
    assert "\n" not in str(raised.value) and f"--model {DEFAULT_CLIPSEG}" in str(raised.value)
    with pytest.raises(ValidationError, match="contradicts kind grabcut"):
        SegmenterConfig(kind="grabcut", require_clipseg=True)


def test_auto_takes_clipseg_from_a_configured_folder_or_the_hub_cache(tiny_clipseg, hub_cache):
    configured = resolve_segmenter(SegmenterConfig(model=str(tiny_clipseg), require_clipseg=True))
    assert (configured.name, configured.model, configured.warning()) == ("clipseg", str(tiny_clipseg), None)
    # the default model as the hub lays it out in its cache: refs/main names the snapshot holding the files
    repo = hub_cache / f"models--{DEFAULT_CLIPSEG.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_clipseg, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    cached = resolve_segmenter(SegmenterConfig(require_clipseg=True))
    assert (cached.name, cached.model, cached.warning()) == ("clipseg", DEFAULT_CLIPSEG, None)
    assert "hub cache" in cached.reason and not cached.fallback
    (snapshot / "model.safetensors").unlink()  # without weights CLIPSeg cannot load: not a usable cache
    assert resolve_segmenter(SegmenterConfig()).fallback


# The person in skimage's astronaut photo, traced by hand (x, y in the 512x512 photo).
ASTRONAUT_OUTLINE = np.array([
    (228, 16), (270, 20), (301, 68), (298, 110), (288, 140), (301, 228), (319, 245), (341, 267), (364, 341),
    (341, 347), (296, 375), (279, 432), (279, 511), (23, 511), (23, 318), (50, 260), (85, 228), (114, 193),
    (150, 180), (171, 119), (154, 74), (180, 30),
], np.int32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_grabcut_finds_the_person_in_a_real_photo():
    photo = data.astronaut()
    reference = np.zeros(photo.shape[:2], np.uint8)
    cv2.fillPoly(reference, [ASTRONAUT_OUTLINE], 1)
    reference = reference.astype(bool)
    box = Box(0.04, 0.72, 0.02, 1.0)
    (prob,) = GrabCutSegmenter().segment([photo], ["person"], [box])
    mask = prob > 0.5
    x0, x1, y0, y1 = box.pixels(512, 512)
    whole_box = np.zeros_like(reference)
    whole_box[y0:y1, x0:x1] = True
    assert _iou(mask, reference) >= 0.72
    assert _iou(mask, reference) > _iou(whole_box, reference) + 0.05  # better than taking the box
    assert not mask[:, 400:].any()  # nothing of the shuttle model to the right


def test_grabcut_is_deterministic_and_handles_a_whole_image_box():
    photo = data.chelsea()
    first = GrabCutSegmenter().segment([photo], ["cat"], [Box(0.0, 1.0, 0.0, 1.0)])[0]
    second = GrabCutSegmenter().segment([photo], ["cat"], [Box(0.0, 1.0, 0.0, 1.0)])[0]
    assert np.array_equal(first, second)
    assert 0.05 < (first > 0.5).mean() < 0.95


class BoxSegmenter:
    """A segmenter as a new module would add one: the subject box, filled."""

    name = "box"
    runs_model = False
    default_model = None

    @classmethod
    def from_config(cls, config, choice) -> "BoxSegmenter":
        return cls()

    def segment(self, images, prompts, boxes):
        maps = []
        for image, box in zip(images, boxes):
            mask = np.zeros(image.shape[:2], np.float32)
            x0, x1, y0, y1 = box.pixels(*image.shape[:2])
            mask[y0:y1, x0:x1] = 1.0
            maps.append(mask)
        return maps

    def describe(self):
        return {"name": self.name}


def test_a_registered_segmenter_is_configured_by_kind_and_builds_pairs(monkeypatch):
    """Adding a segmenter is its class and one registry line: the config accepts its name, the driver
    resolves it, the pair builder runs it and each pair names it."""
    with pytest.raises(ValidationError, match="unknown segmenter 'box': auto or one of clipseg, grabcut"):
        SegmenterConfig(kind="box")
    monkeypatch.setitem(SEGMENTERS, "box", BoxSegmenter)
    config = SegmenterConfig(kind="box")
    choice = resolve_segmenter(config)
    assert (choice.name, choice.requested, choice.model, choice.fallback) == ("box", "box", None, False)
    assert isinstance(build_segmenter(config, choice), BoxSegmenter)
    photo = cv2.imencode(".jpg", cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR))[1].tobytes()
    builder = PairBuilder(PairConfig(segmenter={"kind": "box"}, quality={"enabled": False}), choice=choice)
    (pair,) = builder.build([PairRequest("cup", "Coffee cup", photo, box=Box(0.2, 0.8, 0.1, 0.9))])
    assert pair.segmenter == {"name": "box"}
    assert pair.alpha[200, 300] > 0.5 and pair.alpha[5, 5] < 0.5  # inside and outside the box
