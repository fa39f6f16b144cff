"""Captions: a captions.jsonl file, a BLIP-2 stage (tiny model, real loading path), the template."""

from __future__ import annotations

import json

import pytest
from skimage import data

from subjectpairs.errors import InputError
from subjectpairs.pipelines.captions import Blip2Captioner, Captions, keep_mentioning, template_caption


def test_captions_file_by_image_and_label(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text("\n".join([
        json.dumps({"image_id": "a", "label": "Cat", "captions": ["a cat on a sofa", "a sleepy cat"]}),
        json.dumps({"image_id": "a", "label": "Dog", "captions": "a dog"}),
        "",
    ]))
    captions = Captions.from_jsonl(str(path))
    assert captions.from_file("a", "cat") == ["a cat on a sofa", "a sleepy cat"]
    assert captions.from_file("a", "Dog") == ["a dog"]
    assert captions.from_file("b", "Cat") == []
    assert template_caption("Coffee cup") == ["a photo of a coffee cup"]


def test_bad_captions_file_names_the_line(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"image_id": "a", "label": "Cat", "captions": ["x"]}\n{"image_id": "b"}\n')
    with pytest.raises(InputError, match="line 2"):
        Captions.from_jsonl(str(path))


def test_capfilt_keeps_distinct_captions_that_name_the_label():
    sampled = ["a cat on a mat", "a cat on a mat", "a dog", "two cats", "the coffee cup", "a cat, asleep"]
    assert keep_mentioning(sampled, "Cat", keep=5) == ["a cat on a mat", "a cat, asleep"]
    assert keep_mentioning(sampled, "Coffee cup", keep=5) == ["the coffee cup"]
    assert keep_mentioning(sampled, "Cat", keep=1) == ["a cat on a mat"]


def test_blip2_captioner_loads_a_saved_model_and_is_deterministic(tiny_blip2, monkeypatch):
    captioner = Blip2Captioner.from_pretrained(str(tiny_blip2), device="cpu", samples=3, max_new_tokens=6)
    images = [data.chelsea(), data.coffee()]
    first = captioner.caption(images, ["Cat", "Coffee cup"], ["k1", "k2"])
    assert len(first) == 2 and captioner.caption(images, ["Cat", "Coffee cup"], ["k1", "k2"]) == first
    assert captioner.name == f"blip2:{tiny_blip2}"
    # what the model sampled goes through the label filter: make the decoder say known words
    texts = iter(["a cat", "noise", "a cat", "a coffee cup here", "x", "y"])
    monkeypatch.setattr(captioner.processor, "batch_decode",
                        lambda ids, skip_special_tokens: [next(texts) for _ in range(len(ids))])
    assert captioner.caption(images, ["Cat", "Coffee cup"], ["k1", "k2"]) == [["a cat"], ["a coffee cup here"]]


def test_missing_blip2_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="cannot load BLIP-2"):
        Blip2Captioner.from_pretrained(str(tmp_path / "none"))


def test_a_captioner_failing_on_one_photo_rejects_only_that_pair(tmp_path):
    from types import SimpleNamespace

    from subjectpairs.pipelines.boxes import WHOLE_IMAGE
    from subjectpairs.pipelines.build import ChunkBuilder
    from subjectpairs.pipelines.config import BuildConfig
    from subjectpairs.pipelines.rejections import Rejection
    from subjectpairs.pipelines.shards import Candidate

    class ChokesOnOdd:
        name = "blip2:stub"

        def caption(self, images, labels, keys):
            if "odd" in keys:
                raise ValueError("this photo breaks the model")
            return [[f"a photo of a {label.lower()}"] for label in labels]

    builder = ChunkBuilder(BuildConfig(out=str(tmp_path / "out"), candidates=str(tmp_path / "c.parquet")))
    builder.captioner = ChokesOnOdd()
    done = [(Candidate(key, key, "/m/0", "Cat", WHOLE_IMAGE, f"{key}.jpg"), SimpleNamespace(target=data.chelsea()))
            for key in ("fine", "odd")]
    fine, odd = builder._captions(done)
    assert fine == (["a photo of a cat"], "blip2:stub")
    assert odd == Rejection("odd", "caption", "unexpected_error", "ValueError: this photo breaks the model")
