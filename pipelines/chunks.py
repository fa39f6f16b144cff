"""The chunk runner: one chunk of candidates in, its shards and its record out, in one process, without Ray.

A :class:`ChunkBuilder` fetches a chunk's photos (on a few threads), builds the pairs in batches (decode,
segment, trimap, matting, composite, quality), captions them and writes them through the corpus writer,
which publishes the chunk's tars whole. The build job runs it in Ray tasks; tests run it directly.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from subjectpairs.corpus.manifest import ShardEntry
from subjectpairs.corpus.writer import ChunkWriter
from subjectpairs.pipelines.caption_sources import ModelCaptions, caption_pairs, caption_sources
from subjectpairs.pipelines.config import BuildConfig
from subjectpairs.pipelines.fetch import PhotoFetcher
from subjectpairs.pipelines.pairs import Pair, PairBuilder, PairRequest
from subjectpairs.pipelines.rejections import PairRejected, Rejection
from subjectpairs.pipelines.segmenters import SegmenterChoice
from subjectpairs.pipelines.shards import Candidate, ChunkPlan


# Threads fetching one batch's photos at once, so slow servers overlap instead of idling the core.
FETCH_THREADS = 8


@dataclass
class ChunkRecord:
    chunk: int
    plan_sha256: str  # the chunk's keys: a record only counts for the same plan
    shards: list[ShardEntry]
    pairs: int
    rejects: list[Rejection]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        record = {**asdict(self), "shards": [shard.model_dump() for shard in self.shards]}
        return json.dumps(record, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ChunkRecord":
        data = json.loads(text)
        return cls(
            chunk=data["chunk"], plan_sha256=data["plan_sha256"],
            shards=[ShardEntry.model_validate(s) for s in data["shards"]], pairs=data["pairs"],
            rejects=[Rejection(**r) for r in data["rejects"]], seconds=data.get("seconds", {}),
        )


def plan_sha256(plan: ChunkPlan) -> str:
    text = "\n".join(f"{c.key}\t{c.photo_uri}\t{c.box.as_list()}\t{c.category}" for c in plan.candidates)
    return hashlib.sha256(text.encode()).hexdigest()


def sample_json(pair: Pair, candidate: Candidate, captions: list[str], caption_source: str, config_hash: str) -> bytes:
    meta = pair.meta()
    meta.pop("seconds")  # timings vary run to run; shards must not
    meta.update(
        image_id=candidate.image_id, label_mid=candidate.label_mid, captions=captions,
        caption_source=caption_source, config_hash=config_hash, source=candidate.photo_uri,
    )
    return json.dumps(meta, sort_keys=True).encode()




class ChunkBuilder:
    """Builds chunks in one worker process; the segmenter, backgrounds and captions load once."""

    def __init__(self, config: BuildConfig, segmenter: SegmenterChoice | None = None) -> None:
        import cv2

        cv2.setNumThreads(1)  # one core per task; parallelism comes from Ray
        self.config = config
        self.config_hash = config.config_hash()
        self.pairs = PairBuilder(config.pair, choice=segmenter)
        self.fetcher = PhotoFetcher(config.fetch)
        self.caption_sources = caption_sources(config)

    @property
    def captioner(self) -> Any:
        """The captioning model: an actor's proxy when a task was given one, else BLIP-2 loaded here on
        first use (None without one)."""
        return self._model_captions.model()

    @captioner.setter
    def captioner(self, captioner: Any) -> None:
        self._model_captions.captioner = captioner

    @property
    def _model_captions(self) -> ModelCaptions:
        return next(source for source in self.caption_sources if isinstance(source, ModelCaptions))

    def _captions(self, done: list[tuple[Candidate, Pair]]) -> list[tuple[list[str], str] | Rejection]:
        """Per pair, its captions and their source (see :mod:`~subjectpairs.pipelines.caption_sources`), or
        its rejection."""
        return caption_pairs(self.caption_sources, done)

    def _fetch_batch(self, batch: tuple[Candidate, ...]) -> list[PairRequest | Rejection]:
        def fetch(candidate: Candidate) -> PairRequest | Rejection:
            try:
                photo = self.fetcher.fetch(candidate.photo_uri, local=not candidate.photo_from_url)
            except PairRejected as exc:
                return Rejection.from_error(candidate.key, exc)
            return PairRequest(candidate.key, candidate.category, photo, candidate.box, source=candidate.photo_uri)

        with ThreadPoolExecutor(min(FETCH_THREADS, len(batch))) as pool:
            return list(pool.map(fetch, batch))

    def build(self, plan: ChunkPlan, report: Callable[[int, int], None] | None = None) -> ChunkRecord:
        writer = ChunkWriter(self.config.out, plan.index, self.config.shards.max_bytes)
        rejects: list[Rejection] = []
        seconds: Counter[str] = Counter()
        pairs = 0
        try:
            size = self.config.batch_size
            for start in range(0, len(plan.candidates), size):
                batch = plan.candidates[start:start + size]
                started = time.perf_counter()
                fetched = self._fetch_batch(batch)
                seconds["fetch"] += time.perf_counter() - started
                requests = [item for item in fetched if isinstance(item, PairRequest)]
                built = iter(self.pairs.build(requests))
                done: list[tuple[Candidate, Pair]] = []
                for candidate, item in zip(batch, fetched):
                    result = item if isinstance(item, Rejection) else next(built)
                    if isinstance(result, Rejection):
                        rejects.append(result)
                    else:
                        done.append((candidate, result))
                started = time.perf_counter()
                captions = self._captions(done)
                seconds["caption"] += time.perf_counter() - started
                for (candidate, pair), captioned in zip(done, captions):
                    if isinstance(captioned, Rejection):
                        rejects.append(captioned)
                        continue
                    texts, source = captioned
                    encode_started = time.perf_counter()
                    members = pair.members()
                    members["json"] = sample_json(pair, candidate, texts, source, self.config_hash)
                    writer.write(candidate.key, members)
                    seconds.update(pair.seconds)
                    seconds["encode"] += time.perf_counter() - encode_started
                    pairs += 1
                if report is not None:
                    written = sum(not isinstance(c, Rejection) for c in captions)
                    report(written, len(batch) - written)
            started = time.perf_counter()
            shards = writer.publish()
            seconds["publish"] += time.perf_counter() - started
        finally:
            writer.close()
        return ChunkRecord(plan.index, plan_sha256(plan), shards, pairs, rejects, dict(seconds))
