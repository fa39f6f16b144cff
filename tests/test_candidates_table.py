"""The candidates table the build reads: identifiers that become file and member names, column types, one
clear line for a bad row (no Ray: the driver checks the table before it starts)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from subjectpairs.corpus.layout import sample_key
from subjectpairs.corpus.writer import ChunkWriter
from subjectpairs.errors import InputError
from subjectpairs.identifiers import is_sample_key
from subjectpairs.pipelines.shards import load_candidates

GOOD = {"image_id": "000a1249af2bc5f0", "label_mid": "/m/01yrx", "category": "Cat",
        "xmin": 0.1, "xmax": 0.9, "ymin": 0.1, "ymax": 0.9}


def schema_with(column: str, arrow_type: pa.DataType) -> pa.Schema:
    """The candidates schema with ``column`` of ``arrow_type``."""
    return pa.schema([(name, arrow_type if name == column else pa.string() if isinstance(GOOD[name], str)
                       else pa.float64()) for name in GOOD])


def write_table(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def test_good_rows_load_with_their_keys_and_photos_under_images(tmp_path):
    rows = [GOOD, {**GOOD, "image_id": "scene-01_x", "label_mid": "/g/11b6p5x2d"}]
    candidates = load_candidates(write_table(tmp_path / "c.parquet", rows), str(tmp_path / "images"))
    assert [c.key for c in candidates] == ["000a1249af2bc5f0_01yrx", "scene-01_x_-g-11b6p5x2d"]
    assert candidates[0].photo_uri.endswith("images/000a1249af2bc5f0.jpg")


@pytest.mark.parametrize("column, value, message", [
    ("image_id", "../../etc/passwd", r"row 2: ImageID '../../etc/passwd' is not valid"),
    ("image_id", "/abs/x", r"row 2: ImageID '/abs/x' is not valid"),
    ("image_id", "a.b", r"row 2: ImageID 'a.b' is not valid"),
    ("label_mid", "/m/../x", r"row 2: label MID '/m/../x' is not valid"),
    ("label_mid", "/m/a.b", r"row 2: label MID '/m/a.b' is not valid"),
])
def test_an_identifier_outside_its_grammar_is_one_line_naming_the_row(tmp_path, column, value, message):
    uri = write_table(tmp_path / "c.parquet", [GOOD, {**GOOD, column: value}])
    with pytest.raises(InputError, match=message) as raised:
        load_candidates(uri, str(tmp_path / "images"))
    assert str(raised.value).startswith(uri) and "\n" not in str(raised.value)


def test_an_id_and_mid_too_long_together_for_a_key_are_refused(tmp_path):
    long_pair = {**GOOD, "image_id": "a" * 128, "label_mid": "/m/" + "b" * 120}
    with pytest.raises(InputError, match=r"sample key 'a{128}_b{120}' is not valid \(1-200"):
        load_candidates(write_table(tmp_path / "c.parquet", [long_pair]), str(tmp_path / "images"))


@pytest.mark.parametrize("image_id, label_mid",
                         [("../x", "/m/01yrx"), ("a", "/m/a.b"), ("a" * 150, "/m/" + "b" * 60)])
def test_sample_key_never_makes_an_invalid_key(image_id, label_mid):
    with pytest.raises(ValueError, match="sample key"):
        sample_key(image_id, label_mid)


def test_sample_keys_follow_the_grammar():
    for image_id, mid in (("000a1249af2bc5f0", "/m/0bt9lr"), ("scene_1", "/g/11b6p5x2d"), ("x", "custom")):
        assert is_sample_key(sample_key(image_id, mid))


@pytest.mark.parametrize("column, values, arrow_type, message", [
    ("xmin", ["0.1", "0.2"], pa.string(), r"row 1: xmin is '0.1', not a number"),
    ("ymax", [None, "x"], pa.string(), r"row 2: ymax is 'x', not a number"),
    ("xmin", [True, False], pa.bool_(), r"row 1: xmin is True, not a number"),
    ("category", ["Cat", None], pa.string(), r"row 2: category is null, not text"),
    ("category", ["Cat", ""], pa.string(), r"row 2: category is '', not text"),
    ("image_id", [None, "a"], pa.string(), r"row 1: image_id is null, not text"),
    ("label_mid", [1, 2], pa.int64(), r"row 1: label_mid is 1, not text"),
])
def test_a_wrong_type_or_null_is_one_line_naming_column_and_row(tmp_path, column, values, arrow_type,
                                                                message):
    rows = [{**GOOD, "image_id": f"{index:016x}", column: value} for index, value in enumerate(values)]
    with pytest.raises(InputError, match=message):
        load_candidates(write_table(tmp_path / "c.parquet", rows, schema_with(column, arrow_type)),
                        str(tmp_path / "images"))


@pytest.mark.parametrize("arrow_type, values", [(pa.float64(), [0.1, None]), (pa.null(), [None, None])])
def test_a_null_coordinate_stays_that_pairs_bad_box(tmp_path, arrow_type, values):
    """NaN reaches the box check, which rejects that pair; a pair with a box is built."""
    from subjectpairs.pipelines.rejections import PairRejected

    rows = [{**GOOD, "image_id": f"{index:016x}", "xmin": value} for index, value in enumerate(values)]
    candidates = load_candidates(write_table(tmp_path / "c.parquet", rows, schema_with("xmin", arrow_type)),
                                 str(tmp_path / "images"))
    for candidate, value in zip(candidates, values):
        if value is None:
            with pytest.raises(PairRejected, match="not a number"):
                candidate.box.checked()
        else:
            assert candidate.box.checked().xmin == pytest.approx(value)


@pytest.mark.parametrize("key", ["../../x", "/abs/x", "a.b", ""])
def test_the_shard_writer_refuses_a_key_outside_the_grammar(tmp_path, key):
    writer = ChunkWriter(str(tmp_path / "out"), 0, 1 << 20)
    try:
        writer.write("000a1249af2bc5f0_01yrx", {"json": b"{}"})
        with pytest.raises(ValueError, match="sample key"):
            writer.write(key, {"json": b"{}"})
        (shard,) = writer.publish()
    finally:
        writer.close()
    with tarfile.open(tmp_path / "out" / shard.name) as tar:
        assert tar.getnames() == ["000a1249af2bc5f0_01yrx.json"]
