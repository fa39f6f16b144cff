"""Captions of each pair's photo, and where they came from.

The paper captioned every photo with BLIP-2 OPT-6.7b (CapFilt: up to five captions that contain the label
word). A ``captions.jsonl`` file (one ``{"image_id", "label", "captions"}`` object per line; ``label`` is
the class display name) brings such captions in; without one, a template caption stands in and every
pair's json says so.
"""

from __future__ import annotations

import json

from subjectpairs import storage
from subjectpairs.errors import InputError

TEMPLATE = "a photo of a {label}"


class Captions:
    def __init__(self, by_subject: dict[tuple[str, str], list[str]], source: str) -> None:
        self._by_subject = by_subject
        self.source = source

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
        return cls(by_subject, source=uri)

    @classmethod
    def template_only(cls) -> "Captions":
        return cls({}, source="template")

    def for_subject(self, image_id: str, category: str) -> tuple[list[str], str]:
        """(captions, source): the file's captions when it has some for this subject, else the template."""
        found = self._by_subject.get((image_id, category.lower()))
        if found:
            return found, "captions.jsonl"
        return [TEMPLATE.format(label=category.lower())], "template"
