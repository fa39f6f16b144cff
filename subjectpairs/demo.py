"""The offline demo: real and generated photos in OpenImages format, filtered and built into shards.

Everything comes from what ships with the project and scikit-image: a few real photos with hand-placed
boxes, generated scenes (a subject cut out of a real photo, pasted on a texture, at a known box), a small
background pool, and annotation rows that exercise every filter rule. The filter runs on them, then the
build job makes shards with the GrabCut segmenter on a local Ray, and a contact sheet shows the pairs.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

from subjectpairs.corpus.reader import read_shard
from subjectpairs.curation.config import BackgroundConfig
from subjectpairs.curation.backgrounds import build_pool
from subjectpairs.curation.candidates import FilterReport, run_filter
from subjectpairs.curation.classes import bundled_class_list
from subjectpairs.curation.config import FilterConfig
from subjectpairs.curation.synthetic import TRAIN_COLUMNS
from subjectpairs.pipelines.boxes import Box
from subjectpairs.pipelines.build import BuildReport, run_build
from subjectpairs.pipelines.config import BuildConfig
from subjectpairs.pipelines.sample_photos import SUBJECT_PHOTOS, TEXTURES, photo

if TYPE_CHECKING:
    from subjectpairs.curation.review import ReviewReport
    from subjectpairs.training.trainer import TrainReport

DEMO_REVIEW = "subjectpairs-demo"

BBOX_FILE = "train-annotations-bbox.csv"
CLASSES_FILE = "class-descriptions-boxable.csv"

# Real photos (sample_photos.SUBJECT_PHOTOS): the astronaut is a Person (excluded, rule v) and the
# rocket's box is tall and thin (dropped by the aspect rule): the funnel shows both.
# Generated scenes: a subject cut out of a real photo (by an ellipse, or the horse silhouette).
SUBJECTS = ("Cat", "Coffee cup", "Horse")


@dataclass
class DemoReport:
    filter: FilterReport
    build: BuildReport
    contact_sheet: Path
    train: "TrainReport | None" = None
    generated: Path | None = None
    review: "ReviewReport | None" = None


def _jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _subject_cutout(category: str, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB, alpha in [0, 1]) of a subject filling a width x height box."""
    if category == "Horse":
        from skimage import data

        mask = (~data.horse()).astype(np.float32)
        coat = cv2.resize(photo("gravel"), (mask.shape[1], mask.shape[0])).astype(np.float32)
        rgb = np.clip(coat * np.array([0.75, 0.5, 0.3]) + 30, 0, 255).astype(np.uint8)
    else:
        source = {"Cat": ("chelsea", (60, 20, 400, 300)), "Coffee cup": ("coffee", (160, 10, 420, 310))}
        name, (x0, y0, x1, y1) = source[category]
        rgb = photo(name)[y0:y1, x0:x1]
        mask = np.zeros(rgb.shape[:2], np.float32)
        cv2.ellipse(mask, (rgb.shape[1] // 2, rgb.shape[0] // 2), (rgb.shape[1] // 2 - 2, rgb.shape[0] // 2 - 2),
                    0, 0, 360, 1.0, -1)
    rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
    alpha = cv2.GaussianBlur(cv2.resize(mask, (width, height)), (0, 0), 1.2)
    return rgb, np.clip(alpha, 0, 1)


def generated_scene(index: int, rng: np.random.Generator) -> tuple[np.ndarray, str, Box]:
    """A 640x480 photo of a subject pasted on a texture, its class and its box."""
    height, width = 480, 640
    texture = photo(TEXTURES[index % len(TEXTURES)])
    scale = max(height / texture.shape[0], width / texture.shape[1]) * rng.uniform(1.0, 1.6)
    texture = cv2.resize(texture, (int(texture.shape[1] * scale) + 1, int(texture.shape[0] * scale) + 1))
    top = int(rng.integers(0, texture.shape[0] - height + 1))
    left = int(rng.integers(0, texture.shape[1] - width + 1))
    scene = texture[top:top + height, left:left + width].astype(np.float32) * rng.uniform(0.6, 1.0)
    category = SUBJECTS[index % len(SUBJECTS)]
    box_w, box_h = int(width * rng.uniform(0.55, 0.8)), int(height * rng.uniform(0.6, 0.85))
    x0, y0 = int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1))
    rgb, alpha = _subject_cutout(category, box_w, box_h)
    region = scene[y0:y0 + box_h, x0:x0 + box_w]
    scene[y0:y0 + box_h, x0:x0 + box_w] = alpha[:, :, None] * rgb + (1 - alpha[:, :, None]) * region
    box = Box(x0 / width, (x0 + box_w) / width, y0 / height, (y0 + box_h) / height)
    return np.clip(scene, 0, 255).astype(np.uint8), category, box


def _box_row(image_id: str, mid: str, box: Box, group: int = 0) -> dict:
    row = {column: -1 for column in TRAIN_COLUMNS}
    row.update(ImageID=image_id, Source="xclick", LabelName=mid, Confidence=1, XMin=box.xmin, XMax=box.xmax,
               YMin=box.ymin, YMax=box.ymax, IsOccluded=0, IsTruncated=0, IsGroupOf=group, IsDepiction=0,
               IsInside=0)
    return row


def write_demo_data(folder: Path, scenes: int, seed: int) -> tuple[FilterConfig, Path, Path]:
    """Photos, annotations (official format and names) and a background pool under ``folder``."""
    classes = bundled_class_list()
    mid = dict(zip(classes.names, classes.mids))
    images, pool = folder / "openimages" / "images", folder / "background-photos"
    for path in (images, pool):
        path.mkdir(parents=True, exist_ok=True)
    with resources.as_file(resources.files("subjectpairs.data").joinpath(CLASSES_FILE)) as source:
        shutil.copyfile(source, folder / "openimages" / CLASSES_FILE)
    rng = np.random.default_rng(seed)
    rows = []
    for number, (name, category, box) in enumerate(SUBJECT_PHOTOS):
        image_id = f"{0xd0000000 + number:016x}"
        (images / f"{image_id}.jpg").write_bytes(_jpeg(photo(name)))
        rows.append(_box_row(image_id, mid[category], box))
    for number in range(scenes):
        image_id = f"{0xe0000000 + number:016x}"
        scene, category, box = generated_scene(number, rng)
        (images / f"{image_id}.jpg").write_bytes(_jpeg(scene))
        rows.append(_box_row(image_id, mid[category], box))
        if number % 5 == 1:  # a group of other objects: that class is dropped, the subject stays
            rows.append(_box_row(image_id, mid["Flower"], Box(0.0, 0.6, 0.0, 0.7), group=1))
        if number % 5 == 2:  # a second box of the same class: the paper drops repeated classes
            rows.append(_box_row(image_id, mid[category], Box(0.0, 0.6, 0.1, 0.8)))
        if number % 5 == 3:  # a small box of another class: dropped by the area rule
            rows.append(_box_row(image_id, mid["Ball"], Box(0.0, 0.2, 0.0, 0.2)))
    # A candidate whose photo is corrupt, and one whose photo is missing: rejected, with reasons.
    (images / f"{0xf0000000:016x}.jpg").write_bytes(_jpeg(photo("coffee"))[:3000])
    rows.append(_box_row(f"{0xf0000000:016x}", mid["Coffee cup"], Box(0.2, 0.8, 0.1, 0.8)))
    rows.append(_box_row(f"{0xf0000001:016x}", mid["Cat"], Box(0.2, 0.8, 0.1, 0.8)))
    rows.sort(key=lambda row: row["ImageID"])
    with open(folder / "openimages" / BBOX_FILE, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(TRAIN_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    for number, name in enumerate(TEXTURES):
        Image.fromarray(cv2.resize(photo(name), (768, 768))).save(pool / f"{name}.jpg", quality=95)
    for number in range(3):  # smooth colour fields
        corners = rng.uniform(0, 255, size=(2, 2, 3)).astype(np.float32)
        Image.fromarray(cv2.resize(corners, (768, 576)).astype(np.uint8)).save(pool / f"field-{number}.jpg")
    (pool / "field-0-copy.jpg").write_bytes((pool / "field-0.jpg").read_bytes())  # removed as a duplicate
    Image.fromarray(photo("grass")[:200, :300]).save(pool / "too-small.jpg")  # below the 512 minimum
    filter_config = FilterConfig(
        out=str(folder / "candidates"), bbox=str(folder / "openimages" / BBOX_FILE),
        classes=str(folder / "openimages" / CLASSES_FILE),
    )
    # The pool is made as users make theirs: `subjectpairs backgrounds --from-folder`.
    built = build_pool(BackgroundConfig(folder=str(pool), out=str(folder / "backgrounds"), seed=seed))
    return filter_config, images, Path(built.out)


def contact_sheet(shard_uris: list[str], path: Path, limit: int = 12, height: int = 128) -> Path:
    """A grid with one pair per row: input | target | alpha."""
    rows = []
    for uri in shard_uris:
        for sample in read_shard(uri):
            if len(rows) == limit:
                break
            tiles = []
            for member in ("input.jpg", "target.jpg", "alpha.png"):
                image = np.asarray(Image.open(io.BytesIO(sample[member])).convert("RGB"))
                tiles.append(cv2.resize(image, (int(image.shape[1] * height / image.shape[0]), height)))
            rows.append(np.hstack(tiles))
    if not rows:
        raise ValueError("no pairs to show")
    width = max(row.shape[1] for row in rows)
    sheet = np.vstack([np.pad(row, ((0, 4), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows])
    Image.fromarray(sheet).save(path)
    return path


def train_demo(out: Path, shards: list[str], seed: int, steps: int, show_progress: bool):
    """A few steps of the tiny model on the demo shards (Ray Train, one CPU worker), its export, and one
    generated image conditioned on the first pair's subject."""
    import torch

    from subjectpairs.training.config import TrainConfig
    from subjectpairs.training.export import export_run
    from subjectpairs.training.pipeline_blip_diffusion import BlipDiffusionPipeline
    from subjectpairs.training.trainer import run_training

    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)  # the demo folder is scratch: each demo trains afresh
    config = TrainConfig(shards=[str(out / "shards")], out=str(run), model="tiny", workers=1, loader_workers=1,
                         batch_size=4, max_steps=steps, checkpoint_every=steps, lr=1e-4, seed=seed)
    report = run_training(config, progress=show_progress)
    export_run(str(run), str(out / "model"))
    first = read_shard(shards[0])[0]
    meta = json.loads(first["json"])
    subject = Image.open(io.BytesIO(first["input.jpg"])).convert("RGB")
    xmin, xmax, ymin, ymax = meta["box"]
    subject = subject.crop((round(xmin * subject.width), round(ymin * subject.height),
                            round(xmax * subject.width), round(ymax * subject.height)))
    pipeline = BlipDiffusionPipeline.from_pretrained(out / "model")
    (image,) = pipeline("on the beach", subject, meta["category"].lower(), num_inference_steps=10,
                        generator=torch.Generator().manual_seed(seed))
    generated = out / "generated.png"
    image.save(generated)
    return report, generated


def run_demo(out: Path, scenes: int = 21, seed: int = 0, show_progress: bool = True, train: bool = True,
             train_steps: int = 12, review: bool = True) -> DemoReport:
    out = Path(out)
    filter_config, images, pool = write_demo_data(out, scenes, seed)
    filtered = run_filter(filter_config)
    build_config = BuildConfig(
        out=str(out / "shards"), candidates=str(Path(filtered.out_dir) / "candidates.parquet"), images=str(images),
        pair={"segmenter": {"kind": "grabcut"}, "seed": seed, "composite": {"backgrounds": [str(pool)]}},
        shards={"samples": 8},
    )
    built = run_build(build_config, overwrite=True, show_progress=show_progress)
    shards = [str(out / "shards" / shard["name"]) for shard in built.manifest["shards"]]
    sheet = contact_sheet(shards, out / "contact-sheet.png")
    report = DemoReport(filter=filtered, build=built, contact_sheet=sheet)
    if train:
        report.train, report.generated = train_demo(out, shards, seed, train_steps, show_progress)
    if review:
        from subjectpairs.curation.review import ReviewConfig, build_review

        report.review = build_review(ReviewConfig(shards=str(out / "shards"), name=DEMO_REVIEW,
                                                  media_dir=str(out / "review-media")),
                                     overwrite=True, progress=show_progress)
    return report
