"""Captions of each pair's photo, and where they came from.

The paper captioned every photo with BLIP-2 OPT-6.7b (CapFilt: 48 nucleus samples ranked by CLIP ViT-L/14
image-text similarity, up to five that contain a word of the label, else the best one). Captions come, in
this order, from a ``captions.jsonl`` file (one ``{"image_id", "label", "captions"}`` object per line;
``label`` is the class display name), from a BLIP-2 captioning stage, or, without one, from a template;
every pair's json says which.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, Sequence

import numpy as np

from subjectpairs import storage
from subjectpairs.devices import resolve_device
from subjectpairs.errors import InputError
from subjectpairs.seeds import keyed_digest

TEMPLATE = "a photo of a {label}"
WORD = r"[a-z0-9']+"  # a lowercase word token of a label or a caption


class Captions:
    """The captions of a captions.jsonl file, by (image_id, lowercased label); empty without a file."""

    def __init__(self, by_subject: dict[tuple[str, str], list[str]] | None = None) -> None:
        self._by_subject = by_subject or {}

    @classmethod
    def from_jsonl(cls, uri: str) -> "Captions":
        by_subject: dict[tuple[str, str], list[str]] = {}
        text = storage.read_bytes(uri).decode("utf-8")
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = (str(record["image_id"]), str(record["label"]).lower())
                captions = record["captions"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InputError(f"{uri}, line {number}: expected {{image_id, label, captions}} ({exc})") from exc
            if isinstance(captions, str):
                captions = [captions]
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise InputError(f"{uri}, line {number}: captions must be a string or a list of strings")
            by_subject.setdefault(key, []).extend(captions)
        return cls(by_subject)

    def from_file(self, image_id: str, category: str) -> list[str]:
        return self._by_subject.get((image_id, category.lower()), [])


def template_caption(category: str) -> list[str]:
    return [TEMPLATE.format(label=category.lower())]


LabelMatch = Literal["any", "all"]


def _load_frozen(model_class: Any, processor_class: Any, source: str, *, dtype: Any, device: str,
                 what: str) -> tuple[Any, Any]:
    """A model (frozen, in eval mode, on ``device``) and its processor from a hub id or folder; one
    InputError naming ``what`` when they do not load."""
    try:
        processor = processor_class.from_pretrained(source)
        model = model_class.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise InputError(f"{source}: cannot load {what} ({exc})") from exc
    model.requires_grad_(False)
    return model.eval().to(device), processor


class ClipRanker:
    """CLIP (transformers ``CLIPModel``) from a hub id or a folder, ordering captions by how well they
    match their photo: the cosine of the projected image and text embeddings, best first."""

    def __init__(self, model: Any, processor: Any, source: str) -> None:
        self.model = model
        self.processor = processor
        self.source = source
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, source: str, *, device: str, dtype: Any) -> "ClipRanker":
        from transformers import CLIPModel, CLIPProcessor

        model, processor = _load_frozen(CLIPModel, CLIPProcessor, source, dtype=dtype, device=device,
                                        what="the CLIP caption ranker")
        return cls(model, processor, source)

    def similarities(self, images: Sequence[np.ndarray],
                     captions: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Per photo, the similarity of each of its captions; all photos and captions in one batch each."""
        import torch

        texts = [text for per_image in captions for text in per_image]
        if not texts:
            return [np.zeros(0, dtype=np.float32) for _ in captions]
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        tokens = tokens.to(self.device)
        with torch.inference_mode():
            image_embeds = self.model.get_image_features(
                pixel_values=pixels.to(self.device, self.model.dtype)).pooler_output
            text_embeds = self.model.get_text_features(**tokens).pooler_output
        image_embeds = torch.nn.functional.normalize(image_embeds.float(), dim=-1).cpu().numpy()
        text_embeds = torch.nn.functional.normalize(text_embeds.float(), dim=-1).cpu().numpy()
        bounds = np.cumsum([0] + [len(per_image) for per_image in captions])
        return [text_embeds[begin:end] @ image_embeds[index]
                for index, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:]))]

    def rank(self, images: Sequence[np.ndarray], captions: Sequence[Sequence[str]]) -> list[list[str]]:
        """Each photo's captions, most similar first (ties keep their order)."""
        return [
            [per_image[i] for i in np.argsort(-scores, kind="stable")]
            for per_image, scores in zip(captions, self.similarities(images, captions))
        ]


class Blip2Captioner:
    """BLIP-2 (transformers ``Blip2ForConditionalGeneration``) from a hub id or a folder, filtered as the
    authors' CapFilt did.

    Per photo: nucleus-sample ``samples`` captions, rank the distinct ones by CLIP image-text similarity
    (``ranker``; without one they keep the sampling order), keep up to ``keep`` that mention the label
    (``label_match``), and when none does, the top-ranked caption. Sampling is seeded per batch from the
    sample keys, so the same photos always get the same captions.
    """

    def __init__(self, model: Any, processor: Any, source: str, *, ranker: ClipRanker | None, keep: int,
                 label_match: LabelMatch, samples: int, top_p: float, min_length: int, max_new_tokens: int,
                 seed: int) -> None:
        self.model = model
        self.processor = processor
        self.source = source
        self.ranker = ranker
        self.keep = keep
        self.label_match = label_match
        self.samples = samples
        self.top_p = top_p
        self.min_length = min_length
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, source: str, *, ranker: str | None, device: str = "auto", keep: int = 5,
                        label_match: LabelMatch = "any", samples: int = 48, top_p: float = 0.95,
                        min_length: int = 5, max_new_tokens: int = 30, seed: int = 0) -> "Blip2Captioner":
        import torch
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        device = resolve_device(device)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model, processor = _load_frozen(Blip2ForConditionalGeneration, Blip2Processor, source, dtype=dtype,
                                        device=device, what="BLIP-2")
        clip = None if ranker is None else ClipRanker.from_pretrained(ranker, device=device, dtype=dtype)
        return cls(model, processor, source, ranker=clip, keep=keep, label_match=label_match, samples=samples,
                   top_p=top_p, min_length=min_length, max_new_tokens=max_new_tokens, seed=seed)

    @property
    def name(self) -> str:
        return f"blip2:{self.source}" + ("" if self.ranker is None else f"+clip:{self.ranker.source}")

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) the vision encoder sees."""
        size = self.processor.image_processor.size
        return int(size["width"]), int(size["height"])

    def sample(self, images: Sequence[np.ndarray], keys: Sequence[str]) -> list[list[str]]:
        """``samples`` captions per photo, seeded by the keys; photos already at ``input_size``."""
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        digest = keyed_digest(self.seed, "|".join(keys))
        torch.manual_seed(int.from_bytes(digest[:8], "little"))
        with torch.inference_mode():
            # min_new_tokens, not min_length: the prompt holds the image's query tokens, which min_length
            # would count
            generated = self.model.generate(
                **inputs, do_sample=True, top_p=self.top_p, num_return_sequences=self.samples,
                min_new_tokens=self.min_length, max_new_tokens=self.max_new_tokens,
            )
        texts = [text.strip() for text in self.processor.batch_decode(generated, skip_special_tokens=True)]
        return [texts[index * self.samples:(index + 1) * self.samples] for index in range(len(images))]

    def caption(self, images: Sequence[np.ndarray], labels: Sequence[str], keys: Sequence[str]) -> list[list[str]]:
        """Captions per photo; photos may come already shrunk to ``input_size`` (from another process)."""
        from subjectpairs.pipelines.segmentation import shrink_for_model

        if not images:
            return []
        shrunk = shrink_for_model(images, self.input_size)
        distinct = [list(dict.fromkeys(c for c in sampled if c)) for sampled in self.sample(shrunk, keys)]
        ranked = distinct if self.ranker is None else self.ranker.rank(shrunk, distinct)
        return [capfilt(captions, label, self.keep, self.label_match)
                for captions, label in zip(ranked, labels)]


def mentions_label(caption: str, label: str, match: LabelMatch = "any") -> bool:
    """Whether ``caption`` contains any (or all) of the lowercase words of ``label`` as words."""
    words = set(re.findall(WORD, label.lower()))
    tokens = set(re.findall(WORD, caption.lower()))
    return bool(words & tokens) if match == "any" else words <= tokens


def keep_mentioning(captions: Sequence[str], label: str, keep: int, match: LabelMatch = "any") -> list[str]:
    """Up to ``keep`` distinct captions, in order, that mention ``label``."""
    distinct = dict.fromkeys(c.strip() for c in captions)
    return [caption for caption in distinct if caption and mentions_label(caption, label, match)][:keep]


def capfilt(ranked: Sequence[str], label: str, keep: int, match: LabelMatch = "any") -> list[str]:
    """The kept captions of one photo from its captions best first: up to ``keep`` that mention the label,
    else the top-ranked one (none only when nothing was sampled)."""
    return keep_mentioning(ranked, label, keep, match) or list(ranked[:1])
