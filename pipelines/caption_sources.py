"""Where a pair's captions come from: sources tried in order, each filling the pairs the earlier ones left.

A source is a class with ``from_config(config)`` (the source, or None when the build does not use it) and
``caption(done)``: per pair, ``(captions, label)`` for the pair json's ``captions`` and ``caption_source``,
a rejection, or None to leave the pair to the next source. Adding a source is its class and one line in
:data:`CAPTION_SOURCES`, whose order is the order a pair is tried in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

from subjectpairs.pipelines.captions import Blip2Captioner, Captions, template_caption
from subjectpairs.pipelines.config import BuildConfig
from subjectpairs.pipelines.pairs import Pair
from subjectpairs.pipelines.rejections import Rejection, isolate_failures
from subjectpairs.pipelines.shards import Candidate

Captioned = tuple[list[str], str] | Rejection | None
Done = Sequence[tuple[Candidate, Pair]]


class CaptionSource(Protocol):
    @classmethod
    def from_config(cls, config: BuildConfig) -> "CaptionSource | None":
        ...

    def caption(self, done: Done) -> list[Captioned]:
        ...


class FileCaptions:
    """The user's ``captions.jsonl``, by photo and label."""

    label = "captions.jsonl"

    def __init__(self, captions: Captions) -> None:
        self.captions = captions

    @classmethod
    def from_config(cls, config: BuildConfig) -> "FileCaptions | None":
        return cls(Captions.from_jsonl(config.captions)) if config.captions else None

    def caption(self, done: Done) -> list[Captioned]:
        found = [self.captions.from_file(candidate.image_id, candidate.category) for candidate, _ in done]
        return [(captions, self.label) if captions else None for captions in found]


def load_captioner(config: BuildConfig) -> Blip2Captioner:
    settings = config.captioner
    assert settings.model is not None
    return Blip2Captioner.from_pretrained(
        settings.model, ranker=settings.ranker, device=settings.device, keep=settings.keep,
        label_match=settings.label_match, samples=settings.samples, top_p=settings.top_p,
        min_length=settings.min_length, max_new_tokens=settings.max_new_tokens, seed=config.pair.seed,
    )


class ModelCaptions:
    """A captioning model: BLIP-2 with the authors' CapFilt (``captioner.model``), loaded on first use, or
    the proxy of a model actor that a build task puts in ``captioner``. One batch per call; a pair that the
    model fails on alone is rejected, the others keep their captions."""

    def __init__(self, load: Callable[[], Any] | None) -> None:
        self._load = load
        self.captioner: Any = None

    @classmethod
    def from_config(cls, config: BuildConfig) -> "ModelCaptions":
        # present even without a model configured: a task may be handed an actor's proxy
        return cls(partial(load_captioner, config) if config.captioner.model is not None else None)

    def model(self) -> Any:
        if self.captioner is None and self._load is not None:
            self.captioner = self._load()
        return self.captioner

    def caption(self, done: Done) -> list[Captioned]:
        captioner = self.model()
        if captioner is None or not done:
            return [None] * len(done)

        def caption(indices: list[int]) -> list[list[str]]:
            return captioner.caption([done[i][1].target for i in indices], [done[i][0].category for i in indices],
                                     [done[i][0].key for i in indices])

        generated = isolate_failures(caption, list(range(len(done))), [candidate.key for candidate, _ in done],
                                     "caption")
        return [found if isinstance(found, Rejection) else (found, captioner.name) if found else None
                for found in generated]


class TemplateCaptions:
    """``a photo of a {label}``: every pair gets one."""

    label = "template"

    @classmethod
    def from_config(cls, config: BuildConfig) -> "TemplateCaptions":
        return cls()

    def caption(self, done: Done) -> list[Captioned]:
        return [(template_caption(candidate.category), self.label) for candidate, _ in done]


# Every caption source, in the order a pair is tried.
CAPTION_SOURCES: tuple[type[CaptionSource], ...] = (FileCaptions, ModelCaptions, TemplateCaptions)


def caption_sources(config: BuildConfig) -> list[CaptionSource]:
    """The sources ``config`` uses, in :data:`CAPTION_SOURCES` order."""
    return [source for kind in CAPTION_SOURCES if (source := kind.from_config(config)) is not None]


def caption_pairs(sources: Sequence[CaptionSource], done: Done) -> list[tuple[list[str], str] | Rejection]:
    """Per pair, the first source's captions or rejection; each source sees only the pairs left to it."""
    results: list[Captioned] = [None] * len(done)
    for source in sources:
        missing = [index for index, result in enumerate(results) if result is None]
        if not missing:
            break
        for index, result in zip(missing, source.caption([done[index] for index in missing])):
            results[index] = result
    unfilled = [done[index][0].key for index, result in enumerate(results) if result is None]
    if unfilled:
        raise ValueError(f"no caption source gave captions for {', '.join(unfilled[:5])}")
    return results  # type: ignore[return-value]  # every None was filled
