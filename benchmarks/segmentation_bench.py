"""Segmentation quality on real photos: IoU of each segmenter's subject mask against outlines traced by hand.

The photos and their outlines are in ``benchmarks/data/segmentation_outlines.json``: DreamBench subjects
(Ruiz et al., CVPR 2023; CC BY 4.0) and scikit-image's real photos, each with a box taken from its
outline. Every segmenter runs through the project's own code (``build_segmenter``), and its map becomes a
mask three ways, as the pair stage sees it:

- ``alpha``: the alpha over 0.5 after the pair stage's trimap and matting: what training gets;
- ``map``: the normalized map over the trimap's foreground threshold;
- ``trimap``: the trimap's foreground plus unknown (everything not taken as sure background).

It prints the ``alpha`` IoU per photo and setting (GrabCut's work side and iterations, and the box itself
as a baseline), the mean IoU of each mask per setting with the time per pair, and for the default setting
the largest parts of each subject that the mask loses. An overlay per photo goes to ``--out``: kept
subject in colour, lost subject in red, background taken for subject in blue, the traced outline in green.

GrabCut needs no weights; ``--clipseg ID_OR_FOLDER`` adds a CLIPSeg model already on disk (on the CPU).

Usage: python benchmarks/segmentation_bench.py [--sides 96 128 192 256] [--iterations 3 5 8] [--out /tmp]
       [--clipseg FOLDER]
"""

from __future__ import annotations

import os

# The machines this runs on are shared: one thread per library, set before numpy or OpenCV start pools.
for variable in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from subjectpairs.pipelines.boxes import Box  # noqa: E402
from subjectpairs.pipelines.segmenters import SegmenterConfig
from subjectpairs.pipelines.config import PairConfig
from subjectpairs.pipelines.images import encode_png  # noqa: E402
from subjectpairs.pipelines.matting import estimate_alpha  # noqa: E402
from subjectpairs.pipelines.pairs import PairRequest, photo_key, prepare  # noqa: E402
from subjectpairs.pipelines.rejections import PairRejected  # noqa: E402
from subjectpairs.pipelines.sample_photos import photo as sample_photo  # noqa: E402
from subjectpairs.pipelines.segmentation import Segmenter, prompt_for
from subjectpairs.pipelines.segmenters import build_segmenter
from subjectpairs.pipelines.trimap import BACKGROUND, make_trimap, normalize_map  # noqa: E402

HERE = Path(__file__).resolve().parent
OUTLINES = HERE / "data" / "segmentation_outlines.json"
DREAMBENCH = HERE.parent.parent / "shared" / "data" / "dreambench"
MASKS = ("alpha", "map", "trimap")
# A lost part smaller than this share of the subject is edge noise, not a part.
MIN_LOST_SHARE = 0.005
LOST_PARTS_SHOWN = 3


@dataclass(frozen=True)
class TracedPhoto:
    photo: str  # dreambench:<subject>/<NN> or skimage:<name>
    category: str
    shape: tuple[int, int]  # (height, width) of the photo the outline was traced on
    box: Box
    outline: np.ndarray
    holes: tuple[np.ndarray, ...] = ()

    @property
    def name(self) -> str:
        return self.photo.split(":", 1)[1].replace("/", "-")

    def mask(self) -> np.ndarray:
        """The traced subject as a boolean mask: the outline filled, its holes left out."""
        mask = np.zeros(self.shape, np.uint8)
        cv2.fillPoly(mask, [self.outline], 1)
        if self.holes:
            cv2.fillPoly(mask, list(self.holes), 0)
        return mask.astype(bool)

    def image(self, dreambench: Path) -> np.ndarray:
        kind, name = self.photo.split(":", 1)
        image = sample_photo(name) if kind == "skimage" else np.asarray(
            Image.open(dreambench / f"{name}.jpg").convert("RGB"))
        if image.shape[:2] != self.shape:
            raise SystemExit(f"{self.photo}: {image.shape[1]}x{image.shape[0]}, but the outline was traced "
                             f"on {self.shape[1]}x{self.shape[0]}")
        return image


def read_outlines(path: Path = OUTLINES) -> list[TracedPhoto]:
    photos = json.loads(path.read_text())["photos"]
    return [
        TracedPhoto(entry["photo"], entry["category"], (entry["size"][1], entry["size"][0]),
                    Box(*entry["box"]), np.array(entry["outline"], np.int32),
                    tuple(np.array(hole, np.int32) for hole in entry.get("holes", ())))
        for entry in photos
    ]


def iou(predicted: np.ndarray, reference: np.ndarray) -> float:
    union = (predicted | reference).sum()
    return float((predicted & reference).sum() / union) if union else 1.0


def box_mask(box: Box, shape: tuple[int, int]) -> np.ndarray:
    x0, x1, y0, y1 = box.pixels(*shape)
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


@dataclass
class Setting:
    label: str
    segmenter: Segmenter


@dataclass
class Result:
    masks: dict[str, np.ndarray]
    seconds: dict[str, float]
    rejected: str = ""


def grabcut_settings(sides: list[int], iterations: list[int]) -> list[Setting]:
    default = SegmenterConfig()
    settings = []
    for side in sides:
        for count in iterations:
            star = "*" if (side, count) == (default.grabcut_side, default.grabcut_iterations) else ""
            config = SegmenterConfig(kind="grabcut", grabcut_side=side, grabcut_iterations=count)
            settings.append(Setting(f"gc{side}/{count}{star}", build_segmenter(config)))
    return settings


def measure(traced: TracedPhoto, image: np.ndarray, segmenter: Segmenter, config: PairConfig) -> Result:
    """The three subject masks of one photo with one segmenter, and the time of each stage. The alpha is
    the pair stage's trimap and matting; the pair's composite and its quality gate are left out, as
    they do not change the subject's mask."""
    key = photo_key(traced.name, traced.category)
    request = PairRequest(key, traced.category, encode_png(image), traced.box)
    prepared = prepare(request, config)
    if prepared.target.shape != image.shape:
        raise SystemExit(f"{traced.photo}: the pair stage works at {prepared.target.shape[:2]}, not the "
                         f"photo's {image.shape[:2]}; the outline would not line up")
    started = time.perf_counter()
    (subject_map,) = segmenter.segment([prepared.target], [prompt_for(traced.category)], [prepared.box])
    segmented = time.perf_counter()
    try:
        over_threshold = normalize_map(subject_map, config.trimap) > config.trimap.high
        trimap, _ = make_trimap(subject_map, prepared.box, config.trimap)
    except PairRejected as exc:  # the pair stage gives no pair: nothing of the subject reaches training
        empty = np.zeros(image.shape[:2], bool)
        return Result(dict.fromkeys(MASKS, empty), {"segment": segmented - started},
                      f"{exc.stage}/{exc.reason}")
    alpha, _, _ = estimate_alpha(prepared.target, trimap, config.matting)
    masks = {"alpha": alpha > 0.5, "map": over_threshold, "trimap": trimap != BACKGROUND}
    return Result(masks, {"segment": segmented - started, "matting": time.perf_counter() - segmented})


def position(x: float, y: float, bounds: tuple[int, int, int, int]) -> str:
    """Where a point lies in the subject's bounds, by thirds: top-left ... bottom-right."""
    x0, x1, y0, y1 = bounds
    column = ("left", "centre", "right")[min(int(3 * (x - x0) / max(x1 - x0, 1)), 2)]
    row = ("top", "middle", "bottom")[min(int(3 * (y - y0) / max(y1 - y0, 1)), 2)]
    return f"{row}-{column}"


def lost_parts(predicted: np.ndarray, reference: np.ndarray, shown: int = LOST_PARTS_SHOWN) -> list[str]:
    """The largest connected parts of the traced subject that the mask misses, described by place and size."""
    missed = (reference & ~predicted).astype(np.uint8)
    count, _, stats, centroids = cv2.connectedComponentsWithStats(missed, connectivity=8)
    subject = int(reference.sum())
    ys, xs = np.nonzero(reference)
    bounds = (int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1)
    parts = sorted(range(1, count), key=lambda label: -stats[label, cv2.CC_STAT_AREA])[:shown]
    described = []
    for label in parts:
        area = int(stats[label, cv2.CC_STAT_AREA])
        if area < MIN_LOST_SHARE * subject:
            break
        x, y, width, height = (int(stats[label, k]) for k in
                               (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
        described.append(f"{position(*centroids[label], bounds)} {width}x{height} px at x {x}-{x + width}, "
                         f"y {y}-{y + height} ({100 * area / subject:.1f}% of the subject)")
    return described


def overlay(image: np.ndarray, predicted: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Kept subject in colour, lost subject red, background taken for subject blue, the rest dimmed; the
    traced outline green."""
    shown = (image * 0.35).astype(np.uint8)
    kept = predicted & reference
    shown[kept] = image[kept]
    shown[reference & ~predicted] = (230, 40, 40)
    shown[predicted & ~reference] = (40, 90, 230)
    contours, _ = cv2.findContours(reference.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(shown, contours, -1, (60, 230, 60), 1)
    return shown


@dataclass
class Table:
    """IoU per (photo, setting, mask) and seconds per (setting, stage)."""

    ious: dict[tuple[str, str, str], float] = field(default_factory=dict)
    seconds: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)

    def add(self, photo: str, setting: str, result: Result, reference: np.ndarray) -> None:
        for mask in MASKS:
            self.ious[photo, setting, mask] = iou(result.masks[mask], reference)
        for stage, value in result.seconds.items():
            self.seconds.setdefault((setting, stage), []).append(value)
        if result.rejected:
            self.rejected.append(f"{photo} with {setting}: no pair ({result.rejected})")

    def mean(self, setting: str, mask: str, photos: list[str]) -> float:
        return statistics.fmean(self.ious[photo, setting, mask] for photo in photos)


def print_report(table: Table, photos: list[str], settings: list[str]) -> None:
    width = max(len(setting) for setting in settings) + 1
    print(f"\nIoU with the traced subject, alpha > 0.5 ({len(photos)} photos; * the default setting)")
    print(f"{'photo':<14}{'box':>7}" + "".join(f"{setting:>{width}}" for setting in settings))
    for photo in photos:
        print(f"{photo:<14}{table.ious[photo, 'box', 'alpha']:>7.3f}"
              + "".join(f"{table.ious[photo, setting, 'alpha']:>{width}.3f}" for setting in settings))
    print("\nmean IoU per setting, per mask, and seconds per pair (segment; trimap and matting)")
    print(f"{'setting':<{width}}" + "".join(f"{mask:>8}" for mask in MASKS)
          + f"{'segment':>10}{'matting':>9}")
    print(f"{'box':<{width}}{table.mean('box', 'alpha', photos):>8.3f}")
    for setting in settings:
        times = [statistics.fmean(table.seconds.get((setting, stage), [0.0]))
                 for stage in ("segment", "matting")]
        print(f"{setting:<{width}}" + "".join(f"{table.mean(setting, mask, photos):>8.3f}" for mask in MASKS)
              + f"{times[0]:>9.3f}s{times[1]:>8.3f}s")
    for line in table.rejected:
        print(f"  {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[96, 128, 192, 256],
                        help="GrabCut work sides (short side GrabCut segments at)")
    parser.add_argument("--iterations", type=int, nargs="+", default=[3, 5, 8], help="GrabCut iterations")
    parser.add_argument("--clipseg", help="a CLIPSeg hub id or folder already on disk, measured as well")
    parser.add_argument("--outlines", type=Path, default=OUTLINES)
    parser.add_argument("--dreambench", type=Path, default=DREAMBENCH,
                        help="DreamBench folder (<subject>/NN.jpg)")
    parser.add_argument("--out", type=Path, default=Path("/tmp"), help="folder for the overlay PNGs")
    args = parser.parse_args()
    cv2.setNumThreads(1)

    settings = grabcut_settings(args.sides, args.iterations)
    if args.clipseg:
        clipseg = SegmenterConfig(kind="clipseg", model=args.clipseg, device="cpu")
        settings.append(Setting("clipseg", build_segmenter(clipseg)))
    # the setting whose losses are described and drawn: the default GrabCut if measured, and CLIPSeg
    described = ([s.label for s in settings if s.label.endswith("*") or s.label == "clipseg"]
                 or [settings[0].label])

    traced_photos = [t for t in read_outlines(args.outlines)
                     if not t.photo.startswith("dreambench:") or args.dreambench.is_dir()]
    if not args.dreambench.is_dir():
        print(f"{args.dreambench}: not found, DreamBench photos left out")
    config = PairConfig()
    args.out.mkdir(parents=True, exist_ok=True)
    table = Table()
    lost: list[str] = []
    for traced in traced_photos:
        image = traced.image(args.dreambench)
        reference = traced.mask()
        table.ious[traced.name, "box", "alpha"] = iou(box_mask(traced.box, image.shape[:2]), reference)
        for setting in settings:
            result = measure(traced, image, setting.segmenter, config)
            table.add(traced.name, setting.label, result, reference)
            if setting.label in described:
                suffix = "clipseg" if setting.label == "clipseg" else "grabcut"
                path = args.out / f"segmentation_{traced.name}_{suffix}.png"
                Image.fromarray(overlay(image, result.masks["alpha"], reference)).save(path)
                parts = lost_parts(result.masks["alpha"], reference) or ["nothing"]
                lost.append(f"{traced.name} ({traced.category}), {setting.label}, IoU "
                            f"{table.ious[traced.name, setting.label, 'alpha']:.3f}, lost: "
                            + "; ".join(parts) + f"\n    overlay {path}")
        print(f"  {traced.name}: done", flush=True)

    print_report(table, [t.name for t in traced_photos], [s.label for s in settings])
    print("\nlargest lost parts of the subject (traced minus alpha > 0.5)")
    for line in lost:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
