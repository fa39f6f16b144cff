"""Typed, validated configurations of the subject filter and of background pools, written next to every
output. Kept free of heavy imports: the command line reads their field descriptions at start-up."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from subjectpairs import storage
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


# Scenes a background pool is drawn from: places without a single salient subject.
SCENE_CLASSES = (
    "Building", "Skyscraper", "House", "Tower", "Office building", "Castle", "Lighthouse", "Swimming pool",
    "Fountain", "Tree house", "Porch", "Stairs", "Fireplace", "Countertop", "Bookcase", "Cabinetry", "Window",
    "Door", "Street light", "Tree", "Palm tree",
)


class BackgroundConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: str
    bbox: str | None = Field(None, description="OpenImages box CSV (with classes)")
    classes: str | None = None
    images: str | None = Field(None, description="OpenImages image list CSV: ImageID -> OriginalURL")
    image_root: str | None = Field(None, description="or a folder/URI prefix holding <ImageID>.jpg")
    folder: str | None = Field(None, description="a folder or URI prefix of the user's own images")
    count: int = Field(59000, ge=1)
    min_side: int = Field(512, ge=1)
    max_boxes: int = Field(6, ge=1)
    max_object_area: float = Field(0.15, gt=0, le=1)
    scene_classes: list[str] = Field(default_factory=lambda: list(SCENE_CLASSES))
    exclude_candidates: str | None = Field(None, description="candidates.parquet of the subject filter")
    near_duplicate_bits: int | None = Field(None, ge=0, le=64, description="folder mode: dHash distance")
    seed: int = 0

    PATH_KEYS: ClassVar[dict[str, str]] = {  # the settings that name files or folders, by their flag
        "out": "--out", "bbox": "--bbox", "classes": "--classes", "images": "--images", "image_root": "--image-root",
        "folder": "--from-folder", "exclude_candidates": "--exclude-candidates"}

    def with_absolute_paths(self) -> "BackgroundConfig":
        """Local paths made absolute: the pool's ``uri`` column is read by builds run from anywhere."""
        return self.model_copy(update={key: storage.absolute(getattr(self, key)) for key in self.PATH_KEYS
                                       if getattr(self, key) is not None})

    @model_validator(mode="after")
    def _one_source(self) -> "BackgroundConfig":
        if bool(self.bbox) == bool(self.folder):
            raise ValueError("give one source: --from-openimages (with --bbox and --classes) or --from-folder")
        if self.bbox and not self.classes:
            raise ValueError("--bbox needs --classes")
        return self
