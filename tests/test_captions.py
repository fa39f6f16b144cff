"""Captions: a captions.jsonl file, a BLIP-2 stage ranked by CLIP (tiny models, real loading path), the
template."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage import data

from subjectpairs.errors import InputError
from subjectpairs.pipelines.captions import (
    Blip2Captioner,
    Captions,
    ClipRanker,
    capfilt,
    keep_mentioning,
    template_caption,
)
from subjectpairs.pipelines.segmentation import shrink_for_model


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


def test_label_filter_keeps_distinct_captions_with_any_word_of_the_label_or_all_of_them():
    sampled = ["a cat on a mat", "a cat on a mat", "a dog", "two cats", "a cup of tea", "the coffee cup",
               "a cat, asleep"]
    assert keep_mentioning(sampled, "Cat", keep=5) == ["a cat on a mat", "a cat, asleep"]
    assert keep_mentioning(sampled, "Coffee cup", keep=5) == ["a cup of tea", "the coffee cup"]
    assert keep_mentioning(sampled, "Coffee cup", keep=5, match="all") == ["the coffee cup"]
    assert keep_mentioning(sampled, "Cat", keep=1) == ["a cat on a mat"]


def test_capfilt_keeps_the_best_ranked_that_mention_the_label_else_the_best_one():
    ranked = ["a brown dog", "a cup of tea", "a dog and a cat", "a coffee cup", "a cat"]
    assert capfilt(ranked, "Cat", keep=5) == ["a dog and a cat", "a cat"]
    assert capfilt(ranked, "Coffee cup", keep=1) == ["a cup of tea"]
    assert capfilt(ranked, "Coffee cup", keep=5, match="all") == ["a coffee cup"]
    assert capfilt(ranked, "Teapot", keep=5) == ["a brown dog"]
    assert capfilt([], "Teapot", keep=5) == []


def test_clip_ranker_orders_captions_by_image_text_similarity(tiny_clip):
    import torch

    ranker = ClipRanker.from_pretrained(str(tiny_clip), device="cpu", dtype=torch.float32)
    images = [data.chelsea(), data.coffee()]
    captions = [["a cat", "a sleepy cat on a rug", "zzz", "the dog"], ["a cup", "coffee", "a cat"]]
    scores = ranker.similarities(images, captions)
    for image, texts, got in zip(images, captions, scores):
        # CLIP's own forward pass: logits are the scaled cosine of the projected embeddings
        inputs = ranker.processor(text=texts, images=[image], return_tensors="pt", padding=True)
        with torch.inference_mode():
            output = ranker.model(**inputs)
        expected = (output.logits_per_image[0] / ranker.model.logit_scale.exp()).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert len(set(np.round(expected, 6))) == len(texts)  # no ties: the order below is CLIP's alone
    assert ranker.rank(images, captions) == [
        [texts[i] for i in np.argsort(-got)] for texts, got in zip(captions, scores)
    ]


def test_blip2_captioner_ranks_with_clip_filters_by_label_and_is_deterministic(tiny_blip2, tiny_clip,
                                                                              monkeypatch):
    captioner = Blip2Captioner.from_pretrained(str(tiny_blip2), ranker=str(tiny_clip), device="cpu",
                                               samples=3, min_length=2, max_new_tokens=6, keep=2)
    images = [data.chelsea(), data.coffee()]
    first = captioner.caption(images, ["Cat", "Coffee cup"], ["k1", "k2"])
    assert [len(c) for c in first] == [1, 1]  # an untrained BLIP-2 never names the label: the top-ranked one
    assert captioner.caption(images, ["Cat", "Coffee cup"], ["k1", "k2"]) == first
    reseeded = Blip2Captioner(captioner.model, captioner.processor, captioner.source, ranker=None, keep=2,
                              label_match="any", samples=3, top_p=0.95, min_length=2, max_new_tokens=6,
                              seed=1)
    shrunk = shrink_for_model(images, captioner.input_size)
    assert reseeded.sample(shrunk, ["k1", "k2"]) != captioner.sample(shrunk, ["k1", "k2"])
    assert captioner.name == f"blip2:{tiny_blip2}+clip:{tiny_clip}"
    # what the model sampled is ranked by CLIP, then filtered: make the decoder say known words
    sampled = [["a cat", "the cat sat", "noise"], ["a cup of tea", "a coffee cup here", "a mug of coffee"]]
    monkeypatch.setattr(captioner.processor, "batch_decode",
                        lambda ids, skip_special_tokens: [text for texts in sampled for text in texts])
    ranked = captioner.ranker.rank(shrunk, sampled)
    expected = [[c for c in ranked[0] if "cat" in c][:2], [c for c in ranked[1]][:2]]
    assert captioner.caption(images, ["Cat", "Coffee cup"], ["k1", "k2"]) == expected
    assert captioner.caption(images, ["Dog", "Teapot"], ["k1", "k2"]) == [ranked[0][:1], ranked[1][:1]]
    captioner.label_match = "all"
    assert captioner.caption(images, ["Cat", "Coffee cup"], ["k1", "k2"]) == [expected[0],
                                                                              ["a coffee cup here"]]


def test_blip2_captioner_samples_with_the_configured_settings(tiny_blip2, monkeypatch):
    from subjectpairs.pipelines.caption_sources import load_captioner
    from subjectpairs.pipelines.config import BuildConfig

    config = BuildConfig.model_validate({
        "out": "o", "candidates": "c.parquet", "pair": {"seed": 4},
        "captioner": {"model": str(tiny_blip2), "ranker": None, "device": "cpu", "keep": 2, "label_match": "all",
                      "samples": 3, "top_p": 0.5, "min_length": 4, "max_new_tokens": 4},
    })
    captioner = load_captioner(config)
    assert captioner.ranker is None and captioner.name == f"blip2:{tiny_blip2}"
    assert (captioner.keep, captioner.label_match, captioner.seed) == (2, "all", 4)
    seen = {}
    generate = captioner.model.generate

    def recording(**kwargs):
        seen.update(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(captioner.model, "generate", recording)
    sampled = captioner.sample(shrink_for_model([data.chelsea()], captioner.input_size), ["k"])
    assert {k: seen[k] for k in ("top_p", "num_return_sequences", "min_new_tokens", "max_new_tokens")} == {
        "top_p": 0.5, "num_return_sequences": 3, "min_new_tokens": 4, "max_new_tokens": 4}
    assert len(sampled) == 1 and len(sampled[0]) == 3
    # without a ranker, the sampling order stands
    monkeypatch.setattr(captioner, "sample", lambda images, keys: [["a cat", "a cat", "a dog"]])
    assert captioner.caption([data.chelsea()], ["Dog"], ["k"]) == [["a dog"]]
    assert captioner.caption([data.chelsea()], ["Teapot"], ["k"]) == [["a cat"]]


def test_captioner_defaults_are_the_authors_capfilt():
    from pydantic import ValidationError

    from subjectpairs.pipelines.config import CaptionerConfig

    settings = CaptionerConfig()
    assert (settings.ranker, settings.samples, settings.top_p, settings.min_length, settings.keep,
            settings.label_match) == ("openai/clip-vit-large-patch14", 48, 0.95, 5, 5, "any")
    with pytest.raises(ValidationError, match="min_length 8 exceeds max_new_tokens 6"):
        CaptionerConfig(min_length=8, max_new_tokens=6)


def test_missing_blip2_or_ranker_is_a_clear_error(tmp_path, tiny_blip2):
    with pytest.raises(InputError, match="cannot load BLIP-2"):
        Blip2Captioner.from_pretrained(str(tmp_path / "none"), ranker=None)
    with pytest.raises(InputError, match="cannot load the CLIP caption ranker"):
        Blip2Captioner.from_pretrained(str(tiny_blip2), ranker=str(tmp_path / "none"), device="cpu")


def test_a_captioner_failing_on_one_photo_rejects_only_that_pair(tmp_path):
    from types import SimpleNamespace

    from subjectpairs.pipelines.boxes import WHOLE_IMAGE
    from subjectpairs.pipelines.chunks import ChunkBuilder
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


def test_caption_sources_are_tried_in_registry_order_and_a_new_one_is_one_line(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from subjectpairs.pipelines import caption_sources
    from subjectpairs.pipelines.boxes import WHOLE_IMAGE
    from subjectpairs.pipelines.config import BuildConfig
    from subjectpairs.pipelines.shards import Candidate

    class CatsOnly:
        """A source as a new module would add one: captions for cats, nothing for the rest."""

        @classmethod
        def from_config(cls, config):
            return cls()

        def caption(self, done):
            return [(["a cat, seen by the new source"], "cats") if c.category == "Cat" else None for c, _ in done]

    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image_id": "a", "label": "Cat", "captions": ["a cat from the file"]}) + "\n")
    config = BuildConfig(out=str(tmp_path / "out"), candidates=str(tmp_path / "c.parquet"), captions=str(captions))
    done = [(Candidate(key, key, "/m/0", category, WHOLE_IMAGE, f"{key}.jpg"), SimpleNamespace(target=None))
            for key, category in (("a", "Cat"), ("b", "Cat"), ("c", "Dog"))]
    registry = caption_sources.CAPTION_SOURCES
    monkeypatch.setattr(caption_sources, "CAPTION_SOURCES", (registry[0], CatsOnly, *registry[1:]))
    assert caption_sources.caption_pairs(caption_sources.caption_sources(config), done) == [
        (["a cat from the file"], "captions.jsonl"),  # the file first
        (["a cat, seen by the new source"], "cats"),  # then the new source
        (["a photo of a dog"], "template"),  # the template last
    ]
