"""A background pool users can get: scene-like OpenImages photos, or their own folder of images.

The paper composited subjects onto 59K web backgrounds ("BG59K") whose list was never published.
Backgrounds decide what the subject representation learns to ignore, so a pool must be varied, free of
salient objects, large enough for a 512 crop, and never a subject photo.

From OpenImages the box file alone decides, vectorized over all 14.6M rows (the same reader as the
subject filter). Per image, in this order, each counted in ``funnel.json``:

1. ``subject_candidate``: the image is a subject candidate (``--exclude-candidates``);
2. ``human``: a human-related box (the subject filter's list);
3. ``too_many_boxes``: more than ``max_boxes`` boxes (clutter);
4. ``large_object``: a box of a non-scene class covers more than ``max_object_area`` of the image (an
   object shot, not a scene).

Images with a box of a scene-type class (``scene_classes``: Building, Skyscraper, House, Tower, Swimming
pool, ...) come first, dealt round-robin across their main scene class (the class of their largest
scene box) so the pool is balanced rather than all Buildings; the other survivors fill up to ``count``
after them. Everything is ordered by seeded hashes, so the same inputs and seed give the same pool.

From a folder or URI prefix every image is opened and checked: ``decode_error``, ``too_small`` (short
side below ``min_side``), ``duplicate`` (same bytes as an earlier image), and, with
``near_duplicate_bits``, ``near_duplicate`` (a difference hash within that many bits of a kept image).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from subjectpairs import storage
from subjectpairs.configfile import CONFIG_FILE, config_yaml
from subjectpairs.curation.config import HUMAN_CLASSES, BackgroundConfig
from subjectpairs.errors import InputError
from subjectpairs.guards import OutputLock, refuse_overlap
from subjectpairs.seeds import stable_seed

# The files a folder of backgrounds is read for (a pool folder, a --backgrounds folder).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

POOL_FILE = "backgrounds.parquet"
FUNNEL_FILE = "funnel.json"
POOL_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("source", pa.string()),
                         ("width", pa.int32()), ("height", pa.int32()), ("scene", pa.string()),
                         ("reasons", pa.string())])




@dataclass
class PoolReport:
    out: str
    pool: pd.DataFrame
    funnel: dict


def _rank(seed: int, values) -> np.ndarray:
    """A seeded, platform-independent order key per value."""
    return np.array([stable_seed(seed, value) for value in values], dtype=np.uint64)


def _box_areas(boxes) -> np.ndarray:
    xmin, xmax, ymin, ymax = (boxes.coordinates[name] for name in ("XMin", "XMax", "YMin", "YMax"))
    areas = np.empty(len(xmin), np.float32)
    for start, x0, x1, y0, y1 in zip(xmin.starts, xmin.blocks, xmax.blocks, ymin.blocks, ymax.blocks):
        areas[start:start + len(x0)] = (x1 - x0) * (y1 - y0)
    rows = np.arange(len(boxes)) if boxes.file_row is None else boxes.file_row
    return areas[rows]


def select_openimages(config: BackgroundConfig) -> tuple[pd.DataFrame, dict]:
    from subjectpairs.curation.classes import read_class_list
    from subjectpairs.curation.openimages import read_boxes

    classes = read_class_list(config.classes)
    index_of = {mid: index for index, mid in enumerate(classes.mids)}

    def class_mask(names) -> np.ndarray:
        mask = np.zeros(len(classes.mids), bool)
        mask[[index_of[mid] for mid in classes.mids_for_names(list(names))]] = True
        return mask

    human, scene = class_mask(HUMAN_CLASSES), class_mask(config.scene_classes)
    boxes = read_boxes(config.bbox, classes).boxes
    images = boxes.image_ids.to_numpy(zero_copy_only=False)
    n_images = len(images)
    image, cls, area = boxes.image_codes, boxes.class_index, _box_areas(boxes)
    n_boxes = np.bincount(image, minlength=n_images)
    has_human = np.bincount(image, weights=human[cls], minlength=n_images) > 0
    object_area = np.zeros(n_images, np.float32)
    np.maximum.at(object_area, image[~scene[cls]], area[~scene[cls]])
    # the main scene class: that of the image's largest scene box
    scene_rows = np.flatnonzero(scene[cls])
    order = scene_rows[np.lexsort((-area[scene_rows], image[scene_rows]))]
    first = order[np.r_[True, image[order][1:] != image[order][:-1]]] if len(order) else order
    main_scene = np.full(n_images, -1, np.int64)
    main_scene[image[first]] = cls[first]

    keep = np.ones(n_images, bool)
    funnel = {"images": int(n_images), "dropped": {}}
    rules = []
    if config.exclude_candidates:
        candidates = storage.read_parquet(config.exclude_candidates, "candidates table", columns=["image_id"])
        # pyarrow's hash lookup: numpy's isin on object arrays of strings is quadratic in practice
        is_candidate = pc.is_in(boxes.image_ids, value_set=pa.array(candidates["image_id"].unique(), pa.string()))
        rules.append(("subject_candidate", is_candidate.fill_null(False).to_numpy(zero_copy_only=False)))
    rules += [("human", has_human), ("too_many_boxes", n_boxes > config.max_boxes),
              ("large_object", object_area > config.max_object_area)]
    for rule, drop in rules:
        dropped = keep & drop
        funnel["dropped"][rule] = int(dropped.sum())
        keep &= ~drop
    survivors = np.flatnonzero(keep)
    names = np.asarray(classes.names, dtype=object)
    table = pd.DataFrame({"id": images[survivors], "scene_index": main_scene[survivors]})
    table["scene"] = np.where(table["scene_index"] >= 0, names[np.maximum(table["scene_index"], 0)], None)
    table["rank"] = _rank(config.seed, table["id"])
    pool = _balanced(table, config.count)
    pool["reasons"] = [
        f"scene:{scene}" if scene is not None else "few small objects, no scene class"
        for scene in pool["scene"]]
    pool["uri"] = _image_uris(config, pool["id"])
    pool["source"], pool["width"], pool["height"] = "openimages", None, None
    funnel["eligible"] = int(len(survivors))
    funnel["eligible_by_scene"] = {str(k): int(v) for k, v in table["scene"].fillna("(none)").value_counts().items()}
    funnel["selected"] = int(len(pool))
    funnel["selected_by_scene"] = {str(k): int(v) for k, v in pool["scene"].fillna("(none)").value_counts().items()}
    return pool, funnel


def _balanced(table: pd.DataFrame, count: int) -> pd.DataFrame:
    """Scene images dealt round-robin over their scene class (each class in seeded order), then the rest."""
    scenes = table[table["scene"].notna()].sort_values(["scene", "rank"])
    scenes = scenes.assign(turn=scenes.groupby("scene").cumcount(), tie=_rank(0, scenes["scene"]))
    dealt = scenes.sort_values(["turn", "tie", "scene"])
    rest = table[table["scene"].isna()].sort_values("rank")
    return pd.concat([dealt, rest]).head(count)[["id", "scene"]].reset_index(drop=True)


def _image_uris(config: BackgroundConfig, ids: pd.Series) -> list[str | None]:
    if config.image_root:
        return [storage.join(config.image_root, f"{image_id}.jpg") for image_id in ids]
    if config.images:
        from subjectpairs.curation.candidates import attach_image_list

        frame = pd.DataFrame({"image_id": ids})
        joined, _ = attach_image_list(frame, config.images, "train")
        return joined["url"].tolist()
    raise InputError("--from-openimages needs --images (the image list with URLs) or --image-root")


def _difference_hash(image: Image.Image) -> int:
    """64-bit dHash: brighter-than-right-neighbour bits of a 9x8 grey thumbnail."""
    pixels = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def _inspect(uri: str) -> dict:
    try:
        data = storage.read_bytes(uri)
        image = Image.open(io.BytesIO(data))
        image.load()  # a full decode: truncated and corrupt files fail here, not in the build
        return {"uri": uri, "sha256": hashlib.sha256(data).hexdigest(), "width": image.width,
                "height": image.height, "dhash": _difference_hash(image)}
    except Exception as exc:  # PIL raises many types for bad files; each becomes a recorded rejection
        return {"uri": uri, "error": f"{type(exc).__name__}: {exc}"}


def select_folder(config: BackgroundConfig) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    uris = storage.list_files(config.folder, IMAGE_SUFFIXES)
    if not uris:
        raise InputError(f"{config.folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = list(pool.map(_inspect, uris))
    kept, rejected, seen, hashes = [], [], set(), []
    for item in sorted(found, key=lambda item: item["uri"]):
        reason = None
        if "error" in item:
            reason = ("decode_error", item["error"])
        elif min(item["width"], item["height"]) < config.min_side:
            reason = ("too_small", f"{item['width']}x{item['height']}")
        elif item["sha256"] in seen:
            reason = ("duplicate", item["sha256"])
        elif config.near_duplicate_bits is not None and any(
                bin(item["dhash"] ^ other).count("1") <= config.near_duplicate_bits for other in hashes):
            reason = ("near_duplicate", f"dhash within {config.near_duplicate_bits} bits")
        if reason:
            rejected.append({"uri": item["uri"], "reason": reason[0], "detail": reason[1]})
            if "sha256" in item:  # a later copy of a rejected image is still an exact duplicate
                seen.add(item["sha256"])
            continue
        seen.add(item["sha256"])
        hashes.append(item["dhash"])
        kept.append(item)
    table = pd.DataFrame(kept, columns=["uri", "sha256", "width", "height", "dhash"])
    table["id"] = table["sha256"].str[:16]
    table["rank"] = _rank(config.seed, table["sha256"])
    table = table.sort_values("rank").head(config.count).reset_index(drop=True)
    pool = pd.DataFrame({"id": table["id"], "uri": table["uri"], "source": "folder", "width": table["width"],
                         "height": table["height"], "scene": None,
                         "reasons": [f"decodes, {w}x{h} >= {config.min_side}, unique bytes"
                                     for w, h in zip(table["width"], table["height"])]})
    rejects = pd.DataFrame(rejected, columns=["uri", "reason", "detail"])
    funnel = {"images": len(uris), "dropped": rejects["reason"].value_counts().to_dict(),
              "eligible": len(kept), "selected": len(pool)}
    return pool, funnel, rejects


def pool_id(pool_bytes: bytes) -> str:
    return hashlib.sha256(pool_bytes).hexdigest()[:16]


def build_pool(config: BackgroundConfig) -> PoolReport:
    """The pool, its local paths made absolute, its output folder checked against the inputs and locked."""
    config = config.with_absolute_paths()
    refuse_overlap(config.out, {flag: getattr(config, key) for key, flag in config.PATH_KEYS.items() if key != "out"})
    with OutputLock(config.out, "backgrounds"):
        return _build_pool_locked(config)


def _build_pool_locked(config: BackgroundConfig) -> PoolReport:
    rejects = None
    if config.bbox:
        pool, funnel = select_openimages(config)
    else:
        pool, funnel, rejects = select_folder(config)
    table = pa.Table.from_pandas(pool[list(POOL_SCHEMA.names)], schema=POOL_SCHEMA, preserve_index=False)
    sink = pa.BufferOutputStream()
    import pyarrow.parquet as pq

    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    funnel = {"pool_id": pool_id(data), "source": "openimages" if config.bbox else "folder", **funnel}
    with storage.StagedOutputs(config.out) as outputs:
        outputs.put(POOL_FILE, data)
        outputs.put(FUNNEL_FILE, (json.dumps(funnel, indent=2, default=int) + "\n").encode())
        outputs.put(CONFIG_FILE, config_yaml(config, "backgrounds"))
        if rejects is not None:
            outputs.put("rejects.csv", rejects.to_csv(index=False).encode())
    return PoolReport(config.out, pool, funnel)


def read_pool(folder: str) -> tuple[str, list[str]]:
    """(pool id, background URIs in pool order) of a pool folder."""
    uri = storage.join(folder, POOL_FILE)
    data = storage.read_bytes(uri)  # the pool's id is the hash of these bytes
    table = storage.read_parquet(uri, "background pool", columns=["uri"])
    missing = int(table["uri"].isna().sum())
    if missing:
        raise InputError(f"{uri}: {missing} backgrounds have no URI (rebuild the pool with --images or --image-root)")
    relative = [path for path in table["uri"] if not storage.is_remote(path) and not os.path.isabs(path)]
    if relative:  # relative to a working directory this command cannot know: every background would fail
        raise InputError(f"{uri}: {len(relative)} backgrounds have relative paths ({relative[0]}); rebuild the pool "
                         "with this version, which stores absolute paths")
    return pool_id(data), table["uri"].tolist()


def is_pool(folder: str) -> bool:
    return storage.exists(storage.join(folder, POOL_FILE))
