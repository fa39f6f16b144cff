"""Per-pair quality metrics, for review and for filtering bad pairs out (docs/FORMAT.md defines them), and
the gate that rejects a pair outside the configured bounds."""

from __future__ import annotations

from typing import Any

import numpy as np

from subjectpairs.pipelines.boxes import Box, mask_box
from subjectpairs.pipelines.config import QualityConfig
from subjectpairs.pipelines.rejections import PairRejected
from subjectpairs.pipelines.trimap import UNKNOWN

# (metric, its bound in QualityConfig), in the order they are checked: the first that fails names the reason.
GATED_METRICS = (
    ("alpha_in_box", "min_alpha_in_box"),
    ("map_box_iou", "min_map_box_iou"),
    ("alpha_outside_box", "max_alpha_outside_box"),
    ("unknown_fraction", "max_unknown_fraction"),
)


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ax0, ax1, ay0, ay1 = a
    bx0, bx1, by0, by1 = b
    inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union else 0.0


def pair_metrics(
    alpha: np.ndarray, trimap: np.ndarray, subject_map: np.ndarray | None, box: Box, box_padding: float,
    map_threshold: float, residual: float,
) -> dict[str, float | None]:
    """
    - ``alpha_in_box``: mean alpha inside the subject box (low: the matte missed the subject).
    - ``alpha_outside_box``: share of the total alpha mass outside the padded box (high: the matte took
      other things).
    - ``unknown_fraction``: share of the image the trimap left unknown (high: an unsure segmentation).
    - ``map_box_iou``: IoU of the box around the map's foreground (map > ``map_threshold``) with the
      subject box; ``None`` when the trimap was given rather than segmented.
    - ``matting_residual``: mean |I - (aF + (1-a)B)| over unknown pixels, in [0, 1].
    """
    height, width = alpha.shape
    x0, x1, y0, y1 = box.pixels(height, width)
    px0, px1, py0, py1 = box.padded(box_padding).pixels(height, width)
    total = float(alpha.sum())
    outside = total - float(alpha[py0:py1, px0:px1].sum())
    map_box_iou = None
    if subject_map is not None:
        found = mask_box(subject_map > map_threshold)
        map_box_iou = 0.0 if found is None else round(_box_iou(found, (x0, x1, y0, y1)), 6)
    return {
        "alpha_in_box": round(float(alpha[y0:y1, x0:x1].mean()), 6),
        "alpha_outside_box": round(outside / total, 6) if total > 0 else 0.0,
        "unknown_fraction": round(float((trimap == UNKNOWN).mean()), 6),
        "map_box_iou": map_box_iou,
        "matting_residual": round(residual, 6),
    }


def quality_gate(metrics: dict[str, Any], config: QualityConfig) -> None:
    """Raise ``PairRejected("quality", ...)`` when a metric is outside its bound: the reason names the first
    such metric (``low_alpha_in_box``, ``high_unknown_fraction``, ...), the detail every one, with its value
    and bound (``alpha_in_box 0.077 < 0.3 (pair.quality.min_alpha_in_box)``)."""
    if not config.enabled:
        return
    failed = []
    for metric, setting in GATED_METRICS:
        bound, value = getattr(config, setting), metrics[metric]
        if bound is None or value is None:
            continue
        minimum = setting.startswith("min_")
        if value < bound if minimum else value > bound:
            reason = f"{'low' if minimum else 'high'}_{metric}"
            compared = f"{metric} {value:g} {'<' if minimum else '>'} {bound:g}"
            failed.append((reason, f"{compared} (pair.quality.{setting})"))
    if failed:
        raise PairRejected("quality", failed[0][0], "; ".join(detail for _, detail in failed))
