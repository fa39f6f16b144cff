"""Why a candidate did not become a pair.

A stage that cannot make a pair raises :class:`PairRejected`; the caller records it (key, stage, reason,
detail) and goes on with the next sample. Reasons are short fixed words so they can be counted.
"""

from __future__ import annotations

from dataclasses import dataclass


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
