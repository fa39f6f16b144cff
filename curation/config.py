"""Typed, validated configuration of the subject filter, written next to every output."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from subjectpairs.storage import absolute, join

# BLIP-Diffusion appendix A.5, rule (v) and rule (vi), as display names of the class file.
HUMAN_CLASSES = (
    "Boy", "Girl", "Person", "Man", "Mammal", "Woman", "Human body", "Human head", "Human hair",
    "Human arm", "Human face", "Human leg", "Human hand", "Human foot", "Human eye", "Human mouth",
    "Human nose", "Human ear", "Clothing", "Suit",
)
CLUTTERED_CLASSES = ("Tree", "Plant", "Houseplant", "Desk", "Table", "Poster", "Billboard")


FILTER_PATH_KEYS = ("out", "bbox", "classes", "images", "zoo_dir")  # the settings that name files or folders


class FilterRules(BaseModel):
    """The six rules; defaults reproduce the paper."""

    model_config = ConfigDict(extra="forbid")

    human_classes: list[str] = Field(default_factory=lambda: list(HUMAN_CLASSES))
    cluttered_classes: list[str] = Field(default_factory=lambda: list(CLUTTERED_CLASSES))
    duplicates: Literal["paper", "keep-first"] = "paper"
    max_aspect: float = Field(2.0, ge=1.0)
    min_area: float = Field(0.3, ge=0.0, le=1.0)
    max_area: float = Field(0.8, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _area_interval(self) -> FilterRules:
        if self.min_area >= self.max_area:
            raise ValueError(f"min_area ({self.min_area}) must be below max_area ({self.max_area})")
        return self

    @property
    def excluded_classes(self) -> list[str]:
        return [*self.human_classes, *self.cluttered_classes]


class FilterConfig(BaseModel):
    """Inputs, output and rules of one filter run."""

    model_config = ConfigDict(extra="forbid")

    out: str
    bbox: str | None = None
    classes: str | None = None
    images: str | None = None
    zoo_dir: str | None = None
    split: str = "train"
    on_bad_rows: Literal["error", "skip"] = "error"
    rules: FilterRules = Field(default_factory=FilterRules)

    @model_validator(mode="after")
    def _one_source(self) -> FilterConfig:
        if self.zoo_dir is None and (self.bbox is None or self.classes is None):
            raise ValueError("give either zoo_dir, or both bbox and classes")
        if self.zoo_dir is not None and self.bbox is not None:
            raise ValueError("give zoo_dir or bbox, not both")
        return self

    def with_absolute_paths(self) -> FilterConfig:
        """Local paths made absolute, so ``config.yaml`` and the candidates' ``filepath`` name the same files
        from any working directory; URIs stay as they are."""
        return self.model_copy(update={key: absolute(getattr(self, key)) for key in FILTER_PATH_KEYS
                                       if getattr(self, key) is not None})

    def split_dir(self) -> str:
        assert self.zoo_dir is not None
        return join(self.zoo_dir, self.split)

    def bbox_uri(self) -> str:
        return self.bbox if self.bbox is not None else join(self.split_dir(), "labels", "detections.csv")

    def classes_uri(self) -> str:
        return self.classes if self.classes is not None else join(self.split_dir(), "metadata", "classes.csv")

    def images_uri(self) -> str | None:
        """The image list; in a zoo folder FiftyOne keeps it as ``metadata/image_ids.csv``."""
        if self.images is not None or self.zoo_dir is None:
            return self.images
        return join(self.split_dir(), "metadata", "image_ids.csv")

    def image_dir(self) -> str | None:
        return join(self.split_dir(), "data") if self.zoo_dir is not None else None
