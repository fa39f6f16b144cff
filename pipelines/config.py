"""Typed settings of pair synthesis, validated before any photo is touched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from subjectpairs.configfile import RUN_ONLY, hashed_settings
from subjectpairs.curation.config import FILTER_PATH_KEYS, FilterConfig
from subjectpairs.pipelines.segmenters import SegmenterConfig

DEFAULT_CAPTION_RANKER = "openai/clip-vit-large-patch14"  # the authors' CLIP ViT-L/14


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrimapConfig(_Settings):
    # The authors' matplotlib rendering thresholded at grey 60 and 120, which is 0.121 and 0.578 of the
    # per-image min-max normalized map.
    low: float = Field(0.121, ge=0.0, le=1.0, description="normalized map <= low is background")
    high: float = Field(0.578, ge=0.0, le=1.0, description="normalized map > high is foreground")
    normalize: bool = Field(True, description="per-image min-max normalization before thresholding")
    cleanup_px: int = Field(2, ge=0, description="radius of the opening that removes specks")
    band_px: int = Field(6, ge=0, description="unknown band on each side of the foreground edge")
    box_gate: bool = Field(False, description="zero the map outside the padded subject box")
    box_padding: float = Field(0.1, ge=0.0, le=1.0, description="box growth on each side, share of box size")

    @model_validator(mode="after")
    def _ordered(self) -> "TrimapConfig":
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class MattingConfig(_Settings):
    margin_px: int = Field(8, ge=2, description="known pixels kept around the unknown region's box")
    max_solve_unknown: int = Field(
        5_000, ge=1_000, description="unknown pixels above which the solve runs at reduced resolution"
    )
    min_scale: float = Field(0.25, gt=0.0, le=1.0, description="smallest reduced-resolution scale")
    epsilon: float = Field(1e-7, gt=0.0, description="closed-form Laplacian regularization")
    refine_radius: int = Field(1, ge=1, description="window radius of the coarse local linear fit")
    refine_eps: float = Field(1e-5, gt=0.0, description="regularization of the coarse local linear fit")


class CompositeConfig(_Settings):
    backgrounds: list[str] = Field(
        default_factory=list,
        description="background images, folders of images, or text files listing one path/URI per line",
    )


class QualityConfig(_Settings):
    """Bounds on a pair's metrics (docs/FORMAT.md): a pair outside one is rejected at stage ``quality``.
    A bound set to None is not checked; a metric that is null (map_box_iou of a given trimap) passes."""

    enabled: bool = Field(
        True, description="reject pairs outside the bounds; false keeps every pair (review first)"
    )
    # Defaults set from the metrics measured on real photos: docs/FORMAT.md (quality gate).
    min_alpha_in_box: float | None = Field(
        0.35, ge=0.0, le=1.0, description="lowest mean alpha inside the box (below: the matte missed it)"
    )
    min_map_box_iou: float | None = Field(
        0.6, ge=0.0, le=1.0,
        description="lowest IoU of the map's box with the subject box (below: it segmented another thing)",
    )
    max_alpha_outside_box: float | None = Field(
        0.3, ge=0.0, le=1.0,
        description="highest share of the alpha outside the padded box (above: the matte took other things)",
    )
    max_unknown_fraction: float | None = Field(
        0.3, ge=0.0, le=1.0, description="highest share of the image the trimap left unknown (above: unsure)"
    )


class PairConfig(_Settings):
    size: int = Field(512, ge=32, description="short side of the target, never upscaled")
    min_side: int = Field(64, ge=8, description="photos with a smaller short side are rejected")
    seed: int = Field(0, description="background choice and crop")
    segmenter: SegmenterConfig = Field(default_factory=SegmenterConfig)
    trimap: TrimapConfig = Field(default_factory=TrimapConfig)
    matting: MattingConfig = Field(default_factory=MattingConfig)
    composite: CompositeConfig = Field(default_factory=CompositeConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)


class FetchConfig(_Settings):
    connect_timeout: float = Field(10.0, gt=0, description="seconds to connect to an image server")
    read_timeout: float = Field(30.0, gt=0, description="seconds without data before a read gives up")
    retries: int = Field(
        3, ge=0, le=10, description="retries after a timeout, a connection error, a 5xx, a 429 or a short body"
    )
    backoff: float = Field(1.0, ge=0, description="first retry delay in seconds, doubled each retry")
    deadline: float = Field(
        120.0, gt=0, description="seconds one try may take in all (connect and every read): ends a drip-fed body"
    )
    max_bytes: int = Field(
        50_000_000, ge=65_536, description="HTTP photos larger than this are refused (a 4K JPEG is a few MB)"
    )
    max_redirects: int = Field(10, ge=0, le=30, description="redirects followed before a URL is refused")
    anonymous: bool | Literal["auto"] = Field(
        "auto", description="read s3:// without credentials; auto: only when no AWS credentials are configured"
    )


class ShardConfig(_Settings):
    samples: int = Field(1000, ge=1, description="candidates planned per shard")
    max_bytes: int = Field(2_000_000_000, ge=65_536, description="a shard over this is split into parts")


class CaptionerConfig(_Settings):
    """CapFilt as the authors ran it: nucleus-sample BLIP-2 captions, rank them by CLIP image-text
    similarity, keep the best that mention the label, else the best one."""

    model: str | None = Field(None, description="BLIP-2 hub id or folder (the paper: Salesforce/blip2-opt-6.7b)")
    ranker: str | None = Field(
        DEFAULT_CAPTION_RANKER,
        description="CLIP hub id or folder ranking the sampled captions by image-text similarity; "
                    "null: keep them in sampling order",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N (the ranker runs beside BLIP-2)")
    keep: int = Field(5, ge=1, description="captions kept per photo (the best-ranked that mention the label)")
    label_match: Literal["any", "all"] = Field(
        "any",
        description="a caption mentions the label when it contains any (the authors) or all of its words",
    )
    samples: int = Field(48, ge=1, description="captions sampled per photo before ranking and filtering")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling's probability mass")
    min_length: int = Field(5, ge=0, description="fewest new tokens a sampled caption has")
    max_new_tokens: int = Field(30, ge=1)

    @model_validator(mode="after")
    def _lengths_fit(self) -> "CaptionerConfig":
        if self.min_length > self.max_new_tokens:
            raise ValueError(f"min_length {self.min_length} exceeds max_new_tokens {self.max_new_tokens}")
        return self


class BuildConfig(_Settings):
    """One build: candidates in, WebDataset shards out. Keys that change the shards make the config hash;
    those marked RUN_ONLY say where and how the job runs, not what it makes, and stay out of it."""

    out: str = Field(json_schema_extra=RUN_ONLY)
    candidates: str | None = Field(None, description="candidates.parquet from `subjectpairs filter`")
    filter: dict[str, Any] | None = Field(
        None, description="or the filter's settings (bbox, classes, ...), to run it first into OUT/candidates"
    )
    images: str | None = Field(
        None,
        description="folder or URI prefix holding <ImageID>.jpg; default: the candidates' filepath, else url",
    )
    captions: str | None = Field(None, description="captions.jsonl (image_id, label, captions)")
    captioner: CaptionerConfig = Field(default_factory=CaptionerConfig)
    limit: int | None = Field(None, ge=1, description="build only the first N candidates (by key)")
    exclude: str | None = Field(
        None, description="file of sample keys not to build (reviewers' rejects), one per line; each becomes a "
                          "reject with stage review, reason excluded",
    )
    batch_size: int = Field(16, ge=1, description="samples a task decodes, segments and mattes together")
    pair: PairConfig = Field(default_factory=PairConfig)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    shards: ShardConfig = Field(default_factory=ShardConfig)
    address: str | None = Field(
        None, description="Ray address; default: RAY_ADDRESS, else a local Ray", json_schema_extra=RUN_ONLY
    )
    max_tasks: int | None = Field(
        None, ge=1, description="shard tasks in flight; default: the cluster's CPUs",
        json_schema_extra=RUN_ONLY,
    )
    segment_actors: int | None = Field(
        None, ge=0,
        description="CLIPSeg actors shared by the tasks (one GPU each when the cluster has GPUs); "
                    "default: one per GPU for CLIPSeg, none (segment inside each task) otherwise",
        json_schema_extra=RUN_ONLY,
    )
    caption_actors: int | None = Field(
        None, ge=0, description="BLIP-2 actors shared by the tasks; default: one per GPU when captioning",
        json_schema_extra=RUN_ONLY,
    )

    # Keys added after builds existed, with the value that matches what those builds did: at that value they
    # stay out of the hash, so an upgrade does not make every existing output folder "another configuration".
    LATER_KEYS: ClassVar[dict[tuple[str, ...], Any]] = {
        ("exclude",): None,
        ("fetch", "deadline"): 120.0,
        ("fetch", "max_bytes"): 50_000_000,
        ("fetch", "max_redirects"): 10,
    }
    # Without BLIP-2 the captioner's settings make nothing; such a build hashes them as builds did before
    # CapFilt got its ranker and the authors' sampling, so those output folders stay the same configuration.
    UNUSED_CAPTIONER: ClassVar[dict[str, Any]] = {
        "model": None, "device": "auto", "keep": 5, "samples": 10, "max_new_tokens": 30,
    }

    @model_validator(mode="after")
    def _one_candidate_source(self) -> "BuildConfig":
        if (self.candidates is None) == (self.filter is None):
            raise ValueError("give either candidates (a candidates.parquet) or filter (the filter's settings)")
        if self.filter is not None:
            FilterConfig.model_validate({"out": self.filter_out(), **self.filter})  # fail at start-up
        return self

    def filter_out(self) -> str:
        from subjectpairs.storage import join

        return (self.filter or {}).get("out") or join(self.out, "candidates")

    def with_absolute_paths(self) -> "BuildConfig":
        """Local paths made absolute, so ``config.yaml``, the pairs' ``source`` and ``background`` and Ray
        workers (which may run in another working directory) all name the same files from anywhere. URIs
        stay as they are, and so do model sources that are not local folders (hub ids)."""
        from subjectpairs.storage import absolute

        def path(value: str | None) -> str | None:
            return None if value is None else absolute(value)

        def source(value: str | None) -> str | None:
            return path(value) if value is not None and Path(value).expanduser().exists() else value

        settings = self.model_dump()
        settings.update(out=path(self.out), candidates=path(self.candidates), images=path(self.images),
                        captions=path(self.captions), exclude=path(self.exclude))
        if self.filter is not None:
            settings["filter"] = {key: path(value) if key in FILTER_PATH_KEYS and isinstance(value, str) else value
                                  for key, value in self.filter.items()}
        settings["pair"]["composite"]["backgrounds"] = [path(entry) for entry in self.pair.composite.backgrounds]
        settings["pair"]["segmenter"]["model"] = source(self.pair.segmenter.model)
        settings["captioner"]["model"] = source(self.captioner.model)
        settings["captioner"]["ranker"] = source(self.captioner.ranker)
        return BuildConfig.model_validate(settings)

    def config_hash(self) -> str:
        """SHA-256 of the settings that decide the shards' bytes (not where or how fast they are made)."""
        settings = hashed_settings(self)
        for *sections, name in self.LATER_KEYS:
            section = settings
            for part in sections:
                section = section[part]
            if section[name] == self.LATER_KEYS[(*sections, name)]:
                del section[name]
        if not self.pair.quality.enabled:
            # the bounds decide nothing then: such a build makes the shards of one before the gate existed,
            # and keeps its hash
            del settings["pair"]["quality"]
        if self.captioner.model is None:
            settings["captioner"] = self.UNUSED_CAPTIONER
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
