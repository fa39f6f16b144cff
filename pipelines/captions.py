"""Captions of each pair's photo, and where they came from.

The paper captioned every photo with BLIP-2 OPT-6.7b (CapFilt: up to five captions that contain the label
word). Captions come, in this order, from a ``captions.jsonl`` file (one ``{"image_id", "label",
"captions"}`` object per line; ``label`` is the class display name), from a BLIP-2 captioning stage, or
from a template; every pair's json says which.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Sequence

import numpy as np

from subjectpairs import storage
from subjectpairs.errors import InputError

TEMPLATE = "a photo of a {label}"


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


class Blip2Captioner:
    """BLIP-2 (transformers ``Blip2ForConditionalGeneration``) from a hub id or a folder.

    A light CapFilt, as in the paper: nucleus-sample ``samples`` captions per photo and keep up to
    ``keep`` distinct ones that mention the subject's label; a photo with none gets no captions here (the
    caller then falls back to the template and says so). Sampling is seeded per batch from the sample
    keys, so the same photos always get the same captions.
    """

    def __init__(self, model: Any, processor: Any, source: str, *, keep: int, samples: int, max_new_tokens: int,
                 seed: int) -> None:
        self.model = model
        self.processor = processor
        self.source = source
        self.keep = keep
        self.samples = samples
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, source: str, *, device: str = "auto", keep: int = 5, samples: int = 10,
                        max_new_tokens: int = 30, seed: int = 0) -> "Blip2Captioner":
        import torch
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        try:
            processor = Blip2Processor.from_pretrained(source)
            model = Blip2ForConditionalGeneration.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise InputError(f"{source}: cannot load BLIP-2 ({exc})") from exc
        model.requires_grad_(False)
        model.eval().to(device)
        return cls(model, processor, source, keep=keep, samples=samples, max_new_tokens=max_new_tokens,
                   seed=seed)

    @property
    def name(self) -> str:
        return f"blip2:{self.source}"

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) the vision encoder sees."""
        size = self.processor.image_processor.size
        return int(size["width"]), int(size["height"])

    def caption(self, images: Sequence[np.ndarray], labels: Sequence[str], keys: Sequence[str]) -> list[list[str]]:
        """Captions per photo; photos may come already shrunk to ``input_size`` (from another process)."""
        import torch

        from subjectpairs.pipelines.segmenters import shrink_for_model

        if not images:
            return []
        shrunk = shrink_for_model(images, self.input_size)
        inputs = self.processor(images=shrunk, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        digest = hashlib.sha256(f"{self.seed}\0{'|'.join(keys)}".encode()).digest()
        torch.manual_seed(int.from_bytes(digest[:8], "little"))
        with torch.inference_mode():
            generated = self.model.generate(
                **inputs, do_sample=True, top_p=0.9, num_return_sequences=self.samples,
                max_new_tokens=self.max_new_tokens,
            )
        texts = [text.strip() for text in self.processor.batch_decode(generated, skip_special_tokens=True)]
        return [
            keep_mentioning(texts[index * self.samples:(index + 1) * self.samples], label, self.keep)
            for index, label in enumerate(labels)
        ]


def keep_mentioning(captions: Sequence[str], label: str, keep: int) -> list[str]:
    """Up to ``keep`` distinct captions, in order, that contain every word of ``label`` as a word."""
    words = label.lower().split()
    kept = []
    for caption in dict.fromkeys(c.strip() for c in captions):
        tokens = set(re.findall(r"[a-z0-9']+", caption.lower()))
        if caption and all(word in tokens for word in words):
            kept.append(caption)
    return kept[:keep]
