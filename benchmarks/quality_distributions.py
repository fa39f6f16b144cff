"""Per-pair quality metrics on real photos, and where the quality gate's bounds sit among them.

Sources, each built through the pair stage (``PairBuilder``) with the gate off, so every pair is measured:

- ``dreambench``: six DreamBench subjects (Ruiz et al., CVPR 2023; CC BY 4.0), boxes placed by eye in
  ``benchmarks/data/dreambench_boxes.csv``;
- ``skimage``: scikit-image's real photos with their hand-placed boxes (``sample_photos.SUBJECT_PHOTOS``);
- ``demo``: the demo's candidates (real and generated photos), with the demo build's pair settings.

It prints per source the percentiles of each metric, the pairs the bounds remove and why, and how the
removals agree with the by-eye labels in ``benchmarks/data/quality_labels.csv`` (good or bad per pair and
segmenter, given by looking at each composite). ``--sheet`` writes a contact sheet: the removed pairs,
then the kept pairs nearest the bounds, each as photo with box | composite | alpha. ``--review DIR``
writes every pair that way, one sheet per source, for labelling.

GrabCut by default (no weights needed); ``--segmenter clipseg --model ID_OR_FOLDER`` measures CLIPSeg.

Usage: python benchmarks/quality_distributions.py [--sheet docs/quality-gate.png] [--review DIR]
       [--min-alpha-in-box 0.3 ...]
"""

from __future__ import annotations

import os

# The machines this runs on are shared: one thread per library, set before numpy or OpenCV start pools.
for variable in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from subjectpairs.pipelines.boxes import Box  # noqa: E402
from subjectpairs.pipelines.config import CompositeConfig, PairConfig, QualityConfig  # noqa: E402
from subjectpairs.pipelines.images import to_uint8  # noqa: E402
from subjectpairs.pipelines.pairs import Pair, PairBuilder, PairRequest, photo_key  # noqa: E402
from subjectpairs.pipelines.quality import GATED_METRICS, quality_gate  # noqa: E402
from subjectpairs.pipelines.rejections import PairRejected  # noqa: E402
from subjectpairs.pipelines.sample_photos import SUBJECT_PHOTOS, photo  # noqa: E402

HERE = Path(__file__).resolve().parent
DREAMBENCH_BOXES = HERE / "data" / "dreambench_boxes.csv"
LABELS = HERE / "data" / "quality_labels.csv"
DREAMBENCH = HERE.parent.parent / "shared" / "data" / "dreambench"
METRICS = ("alpha_in_box", "alpha_outside_box", "unknown_fraction", "map_box_iou", "matting_residual")
PERCENTILES = (("min", 0), ("p5", 5), ("p25", 25), ("median", 50), ("p75", 75), ("p95", 95), ("max", 100))
THUMB = 160  # contact sheet tile height: the sheet ships in docs/, so it stays small


@dataclass
class Measured:
    source: str
    pair: Pair
    label: str  # good, bad, or unlabelled

    @property
    def metrics(self) -> dict:
        return self.pair.metrics


def jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def dreambench_requests(folder: Path) -> list[PairRequest]:
    with open(DREAMBENCH_BOXES, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        PairRequest(photo_key(f"{row['subject']}-{row['photo']}", row["category"]), row["category"],
                    (folder / row["subject"] / f"{row['photo']}.jpg").read_bytes(),
                    Box(*(float(row[name]) for name in ("xmin", "xmax", "ymin", "ymax"))))
        for row in rows
    ]


def sample_photo_requests() -> list[PairRequest]:
    return [PairRequest(photo_key(name, category), category, jpeg(photo(name)), box)
            for name, category, box in SUBJECT_PHOTOS]


def demo_requests(folder: Path, scenes: int, seed: int) -> tuple[list[PairRequest], str]:
    """The demo's candidates (after its filter) as requests, and its background pool."""
    from subjectpairs.curation.candidates import run_filter
    from subjectpairs.demo import write_demo_data
    from subjectpairs.pipelines.shards import load_candidates

    filter_config, images, pool = write_demo_data(folder, scenes, seed)
    filtered = run_filter(filter_config)
    candidates = load_candidates(str(Path(filtered.out_dir) / "candidates.parquet"), str(images))
    requests = [PairRequest(c.key, c.category, Path(c.photo_uri).read_bytes(), c.box)
                for c in candidates if Path(c.photo_uri).is_file()]
    return requests, str(pool)


def build(requests: list[PairRequest], config: PairConfig) -> list[Pair]:
    pairs = []
    for request, result in zip(requests, PairBuilder(config).build(requests)):
        if isinstance(result, Pair):
            pairs.append(result)
        else:  # a corrupt demo photo, say: not a pair, so no metrics
            print(f"  {request.key}: rejected ({result.stage}/{result.reason})")
    return pairs


def read_labels(segmenter: str) -> dict[tuple[str, str], str]:
    with open(LABELS, newline="") as handle:
        return {(row["source"], row["key"]): row["label"] for row in csv.DictReader(handle)
                if row["segmenter"] == segmenter}


def gate_failure(metrics: dict, bounds: QualityConfig) -> str:
    """Why the pair stage's gate would reject a pair with these metrics ("" when it keeps it)."""
    try:
        quality_gate(metrics, bounds)
    except PairRejected as rejected:
        return rejected.detail
    return ""


def slack(metrics: dict, bounds: QualityConfig) -> tuple[float, str]:
    """How far a kept pair is from the nearest bound, as a share of that bound, and which bound it is."""
    nearest = (float("inf"), "")
    for metric, setting in GATED_METRICS:
        bound, value = getattr(bounds, setting), metrics.get(metric)
        if bound is None or value is None:
            continue
        room = (value - bound if setting.startswith("min_") else bound - value) / bound
        nearest = min(nearest, (room, metric))
    return nearest


def print_distributions(measured: list[Measured]) -> None:
    sources = sorted({m.source for m in measured}, key=[m.source for m in measured].index)
    header = f"{'source':<11} {'metric':<18} {'n':>3} " + " ".join(f"{name:>7}" for name, _ in PERCENTILES)
    print(header)
    print("-" * len(header))
    for source in sources:
        for metric in METRICS:
            values = [m.metrics[metric] for m in measured if m.source == source and m.metrics.get(metric) is not None]
            if not values:
                continue
            cells = " ".join(f"{np.percentile(values, q):7.3f}" for _, q in PERCENTILES)
            print(f"{source:<11} {metric:<18} {len(values):>3} {cells}")
        print()


def tile(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    return cv2.resize(image, (round(width * THUMB / height), THUMB), interpolation=cv2.INTER_AREA)


def text_strip(lines: list[str], width: int, shade: int = 255) -> np.ndarray:
    strip = np.full((16 * len(lines) + 4, width, 3), shade, np.uint8)
    for number, line in enumerate(lines):
        cv2.putText(strip, line, (3, 14 + 16 * number), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def captions(item: Measured) -> list[str]:
    m = item.metrics
    iou = "-" if m.get("map_box_iou") is None else f"{m['map_box_iou']:.2f}"
    # abs: the outside share is a difference of sums and can round to -0.000
    return [f"{item.source}/{item.pair.key} [{item.label}]",
            f"in {m['alpha_in_box']:.2f}  iou {iou}  out {abs(m['alpha_outside_box']):.3f}  "
            f"unk {m['unknown_fraction']:.3f}"]


def pair_row(item: Measured) -> np.ndarray:
    """photo with box | composite | alpha, under its key, label and metrics."""
    pair = item.pair
    photo_with_box = pair.target.copy()
    x0, x1, y0, y1 = pair.box.pixels(*pair.target.shape[:2])
    cv2.rectangle(photo_with_box, (x0, y0), (x1 - 1, y1 - 1), (0, 255, 0), max(2, pair.target.shape[0] // 120))
    alpha = np.repeat(to_uint8(pair.alpha)[:, :, None], 3, axis=2)
    images = np.hstack([np.pad(tile(image), ((0, 0), (0, 4), (0, 0)), constant_values=255)
                        for image in (photo_with_box, pair.composite, alpha)])
    return np.vstack([text_strip(captions(item), images.shape[1]), images])


def save_sheet(sections: list[tuple[str, list[Measured]]], path: Path, columns: int = 2) -> None:
    """Sections of pair rows, ``columns`` side by side, each under its heading; a 256-colour PNG, which
    keeps a sheet of photos a few hundred KB."""
    rows = {id(item): pair_row(item) for _, items in sections for item in items}
    cell = (max(row.shape[0] for row in rows.values()) + 6, max(row.shape[1] for row in rows.values()) + 8)
    width = cell[1] * columns
    parts = []
    for title, items in sections:
        parts.append(text_strip([title], width, shade=225))
        cells = [np.pad(rows[id(item)], ((0, cell[0] - rows[id(item)].shape[0]), (0, cell[1] - rows[id(item)].shape[1]),
                                         (0, 0)), constant_values=255) for item in items]
        cells += [np.full((*cell, 3), 255, np.uint8)] * (-len(cells) % columns)
        parts.extend(np.hstack(cells[start:start + columns]) for start in range(0, len(cells), columns))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.vstack(parts)).quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> int:
    defaults = QualityConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dreambench", type=Path, default=DREAMBENCH, help="DreamBench folder (<subject>/NN.jpg)")
    parser.add_argument("--segmenter", choices=("grabcut", "clipseg"), default="grabcut")
    parser.add_argument("--model", help="CLIPSeg hub id or folder, with --segmenter clipseg")
    parser.add_argument("--demo-scenes", type=int, default=21, help="generated scenes in the demo data")
    parser.add_argument("--sheet", type=Path, help="contact sheet of the removed pairs and the margin")
    parser.add_argument("--margin-rows", type=int, default=6, help="kept pairs nearest the bounds on the sheet")
    parser.add_argument("--review", type=Path, help="folder for one sheet per source with every pair")
    for _, setting in GATED_METRICS:
        parser.add_argument(f"--{setting.replace('_', '-')}", type=float, default=getattr(defaults, setting),
                            help="default: the pair stage's (pair.quality)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    bounds = QualityConfig(**{setting: getattr(args, setting) for _, setting in GATED_METRICS})

    segmenter = {"kind": args.segmenter, "model": args.model}
    labels = read_labels(args.segmenter)
    measured: list[Measured] = []

    def add(source: str, pairs: list[Pair]) -> None:
        measured.extend(Measured(source, pair, labels.get((source, pair.key), "unlabelled")) for pair in pairs)

    print(f"segmenter: {args.segmenter}; building pairs with the gate off")
    config = PairConfig(segmenter=segmenter, quality={"enabled": False})
    add("dreambench", build(dreambench_requests(args.dreambench), config))
    add("skimage", build(sample_photo_requests(), config))
    with tempfile.TemporaryDirectory() as folder:
        # The demo build's pair settings: its seed (0) and its background pool.
        requests, pool = demo_requests(Path(folder), args.demo_scenes, seed=0)
        add("demo", build(requests, config.model_copy(update={"composite": CompositeConfig(backgrounds=[pool])})))

    print()
    print_distributions(measured)
    print("bounds: " + ", ".join(f"{setting} {getattr(bounds, setting)}" for _, setting in GATED_METRICS))
    removed = [m for m in measured if gate_failure(m.metrics, bounds)]
    print(f"removed {len(removed)} of {len(measured)} pairs:")
    for item in removed:
        print(f"  {item.source}/{item.pair.key} [{item.label}]: {gate_failure(item.metrics, bounds)}")
    kept = [m for m in measured if m not in removed]
    kept_bad = [m for m in kept if m.label == "bad"]
    removed_good = [m for m in removed if m.label == "good"]
    print(f"by-eye labels: {sum(m.label == 'bad' for m in measured)} bad, {sum(m.label == 'good' for m in measured)} "
          f"good, {sum(m.label == 'unlabelled' for m in measured)} unlabelled; bad kept {len(kept_bad)}, "
          f"good removed {len(removed_good)}")
    for item in kept_bad:
        print(f"  bad but kept: {'  '.join(captions(item))}")
    for item in removed_good:
        print(f"  good but removed: {'  '.join(captions(item))}")
    margin = sorted(kept, key=lambda m: slack(m.metrics, bounds))[:args.margin_rows]
    print("kept pairs nearest the bounds:")
    for item in margin:
        room, metric = slack(item.metrics, bounds)
        print(f"  {room:6.1%} above the {metric} bound: {'  '.join(captions(item))}")

    if args.sheet:
        save_sheet([(f"removed by the gate ({len(removed)} pairs)", removed),
                    (f"kept, nearest the bounds ({len(margin)} pairs)", margin)], args.sheet)
        print(f"contact sheet: {args.sheet} ({args.sheet.stat().st_size // 1024} KB)")
    if args.review:
        for source in dict.fromkeys(m.source for m in measured):
            path = args.review / f"{source}.png"
            save_sheet([(source, [m for m in measured if m.source == source])], path)
            print(f"review sheet: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
