"""Reading box files: both formats, compression, and bad input that names its file and line."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from conftest import box_row, write_boxes
from subjectpairs.curation.candidates import run_filter
from subjectpairs.curation.config import FilterConfig
from subjectpairs.curation.openimages import BlockColumn, dictionary_codes, read_boxes
from subjectpairs.errors import InputError


def config(tmp_path, bbox, classes_csv, **kwargs):
    return FilterConfig(out=str(tmp_path / "out"), bbox=str(bbox), classes=str(classes_csv), **kwargs)


def test_validation_format_without_click_columns(tmp_path, classes_csv, class_list, mid):
    bbox = write_boxes(tmp_path / "validation-annotations-bbox.csv",
                       [box_row("a", mid("Cat")), box_row("b", mid("Dog"), group=1)], train_format=False)
    assert "XClick1X" not in bbox.read_text().splitlines()[0]
    read = read_boxes(str(bbox), class_list)
    assert read.rows == 2 and len(read.boxes) == 2
    assert read.boxes.is_group.tolist() == [False, True]


def test_gzip_input(tmp_path, classes_csv, mid):
    plain = write_boxes(tmp_path / "boxes.csv", [box_row("a", mid("Cat"))])
    packed = tmp_path / "boxes.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    report = run_filter(config(tmp_path, packed, classes_csv))
    assert report.candidates.image_id.tolist() == ["a"]


def test_missing_column_names_the_file_and_the_column(tmp_path, classes_csv, mid):
    bbox = tmp_path / "boxes.csv"
    bbox.write_text(f"ImageID,LabelName,XMin,XMax,YMin,IsGroupOf,IsInside\na,{mid('Cat')},0,1,0,0,0\n")
    with pytest.raises(InputError, match=r"boxes\.csv, line 1: missing required column\(s\) YMax"):
        run_filter(config(tmp_path, bbox, classes_csv))


def test_empty_file(tmp_path, classes_csv):
    bbox = tmp_path / "boxes.csv"
    bbox.write_text("")
    with pytest.raises(InputError, match="empty"):
        run_filter(config(tmp_path, bbox, classes_csv))


@pytest.mark.parametrize("bad,line_text", [
    (dict(XMin="abc"), "non-numeric XMin 'abc'"),
    (dict(XMin=0.5, XMax=0.5), "XMax <= XMin"),
    (dict(YMin=0.6, YMax=0.2), "YMax <= YMin"),
    (dict(XMax=1.5), "XMax outside"),
    (dict(LabelName="/m/notaclass"), "LabelName is not a MID of the class file"),
    (dict(IsGroupOf=7), "IsGroupOf is not -1, 0 or 1"),
    (dict(IsInside=-128), "IsInside is not -1, 0 or 1"),
    (dict(ImageID="../../etc"), "ImageID is not valid"),
    (dict(ImageID="0123456789abcdef.jpg"), "ImageID is not valid"),
    (dict(ImageID="caf\u00e9"), "ImageID is not valid"),
    (dict(LabelName="/m/../0bt9lr"), "LabelName is not a valid MID"),
    (dict(IsInside="yes"), "non-numeric IsInside 'yes'"),
    (dict(XMin=""), "missing XMin"),
])
def test_bad_row_is_an_error_naming_file_and_line(tmp_path, classes_csv, mid, bad, line_text):
    rows = [box_row("a", mid("Cat")), box_row("b", mid("Dog")), box_row("c", mid("Cat")) | bad]
    bbox = write_boxes(tmp_path / "boxes.csv", rows)
    with pytest.raises(InputError) as caught:
        run_filter(config(tmp_path, bbox, classes_csv))
    message = str(caught.value)
    assert message.startswith(f"{bbox}, line 4: ")
    assert line_text in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_wrong_field_count_names_the_line(tmp_path, classes_csv, mid):
    bbox = write_boxes(tmp_path / "boxes.csv", [box_row("a", mid("Cat")), box_row("b", mid("Cat"))])
    lines = bbox.read_text().splitlines()
    lines.insert(2, "truncated,row")
    bbox.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"line 3: expected 21 fields, got 2"):
        run_filter(config(tmp_path, bbox, classes_csv))


def test_skip_records_every_bad_row_and_keeps_the_rest(tmp_path, classes_csv, mid):
    rows = [
        box_row("good1", mid("Cat")),
        box_row("bad1", mid("Cat"), XMin="x"),  # line 3
        box_row("good2", mid("Dog")),
        box_row("bad2", mid("Dog"), XMin=0.9, XMax=0.1),  # line 5
        box_row("bad3", "/m/zzz"),  # line 6
        box_row("good3", mid("Car")),
    ]
    bbox = write_boxes(tmp_path / "boxes.csv", rows)
    text = bbox.read_text().splitlines()
    text.insert(7, "")  # line 8: an empty line inside the file is a bad row too, not silently skipped
    text.insert(8, "short,row")  # line 9
    bbox.write_text("\n".join(text) + "\n")
    report = run_filter(config(tmp_path, bbox, classes_csv, on_bad_rows="skip"))
    assert set(report.candidates.image_id) == {"good1", "good2", "good3"}
    bad = pd.read_csv(tmp_path / "out" / "bad_rows.csv", keep_default_na=False)
    assert bad.line.tolist() == [3, 5, 6, 8, 9]
    assert bad.reason.tolist() == ["non-numeric XMin 'x'", "XMax <= XMin", "LabelName is not a MID of the class file",
                                   "missing ImageID", "expected 21 fields, got 2"]
    assert bad.ImageID.tolist()[:3] == ["bad1", "bad2", "bad3"]
    assert report.funnel["rows"] == 8 and report.funnel["bad_rows"] == 5 and report.funnel["boxes"] == 3


def test_skip_on_a_clean_file_writes_an_empty_bad_rows_table(tmp_path, classes_csv, mid):
    bbox = write_boxes(tmp_path / "boxes.csv", [box_row("a", mid("Cat"))])
    run_filter(config(tmp_path, bbox, classes_csv, on_bad_rows="skip"))
    bad = pd.read_csv(tmp_path / "out" / "bad_rows.csv")
    assert len(bad) == 0 and list(bad.columns)[:2] == ["line", "reason"]


def _blocks(*blocks):
    return pa.chunked_array([pa.array(block, pa.string()).dictionary_encode() for block in blocks])


@pytest.mark.parametrize("blocks", [
    (["a", "a", "b"], ["b", "c"], ["d"]),  # sorted, one value across a block boundary: the fast path
    (["b", "a"], ["c"]),  # unsorted inside a block
    (["c", "d"], ["a", "c"]),  # unsorted across blocks, a value repeated far apart
    (["a"], [], ["a", "a"]),
])
def test_dictionary_codes_agree_with_the_values(blocks):
    codes, values = dictionary_codes(_blocks(*blocks))
    flat = [v for block in blocks for v in block]
    assert values.take(pa.array(codes)).to_pylist() == flat
    assert len(set(values.to_pylist())) == len(values)  # one code per distinct value


def test_bom_and_windows_line_endings(tmp_path, classes_csv, mid):
    plain = write_boxes(tmp_path / "boxes.csv", [box_row("a", mid("Cat")), box_row("b", mid("Dog"), XMax="x")])
    windows = tmp_path / "windows.csv"
    windows.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes().replace(b"\n", b"\r\n"))
    with pytest.raises(InputError, match=r"line 3: non-numeric XMax 'x'"):
        run_filter(config(tmp_path, windows, classes_csv))
    report = run_filter(config(tmp_path, windows, classes_csv, on_bad_rows="skip"))
    assert report.candidates.image_id.tolist() == ["a"]


def test_block_column_take_and_map_match_a_concatenated_array():
    rng = np.random.default_rng(0)
    blocks = [rng.random(n) for n in (5, 1, 7, 3)]
    column = BlockColumn(pa.chunked_array([pa.array(b) for b in blocks] + [pa.array([None, 0.5])]), np.nan)
    flat = np.concatenate(blocks + [np.array([np.nan, 0.5])])
    rows = rng.integers(0, len(flat), size=50)
    np.testing.assert_array_equal(column.take(rows), flat[rows])
    np.testing.assert_array_equal(column.map(lambda v: v > 0.5), flat > 0.5)
    assert len(column.take(np.zeros(0, np.int64))) == 0


def test_kept_boxes_keep_their_coordinates_when_bad_rows_are_skipped(tmp_path, classes_csv, mid):
    rows = [box_row("bad", mid("Cat"), XMin="?"), box_row("good", mid("Cat"), xmin=0.11, xmax=0.77, ymin=0.22,
                                                            ymax=0.88)]
    bbox = write_boxes(tmp_path / "boxes.csv", rows)
    report = run_filter(config(tmp_path, bbox, classes_csv, on_bad_rows="skip"))
    assert report.candidates[["xmin", "xmax", "ymin", "ymax"]].values.tolist() == [[0.11, 0.77, 0.22, 0.88]]


def test_empty_flags_are_unknown_and_show_empty_in_bad_rows(tmp_path, classes_csv, mid):
    rows = [box_row("a", mid("Cat"), IsGroupOf="", IsInside=""),
            box_row("b", mid("Cat"), XMin="?", IsGroupOf="")]
    bbox = write_boxes(tmp_path / "boxes.csv", rows)
    report = run_filter(config(tmp_path, bbox, classes_csv, on_bad_rows="skip"))
    assert report.candidates.image_id.tolist() == ["a"]
    bad = pd.read_csv(tmp_path / "out" / "bad_rows.csv", keep_default_na=False, dtype=str)
    assert bad.IsGroupOf.tolist() == [""] and bad.IsInside.tolist() == ["0"]


@pytest.mark.parametrize("line_end,blank_lines", [(b"\n", 1), (b"\n", 3), (b"\r\n", 2)])
@pytest.mark.parametrize("bad_value", [None, "x"])  # None: the typed read; "x": the line-by-line read
def test_blank_lines_that_end_the_file_are_not_rows(tmp_path, class_list, mid, line_end, blank_lines,
                                                    bad_value):
    second = box_row("b", mid("Dog"), **({} if bad_value is None else {"XMin": bad_value}))
    rows = [box_row("a", mid("Cat")), second]
    bbox = write_boxes(tmp_path / "boxes.csv", rows)
    bbox.write_bytes(bbox.read_bytes().replace(b"\n", line_end) + line_end * blank_lines)
    read = read_boxes(str(bbox), class_list, "skip")
    assert read.rows == 2
    assert read.bad_rows.line.tolist() == ([] if bad_value is None else [3])


def test_header_only_file_without_a_line_break_has_no_rows(tmp_path, classes_csv, mid):
    bbox = write_boxes(tmp_path / "boxes.csv", [])
    bbox.write_text(bbox.read_text().rstrip("\n"))
    images = tmp_path / "images.csv"
    images.write_text("ImageID,Subset,OriginalURL,Rotation")
    report = run_filter(config(tmp_path, bbox, classes_csv, images=str(images)))
    assert report.funnel["rows"] == 0 and len(report.candidates) == 0


def test_bad_utf8_is_a_bad_row_with_its_line(tmp_path, classes_csv, mid):
    bbox = write_boxes(tmp_path / "boxes.csv", [box_row("a", mid("Cat")), box_row("b", mid("Dog"))])
    bbox.write_bytes(bbox.read_bytes().replace(b"\nb,", b"\nb\xff,"))
    report = run_filter(config(tmp_path, bbox, classes_csv, on_bad_rows="skip"))
    assert report.candidates.image_id.tolist() == ["a"]
    bad = pd.read_csv(tmp_path / "out" / "bad_rows.csv", keep_default_na=False)
    assert bad[["line", "reason", "ImageID"]].values.tolist() == [[3, "ImageID is not UTF-8 text", "b\ufffd"]]
