"""Each rule of the subject filter alone, in combination, and against an independent reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import box_row, write_boxes
from subjectpairs.curation.candidates import run_filter
from subjectpairs.curation.config import CLUTTERED_CLASSES, HUMAN_CLASSES, FilterConfig, FilterRules
from subjectpairs.curation.synthetic import SyntheticSpec, write_bbox_csv
from subjectpairs.errors import InputError


def run(tmp_path, classes_csv, rows, **rules):
    bbox = write_boxes(tmp_path / "boxes.csv", rows)
    config = FilterConfig(out=str(tmp_path / "out"), bbox=str(bbox), classes=str(classes_csv),
                          rules=FilterRules(**rules))
    report = run_filter(config)
    return set(zip(report.candidates.image_id, report.candidates.category)), report


def test_excluded_classes_are_exact_names(tmp_path, classes_csv, mid):
    kept_names = ["Human beard", "Coffee table", "Palm tree", "Suitcase", "Marine mammal", "Mango", "Cat"]
    dropped_names = list(HUMAN_CLASSES + CLUTTERED_CLASSES)
    rows = [box_row(f"img{i:03d}", mid(name)) for i, name in enumerate(kept_names + dropped_names)]
    kept, report = run(tmp_path, classes_csv, rows)
    assert {name for _, name in kept} == set(kept_names)
    assert report.funnel["dropped"]["excluded_class"] == len(dropped_names)


def test_excluded_names_are_configurable_and_case_insensitive(tmp_path, classes_csv, mid):
    rows = [box_row("a", mid("Cat")), box_row("b", mid("Person"))]
    kept, _ = run(tmp_path, classes_csv, rows, human_classes=["cat"], cluttered_classes=[])
    assert kept == {("b", "Person")}


def test_unknown_excluded_name_fails_at_start_up(tmp_path, classes_csv, mid):
    with pytest.raises(InputError, match="'Persn'"):
        run(tmp_path, classes_csv, [box_row("a", mid("Cat"))], human_classes=["Persn"])
    assert not (tmp_path / "out" / "candidates.parquet").exists()


def test_paper_group_rule_drops_repeated_classes_and_group_boxes(tmp_path, classes_csv, mid):
    rows = [
        box_row("twice", mid("Cat")), box_row("twice", mid("Cat"), xmin=0.2),  # two cats
        box_row("twice", mid("Dog")),  # the single dog of the same image stays
        box_row("group", mid("Cat"), group=1),
        box_row("unknown", mid("Cat"), group=-1),  # -1 is unknown, not a group
    ]
    kept, report = run(tmp_path, classes_csv, rows)
    assert kept == {("twice", "Dog"), ("unknown", "Cat")}
    assert report.funnel["after"]["candidates"] == 4
    assert report.funnel["dropped"]["group"] == 2


def test_keep_first_skips_group_and_inside_boxes_then_takes_the_first(tmp_path, classes_csv, mid):
    rows = [
        box_row("a", mid("Cat"), group=1, xmin=0.0),
        box_row("a", mid("Cat"), inside=1, xmin=0.05),
        box_row("a", mid("Cat"), xmin=0.15),  # the first eligible box: this one represents the candidate
        box_row("a", mid("Cat"), xmin=0.2),
        box_row("b", mid("Dog"), group=1),  # nothing eligible: dropped by the group rule
    ]
    kept, report = run(tmp_path, classes_csv, rows, duplicates="keep-first")
    assert kept == {("a", "Cat")}
    assert report.candidates.xmin.tolist() == [0.15]
    assert report.candidates.box_count.tolist() == [4]
    assert report.funnel["dropped"]["group"] == 1
    assert report.funnel["dropped"]["inside"] == 0


def test_inside_rule(tmp_path, classes_csv, mid):
    rows = [box_row("in", mid("Car"), inside=1), box_row("unknown", mid("Car"), inside=-1),
            box_row("out", mid("Car"), inside=0)]
    kept, report = run(tmp_path, classes_csv, rows)
    assert kept == {("unknown", "Car"), ("out", "Car")}
    assert report.funnel["dropped"]["inside"] == 1


@pytest.mark.parametrize("box,keep", [
    ((0.0, 0.5, 0.0, 1.0), True),  # exactly 2 (w/h = 0.5): kept, "exceeds 2" drops
    ((0.0, 1.0, 0.25, 0.75), True),
    ((0.0, 0.49, 0.0, 1.0), False),
    ((0.0, 1.0, 0.0, 0.49), False),
])
def test_aspect_rule(tmp_path, classes_csv, mid, box, keep):
    xmin, xmax, ymin, ymax = box
    kept, _ = run(tmp_path, classes_csv, [box_row("a", mid("Cat"), xmin=xmin, xmax=xmax, ymin=ymin, ymax=ymax)],
                  min_area=0.1, max_area=0.9)
    assert bool(kept) is keep


@pytest.mark.parametrize("side,keep", [(0.5, False), (0.5001, True), (0.8944, True), (0.8945, False)])
def test_area_rule_is_an_open_interval(tmp_path, classes_csv, mid, side, keep):
    # 0.5 * 0.5 = 0.25 exactly: on the lower bound, so dropped; 0.8945^2 = 0.80013 above the upper bound.
    kept, _ = run(tmp_path, classes_csv, [box_row("a", mid("Cat"), xmin=0, xmax=side, ymin=0, ymax=side)],
                  min_area=0.25, max_area=0.8)
    assert bool(kept) is keep


def test_rules_in_combination_and_the_funnel(tmp_path, classes_csv, mid):
    rows = [
        box_row("p", mid("Person")),  # excluded class
        box_row("g", mid("Cat"), group=1),  # group
        box_row("i", mid("Cat"), inside=1),  # inside
        box_row("s", mid("Cat"), xmin=0.0, xmax=0.3, ymin=0.0, ymax=1.0),  # aspect 3.3
        box_row("t", mid("Cat"), xmin=0.0, xmax=0.2, ymin=0.0, ymax=0.2),  # area 0.04
        box_row("k", mid("Cat")),  # kept: 0.7 x 0.7 = 0.49
        box_row("k", mid("Human beard")),  # kept: not a human-related class of the paper
    ]
    kept, report = run(tmp_path, classes_csv, rows)
    assert kept == {("k", "Cat"), ("k", "Human beard")}
    assert report.funnel["after"] == {"candidates": 7, "excluded_class": 6, "group": 5, "inside": 4,
                                      "aspect": 3, "area": 2}
    assert report.funnel["per_category"] == {"Cat": 1, "Human beard": 1}


def reference_filter(frame: pd.DataFrame, names: dict, policy: str) -> set:
    """A plain, row-by-row statement of the rules, independent of the vectorized implementation."""
    excluded = {n.casefold() for n in HUMAN_CLASSES + CLUTTERED_CLASSES}
    groups: dict = {}
    for row in frame.itertuples(index=False):
        groups.setdefault((row.ImageID, row.LabelName), []).append(row)
    kept = set()
    for (image, label), boxes in groups.items():
        if names[label].casefold() in excluded:
            continue
        if policy == "paper":
            if len(boxes) > 1 or boxes[0].IsGroupOf == 1:
                continue
            box = boxes[0]
            if box.IsInside == 1:
                continue
        else:
            eligible = [b for b in boxes if b.IsGroupOf != 1 and b.IsInside != 1]
            if not eligible:
                continue
            box = eligible[0]
        w, h = box.XMax - box.XMin, box.YMax - box.YMin
        if max(w / h, h / w) > 2 or not (0.3 < w * h < 0.8):
            continue
        kept.add((image, label))
    return kept


@pytest.mark.parametrize("policy", ["paper", "keep-first"])
@pytest.mark.parametrize("seed", [3, 11])
def test_matches_a_row_by_row_reference_on_generated_data(tmp_path, classes_csv, class_list, policy, seed):
    bbox = tmp_path / "boxes.csv"
    spec = SyntheticSpec(group_rate=0.15, inside_rate=0.1, large_box_rate=0.6, unknown_flag_rate=0.1)
    write_bbox_csv(bbox, 20_000, class_list, seed=seed, spec=spec)
    # Shuffle the rows: the filter must not rely on the file listing an image's boxes together.
    frame = pd.read_csv(bbox, dtype={"ImageID": str}).sample(frac=1.0, random_state=seed)
    frame.to_csv(bbox, index=False, float_format="%.6f")
    expected = reference_filter(frame, dict(zip(class_list.mids, class_list.names)), policy)
    config = FilterConfig(out=str(tmp_path / "out"), bbox=str(bbox), classes=str(classes_csv),
                          rules=FilterRules(duplicates=policy))
    report = run_filter(config)
    got = set(zip(report.candidates.image_id, report.candidates.label_mid))
    assert len(expected) > 100
    assert got == expected
    steps = list(report.funnel["after"].values())
    assert steps == sorted(steps, reverse=True)
    assert sum(report.funnel["dropped"].values()) == report.funnel["after"]["candidates"] - len(got)
    candidates = report.candidates
    assert np.allclose(candidates.area, (candidates.xmax - candidates.xmin) * (candidates.ymax - candidates.ymin))
