"""Background pools: scene selection on OpenImages-format boxes, folder checks, determinism, build use."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from conftest import box_row, write_boxes
from subjectpairs.cli import app
from subjectpairs.curation.config import BackgroundConfig
from subjectpairs.curation.backgrounds import POOL_FILE, build_pool, read_pool
from subjectpairs.errors import InputError
from subjectpairs.pipelines.composite import BackgroundPool


def image_id(number: int) -> str:
    return f"{number:016x}"


@pytest.fixture
def openimages(tmp_path, mid):
    """Scenes of three types in unequal numbers, and one image per drop rule."""
    rows, expected = [], {}
    scenes = [("Building", 6), ("Tower", 2), ("House", 1)]
    number = 0
    for scene, copies in scenes:
        for _ in range(copies):
            rows += [box_row(image_id(number), mid(scene), 0.0, 0.9, 0.0, 0.8),
                     box_row(image_id(number), mid("Ball"), 0.1, 0.2, 0.1, 0.2)]
            expected[image_id(number)] = scene
            number += 1
    drops = {
        "large_object": [box_row(image_id(100), mid("Dog"), 0.1, 0.8, 0.1, 0.9)],
        "human": [box_row(image_id(101), mid("Building"), 0.0, 1.0, 0.0, 1.0),
                  box_row(image_id(101), mid("Person"), 0.4, 0.5, 0.4, 0.6)],
        "too_many_boxes": [box_row(image_id(102), mid("Ball"), 0.01 * k, 0.01 * k + 0.05, 0.1, 0.15)
                           for k in range(8)],
        "subject_candidate": [box_row(image_id(103), mid("House"), 0.0, 1.0, 0.0, 1.0)],
    }
    for drop_rows in drops.values():
        rows += drop_rows
    filler = image_id(200)  # two small objects and no scene class: used only after the scenes
    rows += [box_row(filler, mid("Ball"), 0.1, 0.2, 0.1, 0.2), box_row(filler, mid("Bottle"), 0.5, 0.6, 0.5, 0.7)]
    bbox = write_boxes(tmp_path / "boxes.csv", rows)
    candidates = tmp_path / "candidates.parquet"
    pd.DataFrame({"image_id": [image_id(103)]}).to_parquet(candidates)
    return bbox, candidates, expected, filler, drops


def pool_of(tmp_path, classes_csv, openimages, **settings):
    bbox, candidates, *_ = openimages
    config = BackgroundConfig(bbox=str(bbox), classes=str(classes_csv), image_root="s3://bucket/images",
                              exclude_candidates=str(candidates), out=str(tmp_path / "pool"), **settings)
    return build_pool(config)


def test_scenes_are_kept_object_shots_humans_clutter_and_subjects_dropped(tmp_path, classes_csv, openimages):
    _, _, expected, filler, drops = openimages
    report = pool_of(tmp_path, classes_csv, openimages, count=100)
    assert report.funnel["dropped"] == {rule: 1 for rule in ("subject_candidate", "human", "too_many_boxes",
                                                             "large_object")}
    pool = pd.read_parquet(tmp_path / "pool" / POOL_FILE)
    assert set(pool["id"]) == set(expected) | {filler}
    assert {i: s if isinstance(s, str) else None for i, s in zip(pool["id"], pool["scene"])} == \
        {**expected, filler: None}
    assert pool["id"].iloc[-1] == filler  # scenes first
    assert pool["uri"].tolist() == [f"s3://bucket/images/{i}.jpg" for i in pool["id"]]
    assert all(reason.startswith("scene:") for reason in pool["reasons"][:-1])


def test_selection_is_balanced_across_scene_types(tmp_path, classes_csv, openimages):
    report = pool_of(tmp_path, classes_csv, openimages, count=3)
    assert sorted(report.pool["scene"]) == ["Building", "House", "Tower"]
    five = pool_of(tmp_path, classes_csv, openimages, count=5).pool
    assert five["scene"].value_counts().to_dict() == {"Building": 2, "Tower": 2, "House": 1}


def test_same_seed_same_pool_bytes(tmp_path, classes_csv, openimages):
    first = pool_of(tmp_path / "a", classes_csv, openimages, count=4, seed=3)
    again = pool_of(tmp_path / "b", classes_csv, openimages, count=4, seed=3)
    assert (tmp_path / "a" / "pool" / POOL_FILE).read_bytes() == (tmp_path / "b" / "pool" / POOL_FILE).read_bytes()
    assert first.funnel["pool_id"] == again.funnel["pool_id"]
    orders = {tuple(pool_of(tmp_path / f"s{seed}", classes_csv, openimages, count=9, seed=seed).pool["id"])
              for seed in range(4)}
    assert len(orders) > 1  # the seed decides the order within each scene type


def _jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_folder_mode_checks_decoding_size_and_duplicates(tmp_path):
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    brick = np.asarray(Image.fromarray(data.brick()).convert("RGB").resize((600, 600)))
    grass = np.asarray(Image.fromarray(data.grass()).convert("RGB").resize((640, 560)))
    (folder / "brick.jpg").write_bytes(_jpeg(brick))
    (folder / "sub" / "brick-again.jpg").write_bytes(_jpeg(brick))  # the same bytes
    (folder / "brick-recompressed.jpg").write_bytes(_jpeg(brick, quality=70))  # a near-duplicate
    (folder / "grass.jpg").write_bytes(_jpeg(grass))
    (folder / "corrupt.jpg").write_bytes(_jpeg(grass)[:2000])
    (folder / "tiny.jpg").write_bytes(_jpeg(grass[:100, :100]))
    (folder / "notes.txt").write_text("not an image")
    report = build_pool(BackgroundConfig(folder=str(folder), out=str(tmp_path / "pool"), near_duplicate_bits=6))
    assert report.funnel["dropped"] == {"duplicate": 1, "near_duplicate": 1, "decode_error": 1, "too_small": 1}
    kept = sorted(p.rsplit("/", 1)[-1] for p in report.pool["uri"])
    assert len(kept) == 2 and kept[0].startswith("brick") and kept[1] == "grass.jpg"  # one brick of three
    assert set(report.pool["width"]) == {600, 640}
    rejects = pd.read_csv(tmp_path / "pool" / "rejects.csv")
    assert set(rejects["reason"]) == {"duplicate", "near_duplicate", "decode_error", "too_small"}
    plain = build_pool(BackgroundConfig(folder=str(folder), out=str(tmp_path / "plain")))
    assert len(plain.pool) == 3  # without near-duplicate removal the recompressed copy stays


def test_the_build_uses_a_pool_and_records_its_id(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("brick", "grass", "gravel"):
        (folder / f"{name}.jpg").write_bytes(_jpeg(np.asarray(Image.fromarray(getattr(data, name)())
                                                              .convert("RGB").resize((512, 512)))))
    result = CliRunner().invoke(app, ["backgrounds", "--from-folder", str(folder), "--out", str(tmp_path / "pool")])
    assert result.exit_code == 0, result.output
    pool_id, uris = read_pool(str(tmp_path / "pool"))
    assert json.loads((tmp_path / "pool" / "funnel.json").read_text())["pool_id"] == pool_id
    backgrounds = BackgroundPool.from_entries([str(tmp_path / "pool")])
    assert backgrounds.pool_id == pool_id and sorted(backgrounds.uris) == sorted(uris)


def test_an_openimages_pool_needs_image_locations(tmp_path, classes_csv, openimages):
    bbox, *_ = openimages
    result = CliRunner().invoke(app, ["backgrounds", "--from-openimages", "--bbox", str(bbox), "--classes",
                                      str(classes_csv), "--out", str(tmp_path / "pool")])
    assert result.exit_code == 2 and "--image-root" in result.output


def test_a_table_that_is_not_parquet_is_one_line_naming_it(tmp_path, classes_csv, openimages):
    bbox, candidates, *_ = openimages
    candidates.write_bytes(b"PAR1 but not really")
    result = CliRunner().invoke(app, ["backgrounds", "--from-openimages", "--bbox", str(bbox), "--classes",
                                      str(classes_csv), "--image-root", "s3://bucket/images", "--exclude-candidates",
                                      str(candidates), "--out", str(tmp_path / "pool")])
    assert result.exit_code == 2 and f"{candidates}: cannot read the candidates table" in result.output
    pool = tmp_path / "broken-pool"
    pool.mkdir()
    (pool / POOL_FILE).write_bytes(b"not parquet")
    with pytest.raises(InputError, match="cannot read the background pool"):
        read_pool(str(pool))
