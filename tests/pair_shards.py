"""Small pair shards in the documented layout (manifest included), made from real photos, for tests."""

from __future__ import annotations

import functools
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from subjectpairs.pipelines.sample_photos import SUBJECT_PHOTOS, photo

SHARD_COUNTS = (12, 12, 10, 12, 9, 12)
# A synthetic photo whose subject box (its right half) is one flat colour and the rest another, so the
# box crop and the normalization can be checked exactly.
BOX_COLOUR, OUTSIDE_COLOUR = (200, 60, 40), (30, 200, 90)
FLAT_CATEGORY = "Flat"


@dataclass(frozen=True)
class Photo:
    jpeg: bytes
    box: list[float]
    category: str


@dataclass
class Dataset:
    folder: Path
    keys: dict[str, list[str]]  # shard name -> its keys, in order
    meta: dict[str, dict]

    @property
    def all_keys(self) -> list[str]:
        return [key for keys in self.keys.values() for key in keys]


def jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


@functools.cache
def pair_photos() -> list[Photo]:
    found = []
    for name, category, box in SUBJECT_PHOTOS:
        image = Image.fromarray(photo(name))
        scale = 64 / min(image.size)
        small = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.Resampling.BILINEAR)
        found.append(Photo(jpeg(np.asarray(small)), [box.xmin, box.xmax, box.ymin, box.ymax], category))
    two_colour = np.empty((64, 64, 3), np.uint8)
    two_colour[:, :32], two_colour[:, 32:] = OUTSIDE_COLOUR, BOX_COLOUR
    found.append(Photo(jpeg(two_colour), [0.5, 1.0, 0.0, 1.0], FLAT_CATEGORY))
    return found


def sample_meta(key: str, chosen: Photo, index: int) -> dict:
    # every seventh sample has no captions, so its caption falls back to the category
    captions = [] if index % 7 == 3 else [f"{key} caption a", f"{key} caption b"]
    return {"key": key, "category": chosen.category, "box": chosen.box, "size": [64, 64],
            "captions": captions}


def write_pair_shards(folder: Path | str, counts=SHARD_COUNTS) -> Dataset:
    """Shards in the documented layout plus manifest.json; every 5th sample is the two-colour photo."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys: dict[str, list[str]] = {}
    meta: dict[str, dict] = {}
    entries = []
    for shard, count in enumerate(counts):
        name = f"pairs-{shard:06d}.tar"
        keys[name] = []
        with wds.TarWriter(str(folder / name), encoder=False) as writer:
            for index in range(count):
                chosen = pair_photos()[(shard * 3 + index) % len(pair_photos())]
                key = f"{shard:08x}{index:08x}_{chosen.category.lower().replace(' ', '')}"
                meta[key] = sample_meta(key, chosen, index)
                writer.write({"__key__": key, "input.jpg": chosen.jpeg, "target.jpg": chosen.jpeg,
                              "alpha.png": b"not read", "json": json.dumps(meta[key]).encode()})
                keys[name].append(key)
        data = (folder / name).read_bytes()
        entries.append({"name": name, "samples": count, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(), "first_key": keys[name][0],
                        "last_key": keys[name][-1]})
    (folder / "manifest.json").write_text(json.dumps({"shards": entries}, indent=2))
    return Dataset(folder, keys, meta)
