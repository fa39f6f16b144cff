"""The segmenters a run can choose, and the choice: configured, resolved once in the driver, built in workers.

Adding a segmenter: a module ``segmenter_<name>.py`` with a class that follows
:class:`~subjectpairs.pipelines.segmentation.Segmenter`, and its line in :data:`SEGMENTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from subjectpairs.configfile import RUN_ONLY
from subjectpairs.errors import InputError
from subjectpairs.pipelines.segmentation import Segmenter
from subjectpairs.pipelines.segmenter_clipseg import DEFAULT_CLIPSEG, ClipSegSegmenter, clipseg_in_hub_cache
from subjectpairs.pipelines.segmenter_grabcut import GrabCutSegmenter

# Every segmenter by the name a config gives as ``pair.segmenter.kind``.
SEGMENTERS: dict[str, type[Segmenter]] = {segmenter.name: segmenter for segmenter in (
    ClipSegSegmenter,
    GrabCutSegmenter,
)}


class SegmenterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # auto: CLIPSeg when weights are configured or in the local hub cache, otherwise GrabCut (works offline,
    # with a warning: it is not the paper's recipe).
    kind: str = Field("auto", description=f"auto or a segmenter: {', '.join(SEGMENTERS)}")
    model: str | None = Field(None, description=f"CLIPSeg hub id or folder (clipseg default: {DEFAULT_CLIPSEG})")
    # whether a fallback may run, not what runs: a build that passes with it makes the same shards
    require_clipseg: bool = Field(
        False, description="stop at start-up instead of letting auto fall back to GrabCut (the paper's recipe only)",
        json_schema_extra=RUN_ONLY,
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    batch_size: int = Field(32, ge=1)
    grabcut_iterations: int = Field(3, ge=1, le=20)
    grabcut_side: int = Field(128, ge=32, description="short side GrabCut works at; its mask is upsampled")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind != "auto" and kind not in SEGMENTERS:
            raise ValueError(f"unknown segmenter {kind!r}: auto or one of {', '.join(SEGMENTERS)}")
        return kind

    @model_validator(mode="after")
    def _clipseg_possible(self) -> "SegmenterConfig":
        if self.require_clipseg and self.kind == "grabcut":
            raise ValueError("require_clipseg contradicts kind grabcut")
        return self


# Kept word for word: it is in the metadata of every pair an ``auto`` build made with GrabCut, so those
# shards stay byte-identical.
NO_CLIPSEG = f"no CLIPSeg weights configured and {DEFAULT_CLIPSEG} is not on disk"


@dataclass(frozen=True)
class SegmenterChoice:
    """Which segmenter a run uses and why, decided once before any photo is segmented (in a build, by the
    driver before Ray starts, so every worker runs the same one)."""

    name: str  # a name in SEGMENTERS
    requested: str  # the configured kind: auto or a name in SEGMENTERS
    reason: str
    model: str | None = None  # the CLIPSeg hub id or folder

    @property
    def fallback(self) -> bool:
        """``auto`` found no CLIPSeg and took GrabCut: not the paper's recipe, and not chosen knowingly."""
        return self.requested == "auto" and self.name == "grabcut"

    def record(self) -> dict[str, Any]:
        """What ran and why, for stats.json."""
        record: dict[str, Any] = {"name": self.name, "requested": self.requested, "reason": self.reason,
                                  "fallback": self.fallback}
        if self.model is not None:
            record["model"] = self.model
        return record

    def warning(self) -> str | None:
        """One line for start-up when ``auto`` fell back to GrabCut, else None."""
        if not self.fallback:
            return None
        return (f"segmenter auto fell back to GrabCut ({self.reason}): the paper segments with CLIPSeg; "
                f"pass --model {DEFAULT_CLIPSEG} to use it (the weights download once into the hub cache), "
                "or --segmenter grabcut to choose GrabCut knowingly; --require-clipseg makes this an error")




def resolve_segmenter(config: SegmenterConfig) -> SegmenterChoice:
    """The segmenter ``config`` asks for: its ``kind``, or for ``auto`` the paper's CLIPSeg if it can run. ``auto`` takes CLIPSeg when a model is configured or the default
    one is in the local hub cache, and otherwise GrabCut, which needs no weights; with ``require_clipseg``
    that fallback is an InputError instead."""
    if config.kind != "auto":
        segmenter = SEGMENTERS[config.kind]
        model = (config.model or segmenter.default_model) if segmenter.runs_model else None
        return SegmenterChoice(config.kind, config.kind, f"configured as kind {config.kind}", model)
    if config.model is not None:
        return SegmenterChoice("clipseg", "auto", "auto, a CLIPSeg model is configured", config.model)
    if clipseg_in_hub_cache():
        return SegmenterChoice("clipseg", "auto", f"auto, {DEFAULT_CLIPSEG} is in the local hub cache",
                               DEFAULT_CLIPSEG)
    if config.require_clipseg:
        raise InputError(f"CLIPSeg is required (--require-clipseg) but segmenter auto would fall back to "
                         f"GrabCut: {NO_CLIPSEG}; pass --model {DEFAULT_CLIPSEG} (downloads the weights) "
                         "or --model with a CLIPSeg folder")
    return SegmenterChoice("grabcut", "auto", NO_CLIPSEG)


def build_segmenter(config: SegmenterConfig, choice: SegmenterChoice | None = None) -> Segmenter:
    """The segmenter ``choice`` names (by default the one ``config`` resolves to)."""
    choice = choice or resolve_segmenter(config)
    return SEGMENTERS[choice.name].from_config(config, choice)
