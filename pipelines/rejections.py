"""Why a candidate did not become a pair.

A stage that cannot make a pair raises :class:`PairRejected`; the caller records it (key, stage, reason,
detail) and goes on with the next sample. Reasons are short fixed words so they can be counted, and a
reason alone says whether a rerun tries the sample again (:data:`RETRYABLE_REASONS`). Any other exception
from one sample becomes that sample's ``unexpected_error``, naming the exception, so it never stops a job.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, TypeVar

UNEXPECTED_ERROR = "unexpected_error"
# The stages in the order a candidate passes them (review: the exclude file, before the build), so rejects
# counted by stage read as the build's funnel.
STAGES = ("review", "fetch", "decode", "box", "prepare", "segment", "trimap", "matting", "finish", "quality",
          "composite", "caption")
# Failures that may clear by themselves (a server down, overloaded or slow): a rerun builds these samples
# again. Every other reason is permanent (404, a photo that does not decode, a refused URL) and is kept.
RETRYABLE_REASONS = frozenset({"timeout", "deadline", "connection_error", "truncated", "http_5xx", "http_429"})
# Builds made before the HTTP reasons were split recorded 5xx, 429 and other 4xx alike as "http_error": a
# rerun tries those again too (a 4xx comes back as a permanent http_4xx).
LEGACY_RETRYABLE_REASONS = frozenset({"http_error"})
# "<_io.BytesIO object at 0x7f...>": an address differs run to run, so a detail holding one would make
# rejects.parquet differ between identical builds.
_OBJECT_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

Item = TypeVar("Item")
Result = TypeVar("Result")


def describe_error(error: BaseException) -> str:
    """``Type: message`` of an exception, the same on every run (object addresses left out)."""
    return _OBJECT_ADDRESS.sub("", f"{type(error).__name__}: {error}")


def stage_rank(stage: str) -> tuple[int, str]:
    """Sort key of a stage: its place in :data:`STAGES`, an unknown one after them all."""
    return (STAGES.index(stage) if stage in STAGES else len(STAGES), stage)


def count_by_stage(stages: Iterable[str]) -> dict[str, int]:
    """Rejects per stage, the stages in the order candidates pass them."""
    counts = Counter(stages)
    return {stage: counts[stage] for stage in sorted(counts, key=stage_rank)}


class PairRejected(Exception):
    def __init__(self, stage: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{stage}: {reason}" + (f" ({detail})" if detail else ""))
        self.stage = stage
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Rejection:
    key: str
    stage: str
    reason: str
    detail: str

    @classmethod
    def from_error(cls, key: str, error: PairRejected) -> "Rejection":
        return cls(key=key, stage=error.stage, reason=error.reason, detail=error.detail)

    @classmethod
    def from_exception(cls, key: str, stage: str, error: Exception) -> "Rejection":
        """A :class:`PairRejected` as it is; any other exception as ``stage``'s ``unexpected_error``."""
        if isinstance(error, PairRejected):
            return cls.from_error(key, error)
        return cls(key=key, stage=stage, reason=UNEXPECTED_ERROR, detail=describe_error(error))

    @property
    def retryable(self) -> bool:
        return self.reason in RETRYABLE_REASONS or self.reason in LEGACY_RETRYABLE_REASONS


def isolate_failures(
    run: Callable[[Sequence[Item]], Sequence[Result]], items: Sequence[Item], keys: Sequence[str], stage: str
) -> list[Result | Rejection]:
    """``run`` over the whole batch, one result per item; should the batch fail, each item alone, so only
    an item that fails by itself is rejected and the others go on."""
    try:
        return list(run(items))
    except Exception as error:
        if len(items) == 1:
            return [Rejection.from_exception(keys[0], stage, error)]
    return [result for item, key in zip(items, keys) for result in isolate_failures(run, [item], [key], stage)]
