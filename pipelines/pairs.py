"""One training pair from one photo and one subject: the stages, and a builder that composes them.

The stages are plain functions over records so a distributed job can schedule them where they fit:
``prepare`` (decode, box, given trimap: CPU), a segmenter's ``segment`` (batched, GPU when there is
one), ``finish`` (trimap, matting, metrics, quality gate, composite: one CPU core). :class:`PairBuilder`
runs them in one process for the command line and tests.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from subjectpairs.pipelines.boxes import WHOLE_IMAGE, Box
from subjectpairs.pipelines.composite import BackgroundPool, blend
from subjectpairs.pipelines.config import PairConfig
from subjectpairs.pipelines.images import decode_image, encode_jpeg, encode_png, to_uint8
from subjectpairs.pipelines.matting import matte
from subjectpairs.pipelines.quality import pair_metrics, quality_gate
from subjectpairs.pipelines.rejections import PairRejected, Rejection, isolate_failures
from subjectpairs.pipelines.segmentation import Segmenter, prompt_for
from subjectpairs.pipelines.segmenters import SegmenterChoice, build_segmenter
from subjectpairs.pipelines.trimap import make_trimap, read_trimap

PIPELINE_VERSION = "2"  # 2: background_pool in the pair json
# What a training shard holds per pair; the pair command also writes foreground.png and meta.json.
MEMBERS = ("input.jpg", "target.jpg", "alpha.png", "trimap.png")


def photo_key(stem: str, category: str) -> str:
    """A key with no dots (webdataset splits member names at the first dot)."""
    return re.sub(r"[^0-9A-Za-z_-]+", "-", f"{stem}_{category}").strip("-")


@dataclass
class PairRequest:
    key: str
    category: str
    photo: bytes
    box: Box = WHOLE_IMAGE
    trimap: bytes | None = None  # a given trimap skips segmentation
    source: str = ""


@dataclass
class Prepared:
    request: PairRequest
    box: Box
    target: np.ndarray  # HxWx3 uint8 at working size
    trimap: np.ndarray | None
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Pair:
    key: str
    category: str
    box: Box
    target: np.ndarray
    composite: np.ndarray
    alpha: np.ndarray
    trimap: np.ndarray
    foreground: np.ndarray
    background: str
    background_pool: str | None
    metrics: dict[str, Any]
    segmenter: dict[str, Any]
    solve: dict[str, Any]
    seed: int
    source: str
    seconds: dict[str, float]

    def members(self) -> dict[str, bytes]:
        """The encoded images, by member name (fixed encoder settings: same pixels, same bytes)."""
        return {
            "input.jpg": encode_jpeg(self.composite),
            "target.jpg": encode_jpeg(self.target),
            "alpha.png": encode_png(to_uint8(self.alpha)),
            "trimap.png": encode_png(self.trimap),
        }

    def foreground_png(self) -> bytes:
        """The subject alone: estimated colours with alpha (RGBA)."""
        return encode_png(np.dstack([self.foreground, to_uint8(self.alpha)]))

    def meta(self) -> dict[str, Any]:
        height, width = self.target.shape[:2]
        return {
            "key": self.key,
            "category": self.category,
            "box": self.box.as_list(),
            "size": [width, height],
            "background": self.background,
            "background_pool": self.background_pool,
            "seed": self.seed,
            "segmenter": self.segmenter,
            "solve": self.solve,
            "metrics": self.metrics,
            "source": self.source,
            "pipeline_version": PIPELINE_VERSION,
            "seconds": {name: round(value, 4) for name, value in self.seconds.items()},
        }


def prepare(request: PairRequest, config: PairConfig) -> Prepared:
    """Decode the photo at working size and check the box (and the given trimap, if any)."""
    started = time.perf_counter()
    box = request.box.checked()
    target = decode_image(request.photo, config.size, min_side=config.min_side)
    trimap = None if request.trimap is None else read_trimap(request.trimap, target.shape[:2])
    return Prepared(request, box, target, trimap, {"decode": time.perf_counter() - started})


def finish(
    prepared: Prepared, subject_map: np.ndarray | None, config: PairConfig, backgrounds: BackgroundPool,
    segmenter_info: dict[str, Any],
) -> Pair:
    """Trimap (unless given), matting, foreground, metrics, quality gate and composite for one prepared
    sample; a sample outside the quality bounds is rejected before its background is read."""
    seconds = dict(prepared.seconds)
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = seconds.get(stage, 0.0) + now - clock
        clock = now

    request, box, target = prepared.request, prepared.box, prepared.target
    normalized = None
    if prepared.trimap is not None:
        trimap = prepared.trimap
    else:
        assert subject_map is not None, "a sample without a given trimap needs a segmentation map"
        trimap, normalized = make_trimap(subject_map, box, config.trimap)
    lap("trimap")
    result = matte(target, trimap, config.matting)
    lap("matting")
    metrics = pair_metrics(
        result.alpha, trimap, normalized, box, config.trimap.box_padding, config.trimap.high, result.residual
    )
    quality_gate(metrics, config.quality)
    lap("quality")
    background_id, background = backgrounds.background_for(config.seed, request.key, target.shape[:2])
    composite = blend(result.foreground, result.alpha, background)
    lap("composite")
    return Pair(
        key=request.key, category=request.category, box=box, target=target, composite=composite,
        alpha=result.alpha, trimap=trimap, foreground=result.foreground, background=background_id,
        background_pool=backgrounds.pool_id,
        metrics=metrics, segmenter=segmenter_info if prepared.trimap is None else {"name": "given-trimap"},
        solve={"scale": round(result.solve_scale, 4), "box": list(result.solve_box)},
        seed=config.seed, source=request.source, seconds=seconds,
    )


class PairBuilder:
    """Runs the stages for a batch of requests; a bad sample becomes a :class:`Rejection`, never an
    exception that stops the batch."""

    def __init__(
        self, config: PairConfig, segmenter: Segmenter | None = None, backgrounds: BackgroundPool | None = None,
        choice: SegmenterChoice | None = None,
    ) -> None:
        """``choice``: the segmenter a driver resolved for the whole run (default: resolved here)."""
        self.config = config
        self.choice = choice
        self._segmenter = segmenter
        self.backgrounds = backgrounds or BackgroundPool.from_entries(config.composite.backgrounds)

    @property
    def segmenter(self) -> Segmenter:
        # Built on first need: a batch where every trimap is given never loads a model.
        if self._segmenter is None:
            self._segmenter = build_segmenter(self.config.segmenter, self.choice)
        return self._segmenter

    @segmenter.setter
    def segmenter(self, segmenter: Segmenter | None) -> None:
        """Use ``segmenter``; None goes back to building the configured one on first need."""
        self._segmenter = segmenter

    def build(self, requests: Iterable[PairRequest]) -> list[Pair | Rejection]:
        """One result per request, in order. A key seen twice is rejected the second time, so a batch
        never yields the same sample twice."""
        results: list[Pair | Rejection | None] = []
        ready: list[tuple[int, Prepared]] = []
        seen: set[str] = set()
        for request in requests:
            results.append(None)
            try:
                if request.key in seen:
                    raise PairRejected("prepare", "duplicate_key", f"{request.key} appears twice in the batch")
                seen.add(request.key)
                ready.append((len(results) - 1, prepare(request, self.config)))
            except Exception as exc:  # an odd photo (an OpenCV error, ...) is its own rejection
                results[-1] = Rejection.from_exception(request.key, "prepare", exc)
        maps = self._segment([prepared for _, prepared in ready if prepared.trimap is None])
        for index, prepared in ready:
            subject_map = maps.get(prepared.request.key)
            if isinstance(subject_map, Rejection):
                results[index] = subject_map
                continue
            try:
                results[index] = finish(
                    prepared, subject_map, self.config, self.backgrounds,
                    self.segmenter.describe() if prepared.trimap is None else {},
                )
            except Exception as exc:
                results[index] = Rejection.from_exception(prepared.request.key, "finish", exc)
        return results  # type: ignore[return-value]  # every slot is filled above

    def _segment(self, pending: Sequence[Prepared]) -> dict[str, np.ndarray | Rejection]:
        """Each sample's map, or its rejection should the segmenter fail on that sample alone."""
        if not pending:
            return {}
        segmenter = self.segmenter  # loading a model is set-up, not per-sample time

        def segment(batch: Sequence[Prepared]) -> list[np.ndarray]:
            return segmenter.segment(
                [p.target for p in batch], [prompt_for(p.request.category) for p in batch], [p.box for p in batch]
            )

        started = time.perf_counter()
        maps = isolate_failures(segment, pending, [p.request.key for p in pending], "segment")
        share = (time.perf_counter() - started) / len(pending)
        for prepared in pending:
            prepared.seconds["segment"] = share
        return {p.request.key: m for p, m in zip(pending, maps)}


def write_pair(pair: Pair, out_dir: str, extra: dict[str, bytes] | None = None) -> list[str]:
    """Write a pair's members, meta.json and ``extra`` files to ``out_dir`` together (staged, then
    renamed)."""
    from subjectpairs.storage import StagedOutputs

    started = time.perf_counter()
    members = pair.members()
    pair.seconds["encode"] = time.perf_counter() - started
    members["foreground.png"] = pair.foreground_png()
    with StagedOutputs(out_dir) as staged:
        for name, data in members.items():
            staged.put(name, data)
        staged.put("meta.json", (json.dumps(pair.meta(), indent=2) + "\n").encode())
        for name, data in (extra or {}).items():
            staged.put(name, data)
        return staged.commit()
