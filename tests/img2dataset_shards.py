"""Image-text shards as img2dataset writes them, made in tests from scikit-image photos."""

from __future__ import annotations

import functools
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image
from skimage import data as skimage_data

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


@functools.cache
def photo_jpegs() -> tuple[bytes, ...]:
    """scikit-image photos, their short side 48 pixels, as JPEGs."""
    jpegs = []
    for name in PHOTOS:
        pixels = getattr(skimage_data, name)()
        image = Image.fromarray(pixels).convert("RGB")
        scale = 48 / min(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        small = image.resize(size, Image.Resampling.BILINEAR)
        encoded = io.BytesIO()
        small.save(encoded, format="JPEG", quality=90)
        jpegs.append(encoded.getvalue())
    return tuple(jpegs)


@dataclass
class Img2DatasetFolder:
    folder: Path
    keys: dict[str, list[str]]  # shard name -> the keys of its samples, corrupt ones too
    images: dict[str, bytes]
    captions: dict[str, str]  # the raw caption of each sample with one


def write_img2dataset_shards(folder: Path, counts: tuple[int, ...],
                             members: dict[str, dict[str, bytes | None]] | None = None) -> Img2DatasetFolder:
    """Shards as img2dataset writes them: ``NNNNN.tar`` (KEY.jpg, KEY.txt, KEY.json), ``NNNNN_stats.json`` and
    ``NNNNN.parquet``. ``members`` replaces members of the samples it names (None leaves one out)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = Img2DatasetFolder(folder, {}, {}, {})
    for shard, count in enumerate(counts):
        keys = [f"{shard:05d}{index:04d}" for index in range(count)]
        written.keys[f"{shard:05d}.tar"] = keys
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for index, key in enumerate(keys):
                caption = f"A Photo: number {index} of Shard {shard}!  (the {PHOTOS[index % len(PHOTOS)]})"
                sample = {"jpg": photo_jpegs()[(shard + index) % len(PHOTOS)], "txt": caption.encode(),
                          "json": json.dumps({"key": key, "caption": caption, "status": "success"}).encode()}
                sample.update((members or {}).get(key, {}))
                for member, value in sample.items():
                    if value is not None:
                        info = tarfile.TarInfo(f"{key}.{member}")
                        info.size = len(value)
                        tar.addfile(info, io.BytesIO(value))
                written.images[key] = sample["jpg"]
                if sample["txt"] is not None:
                    written.captions[key] = caption
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0}))
        pd.DataFrame({"key": keys, "caption": [written.captions.get(key) for key in keys],
                      "status": "success"}).to_parquet(folder / f"{shard:05d}.parquet")
    return written
