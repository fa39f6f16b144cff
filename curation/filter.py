"""The paper's subject filter (BLIP-Diffusion, appendix A.5) over OpenImages-V6 boxes.

A candidate is one (ImageID, LabelName) pair. The rules run in a fixed order and each one is a small
function over candidate arrays, so the funnel can count what every rule removed:

1. ``excluded_class``: human-related and cluttered classes (display names resolved through the class file);
2. ``group``: ``paper`` drops a candidate with any IsGroupOf=1 box or more than one box; ``keep-first``
   (the authors' development code) drops IsGroupOf=1 and IsInside=1 boxes, then keeps the first remaining
   box in file order;
3. ``inside``: the photo is taken from inside the subject (IsInside=1);
4. ``aspect``: max(w/h, h/w) of the normalized box above the limit;
5. ``area``: box area outside the open interval (min_area, max_area).

Flags count only when they are 1; -1 (unknown) never drops a box.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import pyarrow as pa

from subjectpairs.curation.classes import ClassList
from subjectpairs.curation.config import FilterRules
from subjectpairs.curation.openimages import Boxes


@dataclass
class Candidates:
    """One entry per (image, class), with the box that represents it."""

    image_codes: np.ndarray
    class_index: np.ndarray
    box_row: np.ndarray  # index into Boxes of the representative box, -1 if none survives
    box_count: np.ndarray
    any_group: np.ndarray
    first_eligible_row: np.ndarray  # first box that is neither group nor inside, -1 if none (or not asked)

    def __len__(self) -> int:
        return len(self.image_codes)

    def select(self, keep: np.ndarray) -> Candidates:
        return Candidates(**{name: getattr(self, name)[keep] for name in self.__dataclass_fields__})


@dataclass
class FunnelStep:
    rule: str
    remaining: int
    dropped: int


@dataclass
class FilterResult:
    boxes: Boxes
    kept: Candidates
    steps: list[FunnelStep] = field(default_factory=list)


def group_candidates(boxes: Boxes, n_classes: int, first_eligible: bool = True) -> Candidates:
    """Group boxes by (image, class).

    A stable sort on one int64 key keeps file order inside each group, so the first row of a group is the
    first box in the file. OpenImages files list an image's boxes together, which the sort exploits (runs).
    ``first_eligible`` also finds each group's first box that is neither group nor inside (keep-first).
    """
    n = len(boxes)
    key = boxes.image_codes.astype(np.int64) * n_classes + boxes.class_index
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    del key
    is_start = np.empty(n, dtype=bool)
    is_start[:1] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    group_key = sorted_key[starts]
    del sorted_key
    group_sorted = boxes.is_group[order]
    any_group = np.logical_or.reduceat(group_sorted, starts) if n else np.zeros(0, bool)

    first_eligible_row = np.full(len(starts), -1, dtype=np.int64)
    if first_eligible:
        eligible_pos = np.flatnonzero(~group_sorted & ~boxes.is_inside[order])
        group_of_eligible = (np.cumsum(is_start, dtype=np.int32) - 1)[eligible_pos]
        first_of_group = np.ones(len(eligible_pos), dtype=bool)
        np.not_equal(group_of_eligible[1:], group_of_eligible[:-1], out=first_of_group[1:])
        first_eligible_row[group_of_eligible[first_of_group]] = order[eligible_pos[first_of_group]]

    return Candidates(
        image_codes=(group_key // n_classes).astype(np.int32),
        class_index=(group_key % n_classes).astype(np.int32),
        box_row=order[starts].astype(np.int64),
        box_count=np.diff(np.append(starts, n)),
        any_group=any_group,
        first_eligible_row=first_eligible_row,
    )


def keep_not_excluded(candidates: Candidates, excluded_class_index: np.ndarray) -> np.ndarray:
    return ~np.isin(candidates.class_index, excluded_class_index)


def keep_single_subject(candidates: Candidates, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """The group rule; returns the keep mask and the representative box of each candidate."""
    if policy == "paper":
        return (candidates.box_count == 1) & ~candidates.any_group, candidates.box_row
    return candidates.first_eligible_row >= 0, candidates.first_eligible_row


def keep_outside(candidates: Candidates, boxes: Boxes) -> np.ndarray:
    return ~boxes.is_inside[candidates.box_row]


def box_shape(candidates: Candidates, boxes: Boxes) -> tuple[np.ndarray, np.ndarray]:
    xmin, xmax, ymin, ymax = boxes.corners(candidates.box_row)
    return xmax - xmin, ymax - ymin


def aspect_of(width: np.ndarray, height: np.ndarray) -> np.ndarray:
    return np.maximum(width / height, height / width)


def keep_aspect(candidates: Candidates, boxes: Boxes, max_aspect: float) -> np.ndarray:
    return aspect_of(*box_shape(candidates, boxes)) <= max_aspect


def keep_area(candidates: Candidates, boxes: Boxes, min_area: float, max_area: float) -> np.ndarray:
    width, height = box_shape(candidates, boxes)
    area = width * height
    return (area > min_area) & (area < max_area)


def apply_rules(boxes: Boxes, classes: ClassList, rules: FilterRules) -> FilterResult:
    candidates = group_candidates(boxes, len(classes), first_eligible=rules.duplicates == "keep-first")
    steps = [FunnelStep("candidates", len(candidates), 0)]

    def step(rule: str, keep: np.ndarray) -> None:
        nonlocal candidates
        before = len(candidates)
        candidates = candidates.select(keep)
        steps.append(FunnelStep(rule, len(candidates), before - len(candidates)))

    excluded = np.array(
        [classes.mids.index(mid) for mid in classes.mids_for_names(rules.excluded_classes)], dtype=np.int32
    )
    step("excluded_class", keep_not_excluded(candidates, excluded))
    keep, box_row = keep_single_subject(candidates, rules.duplicates)
    candidates = replace(candidates, box_row=box_row)
    step("group", keep)
    step("inside", keep_outside(candidates, boxes))
    step("aspect", keep_aspect(candidates, boxes, rules.max_aspect))
    step("area", keep_area(candidates, boxes, rules.min_area, rules.max_area))
    return FilterResult(boxes=boxes, kept=candidates, steps=steps)


def candidate_table(result: FilterResult, classes: ClassList) -> pd.DataFrame:
    """The kept candidates as a table sorted by (image_id, label_mid), so downstream order is fixed."""
    kept, boxes = result.kept, result.boxes
    xmin, xmax, ymin, ymax = boxes.corners(kept.box_row)
    width, height = xmax - xmin, ymax - ymin
    mids = np.asarray(classes.mids, dtype=object)
    names = np.asarray(classes.names, dtype=object)
    image_ids = np.asarray(boxes.image_ids.take(pa.array(kept.image_codes)).to_pylist(), dtype=object)
    frame = pd.DataFrame({
        "image_id": pd.array(image_ids, dtype="string"),
        "label_mid": pd.array(mids[kept.class_index], dtype="string"),
        "category": pd.array(names[kept.class_index], dtype="string"),
        "xmin": xmin,
        "xmax": xmax,
        "ymin": ymin,
        "ymax": ymax,
        "area": width * height,
        "aspect": aspect_of(width, height),
        "box_count": kept.box_count.astype(np.int32),
    })
    return frame.sort_values(["image_id", "label_mid"], kind="stable").reset_index(drop=True)
