"""What a filter run writes: the candidate table, the funnel, the config; atomically."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import box_row, write_boxes
from subjectpairs.curation import candidates as candidates_module
from subjectpairs.curation.candidates import run_filter
from subjectpairs.curation.config import FilterConfig
from subjectpairs.curation.synthetic import write_images_csv


@pytest.fixture
def boxes(tmp_path, mid):
    return write_boxes(tmp_path / "boxes.csv", [
        box_row("ffff000000000002", mid("Cat"), xmin=0.123456, xmax=0.823456),
        box_row("0000000000000001", mid("Dog")),
        box_row("0000000000000001", mid("Cat")),
        box_row("0000000000000003", mid("Person")),
    ])


def test_candidate_table_columns_types_and_order(tmp_path, classes_csv, boxes):
    out = tmp_path / "out"
    run_filter(FilterConfig(out=str(out), bbox=str(boxes), classes=str(classes_csv)))
    table = pq.read_table(out / "candidates.parquet")
    for name in ("image_id", "label_mid", "category"):
        assert table.schema.field(name).type == pa.string()
    for name in ("xmin", "xmax", "ymin", "ymax", "area", "aspect"):
        assert table.schema.field(name).type == pa.float64()
    rows = table.to_pylist()
    assert [(r["image_id"], r["category"]) for r in rows] == [
        ("0000000000000001", "Cat"), ("0000000000000001", "Dog"), ("ffff000000000002", "Cat")]
    assert rows[2]["xmin"] == 0.123456 and rows[2]["xmax"] == 0.823456  # float64, as in the file
    funnel = json.loads((out / "funnel.json").read_text())
    assert funnel["after"]["candidates"] == 4 and funnel["kept"] == 3
    assert funnel["per_category"] == {"Cat": 2, "Dog": 1}


def test_config_yaml_reproduces_the_run(tmp_path, classes_csv, boxes):
    out = tmp_path / "out"
    first = run_filter(FilterConfig(out=str(out), bbox=str(boxes), classes=str(classes_csv)))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["rules"]["min_area"] == 0.3 and saved["rules"]["duplicates"] == "paper"
    saved["out"] = str(tmp_path / "again")
    again = run_filter(FilterConfig.model_validate(saved))
    assert again.candidates.equals(first.candidates)


def test_failed_run_leaves_no_partial_output_and_keeps_the_previous_one(tmp_path, classes_csv, boxes, monkeypatch):
    out = tmp_path / "out"
    run_filter(FilterConfig(out=str(out), bbox=str(boxes), classes=str(classes_csv)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_yaml(config, command):
        raise RuntimeError("disk full")

    monkeypatch.setattr(candidates_module, "config_yaml", broken_yaml)
    with pytest.raises(RuntimeError):
        run_filter(FilterConfig(out=str(out), bbox=str(boxes), classes=str(classes_csv),
                                rules={"min_area": 0.1}))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporaries, nothing half-new


def test_image_list_adds_url_and_rotation_once_per_candidate(tmp_path, classes_csv, boxes):
    images = tmp_path / "images.csv"
    write_images_csv(images, ["0000000000000001", "ffff000000000002", "0000000000000001"])
    report = run_filter(FilterConfig(out=str(tmp_path / "out"), bbox=str(boxes), classes=str(classes_csv),
                                     images=str(images)))
    table = report.candidates
    assert len(table) == 3  # a repeated image row must not duplicate candidates
    assert table.url.tolist() == ["https://farm.example.org/0000000000000001.jpg"] * 2 + [
        "https://farm.example.org/ffff000000000002.jpg"]
    assert table.rotation.iloc[0] == 90.0
    assert report.funnel["images"]["duplicate_image_rows"] == 1
    columns = pq.read_schema(tmp_path / "out" / "candidates.parquet").names
    assert {"url", "rotation"} <= set(columns)


def test_image_list_of_another_subset_leaves_urls_empty(tmp_path, classes_csv, boxes):
    images = tmp_path / "images.csv"
    write_images_csv(images, ["0000000000000001", "ffff000000000002"], subset="validation")
    report = run_filter(FilterConfig(out=str(tmp_path / "out"), bbox=str(boxes), classes=str(classes_csv),
                                     images=str(images), split="train"))
    assert report.candidates.url.isna().all()
    assert report.funnel["images"]["without_url"] == 3


def test_zoo_layout(tmp_path, classes_csv, mid):
    split = tmp_path / "open-images-v6" / "validation"
    (split / "labels").mkdir(parents=True)
    (split / "metadata").mkdir()
    (split / "data").mkdir()
    write_boxes(split / "labels" / "detections.csv",
                [box_row("aaaa", mid("Cat")), box_row("bbbb", mid("Dog"))], train_format=False)
    (split / "metadata" / "classes.csv").write_bytes(classes_csv.read_bytes())
    write_images_csv(split / "metadata" / "image_ids.csv", ["aaaa", "bbbb"], subset="validation")
    (split / "data" / "aaaa.jpg").write_bytes(b"\xff\xd8")  # only one image was downloaded
    report = run_filter(FilterConfig(out=str(tmp_path / "out"), zoo_dir=str(tmp_path / "open-images-v6"),
                                     split="validation"))
    assert report.candidates.image_id.tolist() == ["aaaa"]
    assert report.candidates.filepath.tolist() == [str(split / "data" / "aaaa.jpg")]
    assert report.candidates.url.tolist() == ["https://farm.example.org/aaaa.jpg"]
    assert report.funnel["dropped"]["image_file"] == 1


def test_config_needs_one_source():
    with pytest.raises(ValueError, match="zoo_dir, or both bbox and classes"):
        FilterConfig(out="x", bbox="b.csv")
    with pytest.raises(ValueError, match="min_area"):
        FilterConfig(out="x", bbox="b", classes="c", rules={"min_area": 0.9, "max_area": 0.8})
