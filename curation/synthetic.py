"""Generated OpenImages-V6 box annotations in the official CSV format.

The demo, the tests and the benchmarks need annotation files that look like the real ones (same header,
same value formats, about 8.4 boxes per image, the most frequent classes human-related, some group and
inside flags, unknown flags as -1) without downloading 2.2 GB. Generation is vectorized and streams in
chunks, so the full 14.6M-row file can be written on a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from subjectpairs.curation.classes import ClassList

TRAIN_COLUMNS = (
    "ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax",
    "IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside",
    "XClick1X", "XClick2X", "XClick3X", "XClick4X", "XClick1Y", "XClick2Y", "XClick3Y", "XClick4Y",
)
# The validation and test box files carry no click coordinates.
EVAL_COLUMNS = TRAIN_COLUMNS[:13]

# OpenImages is dominated by people and clothing; weighting them up reproduces the real funnel shape
# (a large share of boxes falls to the human-related rule).
HEAVY_CLASSES = {"Person": 40.0, "Man": 25.0, "Woman": 20.0, "Clothing": 25.0, "Human face": 20.0,
                 "Tree": 10.0, "Footwear": 8.0, "Car": 8.0, "Wheel": 6.0, "Building": 6.0}


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of a generated box file."""

    boxes_per_image: float = 8.4
    group_rate: float = 0.06
    inside_rate: float = 0.02
    unknown_flag_rate: float = 0.01
    large_box_rate: float = 0.3
    classes_per_image: float = 3.0
    max_classes_per_image: int = 8


def _micro_strings(values: np.ndarray) -> pa.Array:
    """Format values in [0, 1] with six decimals, as the official files do ("0.012500"); -1 stays "-1"."""
    micro = np.rint(np.clip(values, 0.0, 1.0) * 1_000_000).astype(np.int64)
    digits = pc.utf8_lpad(pc.cast(pa.array(micro % 1_000_000), pa.string()), width=6, padding="0")
    whole = pc.cast(pa.array(micro // 1_000_000), pa.string())
    text = pc.binary_join_element_wise(whole, digits, ".")
    return pc.if_else(pa.array(values < 0), pa.scalar("-1"), text)


def _flag_strings(rng: np.random.Generator, n: int, rate: float, unknown_rate: float) -> pa.Array:
    draw = rng.random(n)
    flags = np.where(draw < rate, 1, np.where(draw < rate + unknown_rate, -1, 0))
    return pc.cast(pa.array(flags.astype(np.int8)), pa.string())


def generate_boxes(
    n_images: int,
    classes: ClassList,
    rng: np.random.Generator,
    spec: SyntheticSpec = SyntheticSpec(),
    with_clicks: bool = True,
    image_ids: np.ndarray | None = None,
) -> pa.Table:
    """One table of boxes for ``n_images`` random images, rows grouped by image as in the real files."""
    if image_ids is None:
        image_ids = random_image_ids(rng, n_images)
    per_image = 1 + rng.poisson(spec.boxes_per_image - 1.0, size=n_images)
    n = int(per_image.sum())
    image_col = pa.array(np.repeat(image_ids, per_image))

    # Real photos repeat a few classes (several people, several cars): each image draws a handful of
    # classes and its boxes are spread over them, which is what makes the group rule bite.
    weights = np.array([HEAVY_CLASSES.get(name, 1.0) for name in classes.names], dtype=np.float64)
    image_classes = rng.choice(len(weights), size=(n_images, spec.max_classes_per_image),
                               p=weights / weights.sum())
    distinct = 1 + np.minimum(rng.poisson(spec.classes_per_image - 1.0, size=n_images),
                              spec.max_classes_per_image - 1)
    row_image = np.repeat(np.arange(n_images), per_image)
    slot = (rng.random(n) * distinct[row_image]).astype(np.int64)
    label_index = image_classes[row_image, slot]
    labels = pa.array(np.asarray(classes.mids, dtype=object)[label_index], pa.string())

    large = rng.random(n) < spec.large_box_rate
    width = np.where(large, rng.uniform(0.45, 1.0, n), rng.uniform(0.02, 0.5, n))
    height = np.where(large, rng.uniform(0.45, 1.0, n), rng.uniform(0.02, 0.5, n))
    xmin = rng.uniform(0.0, 1.0 - width)
    ymin = rng.uniform(0.0, 1.0 - height)
    # Round the corners first so that the written box never collapses to zero width.
    xmin, ymin = np.round(xmin, 6), np.round(ymin, 6)
    xmax = np.minimum(xmin + np.maximum(np.round(width, 6), 1e-5), 1.0)
    ymax = np.minimum(ymin + np.maximum(np.round(height, 6), 1e-5), 1.0)

    columns: dict[str, pa.Array] = {
        "ImageID": image_col,
        "Source": pc.if_else(pa.array(rng.random(n) < 0.7), pa.scalar("xclick"), pa.scalar("activemil")),
        "LabelName": labels,
        "Confidence": pa.array(np.full(n, "1", dtype=object), pa.string()),
        "XMin": _micro_strings(xmin),
        "XMax": _micro_strings(xmax),
        "YMin": _micro_strings(ymin),
        "YMax": _micro_strings(ymax),
        "IsOccluded": _flag_strings(rng, n, 0.5, spec.unknown_flag_rate),
        "IsTruncated": _flag_strings(rng, n, 0.3, spec.unknown_flag_rate),
        "IsGroupOf": _flag_strings(rng, n, spec.group_rate, spec.unknown_flag_rate),
        "IsDepiction": _flag_strings(rng, n, 0.05, spec.unknown_flag_rate),
        "IsInside": _flag_strings(rng, n, spec.inside_rate, spec.unknown_flag_rate),
    }
    if with_clicks:
        clicked = pc.equal(columns["Source"], "xclick").to_numpy(zero_copy_only=False)
        for axis, lo, hi in (("X", xmin, xmax), ("Y", ymin, ymax)):
            for k in range(1, 5):
                click = np.where(clicked, rng.uniform(lo, hi), -1.0)
                columns[f"XClick{k}{axis}"] = _micro_strings(click)
    names = TRAIN_COLUMNS if with_clicks else EVAL_COLUMNS
    return pa.table({name: columns[name] for name in names})


def random_image_ids(rng: np.random.Generator, n: int, low: int = 0, high: int = 2**63 - 1) -> np.ndarray:
    """Unique 16-hex-digit ids like OpenImages' ("000002b66c9c498e"), in ascending order as in the files."""
    raw = np.unique(rng.integers(low, high, size=int(n * 1.01) + 16, dtype=np.int64))
    raw = np.sort(rng.choice(raw, size=min(n, len(raw)), replace=False))
    return np.array([f"{v:016x}" for v in raw], dtype=object)


def write_bbox_csv(
    path: str | Path,
    n_rows: int,
    classes: ClassList,
    seed: int = 0,
    with_clicks: bool = True,
    spec: SyntheticSpec = SyntheticSpec(),
    chunk_images: int = 200_000,
) -> int:
    """Write an official-format box file of about ``n_rows`` rows; returns the exact row count."""
    rng = np.random.default_rng(seed)
    n_images = max(1, round(n_rows / spec.boxes_per_image))
    written = 0
    # pyarrow quotes header names; the official files do not, so the header is written by hand.
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with open(path, "wb") as handle:
        handle.write((",".join(TRAIN_COLUMNS if with_clicks else EVAL_COLUMNS) + "\n").encode())
        writer = None
        n_chunks = -(-n_images // chunk_images)
        for k, start in enumerate(range(0, n_images, chunk_images)):
            count = min(chunk_images, n_images - start)
            span = (2**63 - 1) // n_chunks  # each chunk draws from its own id range: the file stays sorted
            ids = random_image_ids(rng, count, k * span, (k + 1) * span)
            table = generate_boxes(count, classes, rng, spec, with_clicks, image_ids=ids)
            if writer is None:
                writer = pacsv.CSVWriter(handle, table.schema, write_options=options)
            writer.write_table(table)
            written += table.num_rows
        if writer is not None:
            writer.close()
    return written


def write_images_csv(path: str | Path, image_ids: list[str] | np.ndarray, subset: str = "train") -> None:
    """The image list in the official format (``train-images-boxable-with-rotation.csv``)."""
    ids = pa.array(np.asarray(image_ids, dtype=object), pa.string())
    n = len(ids)
    rotation = np.where(np.arange(n) % 10 == 0, 90.0, np.nan)
    url = pc.binary_join_element_wise("https://farm.example.org/", ids, ".jpg", "")
    table = pa.table({
        "ImageID": ids,
        "Subset": pa.array([subset] * n),
        "OriginalURL": url,
        "OriginalLandingURL": url,
        "License": pa.array(["https://creativecommons.org/licenses/by/2.0/"] * n),
        "AuthorProfileURL": pa.array([""] * n),
        "Author": pa.array(["someone"] * n),
        "Title": pa.array(["a photo"] * n),
        "OriginalSize": pa.array(np.full(n, 123456, dtype=np.int64)),
        "OriginalMD5": pa.array(["d41d8cd98f00b204e9800998ecf8427e"] * n),
        "Thumbnail300KURL": url,
        "Rotation": pa.array(rotation),
    })
    pacsv.write_csv(table, str(path))
