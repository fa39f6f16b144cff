"""Reading OpenImages-V6 box files fast, and telling exactly where they are wrong.

The train file has 14.6M rows and 21 columns (2.2 GB). The fast path reads only the eight columns the
filter needs with pyarrow's multi-threaded CSV reader, typed at parse time, with the id columns
dictionary-encoded so that grouping works on small integers. Empty lines are kept as rows so that row
``i`` is always line ``i + 2`` of the file (after the header), which lets every later check name its line;
only the empty lines that end the file are not rows.

ImageIDs and label MIDs are checked against their grammars (subjectpairs.identifiers) once per distinct
value, with RE2 on the column's dictionary, so the check costs little even on the train file.

When the fast read fails (a non-numeric value, a row with the wrong number of fields), the file is read
again serially with every column as text, so that each bad value can be reported with its line instead of
pyarrow's first error only. That path is slower, but it only runs on files that are already broken.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from subjectpairs.curation.classes import ClassList
from subjectpairs.errors import InputError
from subjectpairs.identifiers import IMAGE_ID, LABEL_MID, MAX_LABEL_MID
from subjectpairs.storage import reading

COORDINATES = ("XMin", "XMax", "YMin", "YMax")
FLAGS = ("IsGroupOf", "IsInside")
REQUIRED_BOX_COLUMNS = ("ImageID", "LabelName", *COORDINATES, *FLAGS)
_BLOCK_SIZE = 4 << 20
_FLOAT_PATTERN = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
_INT_PATTERN = r"^\s*[+-]?\d+\s*$"


class BlockColumn:
    """A numeric column left in the CSV reader's blocks, seen through zero-copy numpy views.

    Concatenating four float64 columns of the train file would write 470 MB only to read most of it once;
    checks run block by block instead, and ``take`` gathers the few rows that later stages need.
    """

    def __init__(self, column: pa.ChunkedArray, fill: float):
        self.blocks = [
            (chunk.fill_null(fill) if chunk.null_count else chunk).to_numpy(zero_copy_only=False)
            for chunk in column.chunks if len(chunk)
        ]
        self.starts = np.cumsum([0] + [len(block) for block in self.blocks])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def map(self, function: Callable[[np.ndarray], np.ndarray], dtype: type = bool) -> np.ndarray:
        out = np.empty(len(self), dtype=dtype)
        for start, block in zip(self.starts, self.blocks):
            out[start:start + len(block)] = function(block)
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        dtype = self.blocks[0].dtype if self.blocks else np.float64
        out = np.empty(len(rows), dtype=dtype)
        block_of_row = np.searchsorted(self.starts, rows, side="right") - 1
        # Rows grouped by block with a radix sort (block numbers are small integers), then one numpy
        # gather per block.
        order = np.argsort(block_of_row.astype(np.int16 if len(self.blocks) < 2**15 else np.int64),
                           kind="stable")
        bounds = np.searchsorted(block_of_row[order], np.arange(len(self.blocks) + 1))
        for index, block in enumerate(self.blocks):
            picked = order[bounds[index]:bounds[index + 1]]
            if len(picked):
                out[picked] = block[rows[picked] - self.starts[index]]
        return out


@dataclass
class Boxes:
    """Valid boxes in file order: ids as integer codes, flags as booleans, corners kept in blocks."""

    image_codes: np.ndarray  # int32 index into image_ids
    image_ids: pa.Array  # distinct ImageIDs
    class_index: np.ndarray  # int32 index into the class list
    is_group: np.ndarray  # bool: IsGroupOf == 1 (unknown, -1 or empty, counts as not a group)
    is_inside: np.ndarray  # bool: IsInside == 1
    coordinates: dict[str, BlockColumn]  # XMin, XMax, YMin, YMax by file row
    file_row: np.ndarray | None = None  # file row of each valid box; None when every row is valid

    def __len__(self) -> int:
        return len(self.image_codes)

    def corners(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """xmin, xmax, ymin, ymax of the given boxes."""
        rows = boxes if self.file_row is None else self.file_row[boxes]
        xmin, xmax, ymin, ymax = (self.coordinates[name].take(rows) for name in COORDINATES)
        return xmin, xmax, ymin, ymax


@dataclass
class BoxRead:
    boxes: Boxes
    rows: int  # data rows in the file, bad ones included
    bad_rows: pd.DataFrame  # line, reason and the row's values as text


BAD_ROW_COLUMNS = ("line", "reason", *REQUIRED_BOX_COLUMNS)


@dataclass(frozen=True)
class CsvHeader:
    columns: list[str]
    header_only: bool  # no line break after the header: no rows, and a file pyarrow's reader refuses


def read_header(uri: str) -> CsvHeader:
    head_size = 1 << 16
    with reading(uri) as stream:
        head = stream.read(head_size)
    if not head:
        raise InputError(f"{uri}: the file is empty (expected a header line)")
    first_line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8-sig", errors="replace")
    return CsvHeader(columns=next(csv.reader(io.StringIO(first_line)), []),
                     header_only=b"\n" not in head and len(head) < head_size)


def check_columns(uri: str, header: list[str], required: tuple[str, ...]) -> None:
    missing = [name for name in required if name not in header]
    if missing:
        raise InputError(
            f"{uri}, line 1: missing required column(s) {', '.join(missing)}; "
            f"the header has {', '.join(header) or 'nothing'}"
        )


def read_boxes(uri: str, classes: ClassList, on_bad_rows: str = "error") -> BoxRead:
    """Read a box file (train, validation or test format) into validated arrays.

    ``on_bad_rows="error"`` raises :class:`InputError` naming the first bad line; ``"skip"`` drops bad
    rows and returns them with their reasons.
    """
    header = read_header(uri)
    check_columns(uri, header.columns, REQUIRED_BOX_COLUMNS)
    try:
        table = _BOX_SCHEMA.empty_table() if header.header_only else _read_typed(uri)
        lines = None
        parse_reasons = None
    except pa.ArrowInvalid:
        table, lines, parse_reasons, invalid = _read_as_text(uri)
    else:
        invalid = pd.DataFrame(columns=list(BAD_ROW_COLUMNS))

    n_rows = table.num_rows + len(invalid)
    # The id columns become integer codes and leave the table; the numeric columns stay in the reader's
    # blocks (BlockColumn), so the peak stays near the size of the parsed table.
    image_codes, image_ids = dictionary_codes(table.column("ImageID"))
    label_codes, labels = dictionary_codes(table.column("LabelName"))
    table = table.drop_columns(["ImageID", "LabelName"])
    coordinates = {name: BlockColumn(table.column(name), np.nan) for name in COORDINATES}
    # An empty flag is unknown, as -1 is.
    flags = {name: BlockColumn(table.column(name), -1) for name in FLAGS}
    label_to_class = pc.index_in(labels, value_set=pa.array(classes.mids, pa.string()))
    class_of_label = label_to_class.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    invalid_labels = _outside_grammar(labels, LABEL_MID, MAX_LABEL_MID)
    class_of_label[invalid_labels] = -1  # never a class, whatever class list was given
    class_index = class_of_label[label_codes] if len(labels) else np.full(len(label_codes), -1, np.int32)
    empty_ids = np.flatnonzero(pc.equal(pc.utf8_length(image_ids), 0).to_numpy(zero_copy_only=False))
    invalid_ids = _outside_grammar(image_ids, IMAGE_ID, None)  # the empty one included

    # One fused pass per block decides whether anything is wrong (comparisons with NaN are false, so
    # missing values fail it too); the per-reason checks below only run on files that have bad rows.
    good = coordinates["XMin"].map(lambda v: v >= 0)
    good &= coordinates["YMin"].map(lambda v: v >= 0)
    good &= coordinates["XMax"].map(lambda v: v <= 1)
    good &= coordinates["YMax"].map(lambda v: v <= 1)
    for low, high in (("XMin", "XMax"), ("YMin", "YMax")):
        for start, lo, hi in zip(coordinates[low].starts, coordinates[low].blocks, coordinates[high].blocks):
            good[start:start + len(lo)] &= hi > lo
    good &= class_index >= 0
    if len(invalid_ids) or (image_codes < 0).any():
        good &= (image_codes >= 0) & ~np.isin(image_codes, invalid_ids)
    for name in FLAGS:
        good &= flags[name].map(lambda v: (v >= -1) & (v <= 1))
    if parse_reasons is not None:
        good &= parse_reasons == ""

    bad_frame = invalid
    all_good = bool(good.all())
    if not all_good or len(invalid):
        values = {name: column.map(lambda v: v, np.float64) for name, column in coordinates.items()}
        values.update({name: column.map(lambda v: v, np.int16) for name, column in flags.items()})
        for name in FLAGS:
            values[name][pc.is_null(table.column(name)).to_numpy(zero_copy_only=False)] = _EMPTY_FLAG
        xmin, xmax, ymin, ymax = (values[name] for name in COORDINATES)
        checks: list[tuple[str, Callable[[], np.ndarray]]] = []
        if parse_reasons is not None:
            checks.append(("", lambda: parse_reasons != ""))
        checks += [
            ("missing ImageID", lambda: (image_codes < 0) | np.isin(image_codes, empty_ids)),
            (_INVALID_IMAGE_ID, lambda: np.isin(image_codes, invalid_ids)),
            (_INVALID_LABEL, lambda: np.isin(label_codes, invalid_labels)),
            ("LabelName is not a MID of the class file", lambda: class_index < 0),
        ]
        checks += [(f"missing {name}", lambda v=values[name]: np.isnan(v)) for name in COORDINATES]
        checks += [(f"{name} outside [0, 1]", lambda v=values[name]: (v < 0) | (v > 1)) for name in COORDINATES]
        checks += [("XMax <= XMin", lambda: xmax <= xmin), ("YMax <= YMin", lambda: ymax <= ymin)]
        checks += [(f"{name} is not -1, 0 or 1", lambda v=values[name]: ~np.isin(v, (-1, 0, 1, _EMPTY_FLAG)))
                   for name in FLAGS]
        shown = {"ImageID": (image_ids, image_codes), "LabelName": (labels, label_codes)}
        bad_frame = _describe_bad_rows(~good, checks, parse_reasons, lines, invalid, shown, values)
        del values, xmin, xmax, ymin, ymax
        if on_bad_rows == "error":
            first = bad_frame.iloc[0]
            more = len(bad_frame) - 1
            raise InputError(
                f"{uri}, line {first['line']}: {first['reason']}"
                + (f" (and {more} more bad row(s))" if more else "")
                + "; use --on-bad-rows skip to record them in bad_rows.csv and go on"
            )
    keep = slice(None) if all_good else good  # a clean file needs no filtered copies
    boxes = Boxes(
        image_codes=image_codes[keep],
        image_ids=image_ids,
        class_index=class_index[keep],
        is_group=flags["IsGroupOf"].map(lambda v: v == 1)[keep],
        is_inside=flags["IsInside"].map(lambda v: v == 1)[keep],
        coordinates=coordinates,
        file_row=None if all_good else np.flatnonzero(good),
    )
    return BoxRead(boxes=boxes, rows=n_rows, bad_rows=bad_frame)


# Bad rows show an empty flag as empty; flags are int8 in the file, so this int16 value cannot come from it.
_EMPTY_FLAG = -1000
_INVALID_IMAGE_ID = "ImageID is not valid (16 hex digits, or 1-128 of A-Z a-z 0-9 _ -)"
_INVALID_LABEL = "LabelName is not a valid MID (/m/..., or /-separated A-Z a-z 0-9 _ -)"
_BOX_SCHEMA = pa.schema(
    [(name, pa.dictionary(pa.int32(), pa.string())) for name in ("ImageID", "LabelName")]
    + [(name, pa.float64()) for name in COORDINATES] + [(name, pa.int8()) for name in FLAGS]
)


def _outside_grammar(values: pa.Array, grammar: re.Pattern, max_length: int | None) -> np.ndarray:
    """Positions of the values that ``grammar`` does not match in full."""
    matched = pc.match_substring_regex(values, f"^(?:{grammar.pattern})$")
    if max_length is not None:
        matched = pc.and_(matched, pc.less_equal(pc.utf8_length(values), max_length))
    return np.flatnonzero(~matched.to_numpy(zero_copy_only=False).astype(bool))


def _read_typed(uri: str) -> pa.Table:
    with reading(uri) as stream:
        table = pacsv.read_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=_BLOCK_SIZE),
            parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                include_columns=list(REQUIRED_BOX_COLUMNS),
                column_types={field.name: field.type for field in _BOX_SCHEMA}, strings_can_be_null=False,
            ),
        )
    return table.slice(0, _rows_before_trailing_blank_lines(table))


def _rows_before_trailing_blank_lines(table: pa.Table) -> int:
    """Rows up to the last line that is not blank: an editor's or a concatenation's final empty lines are
    not rows. Looked at from the end, a slice at a time, so a clean file costs one small slice."""
    end = table.num_rows
    while end:
        start = max(0, end - 1024)
        tail = table.slice(start, end - start)
        blank = np.ones(tail.num_rows, dtype=bool)
        for column in tail.columns:
            if pa.types.is_dictionary(column.type):
                column = column.cast(column.type.value_type)
            if pa.types.is_string(column.type) or pa.types.is_binary(column.type):
                empty = pc.equal(pc.binary_length(column), 0).fill_null(True)
            else:
                empty = pc.is_null(column)
            blank &= empty.to_numpy(zero_copy_only=False)
        kept = np.flatnonzero(~blank)
        if len(kept):
            return start + int(kept[-1]) + 1
        end = start
    return 0


def _read_as_text(uri: str) -> tuple[pa.Table, np.ndarray, np.ndarray, pd.DataFrame]:
    """Serial read with every column as text: exact line numbers for every problem."""
    invalid_rows: list[tuple[int, str]] = []

    def record(row: pacsv.InvalidRow) -> str:
        invalid_rows.append((row.number, f"expected {row.expected_columns} fields, got {row.actual_columns}"))
        return "skip"

    with reading(uri) as stream:
        raw = pacsv.read_csv(
            stream,
            read_options=pacsv.ReadOptions(use_threads=False, block_size=_BLOCK_SIZE),
            parse_options=pacsv.ParseOptions(ignore_empty_lines=False, invalid_row_handler=record),
            convert_options=pacsv.ConvertOptions(
                include_columns=list(REQUIRED_BOX_COLUMNS),
                column_types={name: pa.binary() for name in REQUIRED_BOX_COLUMNS},  # decoded below, per value
                strings_can_be_null=False,
            ),
        )
    invalid_lines = np.array([line for line, _ in invalid_rows], dtype=np.int64)
    total = raw.num_rows + len(invalid_rows)
    lines = np.setdiff1d(np.arange(2, total + 2, dtype=np.int64), invalid_lines, assume_unique=True)
    # Blank lines end the file only when no line with the wrong field count comes after them.
    kept = _rows_before_trailing_blank_lines(raw)
    if len(invalid_lines):
        kept = max(kept, int(np.searchsorted(lines, invalid_lines.max())))
    raw, lines = raw.slice(0, kept), lines[:kept]

    reasons = np.full(raw.num_rows, "", dtype=object)
    columns: dict[str, pa.Array] = {}
    texts: dict[str, pa.ChunkedArray] = {}
    for name in REQUIRED_BOX_COLUMNS:
        texts[name], not_utf8 = _decode_utf8(raw.column(name))
        reasons[not_utf8 & (reasons == "")] = f"{name} is not UTF-8 text"
    columns["ImageID"], columns["LabelName"] = texts["ImageID"], texts["LabelName"]
    for name in (*COORDINATES, *FLAGS):
        text = texts[name]
        parsed = [_parse_numbers(chunk, name in FLAGS) for chunk in text.chunks]
        columns[name] = pa.chunked_array([values for values, _ in parsed],
                                         pa.int8() if name in FLAGS else pa.float64())
        bad = np.concatenate([mask for _, mask in parsed]) if parsed else np.zeros(0, bool)
        if bad.any():
            shown = np.asarray(text.to_numpy(zero_copy_only=False), dtype=object)
            for i in np.flatnonzero(bad & (reasons == "")):
                reasons[i] = f"non-numeric {name} {shown[i]!r}"
    invalid = pd.DataFrame(
        {"line": invalid_lines, "reason": [reason for _, reason in invalid_rows]},
        columns=list(BAD_ROW_COLUMNS),
    )
    return pa.table(columns), lines, reasons, invalid


def _decode_utf8(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Binary values as text; the mask marks values that are not UTF-8 (shown with replacement characters).

    A block that casts cleanly needs no per-value check; only a block with bad bytes is decoded one by one.
    """
    chunks, masks = [], []
    for chunk in column.chunks:
        try:
            chunks.append(chunk.cast(pa.string()))
            masks.append(np.zeros(len(chunk), dtype=bool))
            continue
        except pa.ArrowInvalid:
            pass
        raw_values = chunk.to_pylist()
        decoded = [value.decode("utf-8", errors="replace") for value in raw_values]
        masks.append(np.array([text.encode("utf-8") != value for text, value in zip(decoded, raw_values)]))
        chunks.append(pa.array(decoded, pa.string()))
    mask = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
    return pa.chunked_array(chunks, pa.string()), mask


def _parse_numbers(text: pa.Array, integer: bool) -> tuple[pa.Array, np.ndarray]:
    """Numbers from text, null where empty; the mask marks text that is not a number.

    A block that casts cleanly needs no per-value check; only a block with a bad value pays for the regex.
    """
    target = pa.int64() if integer else pa.float64()
    trimmed = pc.utf8_trim_whitespace(text)
    empty = pc.equal(trimmed, "")
    blanked = pc.if_else(empty, pa.scalar(None, pa.string()), trimmed)
    try:
        values = pc.cast(blanked, target)
        bad = np.zeros(len(text), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        well_formed = pc.match_substring_regex(blanked, _INT_PATTERN if integer else _FLOAT_PATTERN)
        bad = (~well_formed.fill_null(True).to_numpy(zero_copy_only=False)).astype(bool)
        values = pc.cast(pc.if_else(well_formed, blanked, pa.scalar(None, pa.string())), target)
    if integer:
        # Out-of-range integers must not wrap around in int8: clamp to a value the flag check rejects.
        values = pc.cast(pc.if_else(pc.or_(pc.less(values, -127), pc.greater(values, 127)),
                                    pa.scalar(127, pa.int64()), values), pa.int8())
    return values, bad


def dictionary_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Integer codes and distinct values of a string or dictionary column.

    The CSV reader dictionary-encodes each block on its own. When the file is sorted by this column, as
    the official OpenImages files are by ImageID, the concatenated block dictionaries are sorted too and
    codes follow from counting value changes, with no hashing; otherwise the block dictionaries (about
    1.7M strings for the train file, not 14.6M) are encoded once. Both beat ``unify_dictionaries``.
    """
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    chunks = [chunk for chunk in column.chunks if len(chunk)]
    if not chunks:
        return np.zeros(0, np.int32), pa.array([], pa.string())
    dictionaries = pa.concat_arrays([chunk.dictionary for chunk in chunks])
    if _sorted_blocks(chunks, dictionaries):
        is_new = np.ones(len(dictionaries), dtype=bool)
        is_new[1:] = pc.not_equal(dictionaries[1:], dictionaries[:-1]).to_numpy(zero_copy_only=False)
        global_code = np.cumsum(is_new, dtype=np.int32) - 1
        values = dictionaries.filter(pa.array(is_new))
    else:
        merged = pc.dictionary_encode(dictionaries)
        global_code = merged.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        values = merged.dictionary
    codes = np.empty(sum(len(chunk) for chunk in chunks), dtype=np.int32)
    row = dictionary_start = 0
    for chunk in chunks:
        block_codes = global_code[dictionary_start:dictionary_start + len(chunk.dictionary)]
        np.take(block_codes, chunk.indices.to_numpy(zero_copy_only=False), out=codes[row:row + len(chunk)])
        row += len(chunk)
        dictionary_start += len(chunk.dictionary)
    return codes, values


def _sorted_blocks(chunks: list[pa.DictionaryArray], dictionaries: pa.Array) -> bool:
    """True when the column is sorted: each block lists its values in order, and blocks follow each other."""
    if pc.any(pc.less(dictionaries[1:], dictionaries[:-1])).as_py():
        return False
    for chunk in chunks:
        # Indices count up in first-appearance order; sorted rows never step back to an earlier value.
        if len(chunk) > 1 and pc.any(pc.less(chunk.indices[1:], chunk.indices[:-1])).as_py():
            return False
    return True


def _describe_bad_rows(
    bad: np.ndarray,
    checks: list[tuple[str, Callable[[], np.ndarray]]],
    parse_reasons: np.ndarray | None,
    lines: np.ndarray | None,
    invalid: pd.DataFrame,
    dictionary_columns: dict[str, tuple[pa.Array, np.ndarray]],
    values: dict[str, np.ndarray],
) -> pd.DataFrame:
    """One row per bad line: the first failed check, and the row's values as text."""
    index = np.flatnonzero(bad)
    reasons = np.full(len(index), "", dtype=object)
    for reason, mask in checks:
        hit = mask()[index] & (reasons == "")
        if reason:
            reasons[hit] = reason
        elif parse_reasons is not None:
            reasons[hit] = parse_reasons[index[hit]]
    frame = pd.DataFrame({
        "line": (lines[index] if lines is not None else index + 2).astype(np.int64),
        "reason": reasons,
    })
    for name, (dictionary, codes) in dictionary_columns.items():
        picked = codes[index]
        text = dictionary.take(pa.array(np.maximum(picked, 0))).to_numpy(zero_copy_only=False)
        frame[name] = np.where(picked >= 0, text, "") if len(dictionary) else ""
    for name in COORDINATES:
        frame[name] = [("" if np.isnan(v) else repr(float(v))) for v in values[name][index]]
    for name in FLAGS:
        frame[name] = [("" if v == _EMPTY_FLAG else str(int(v))) for v in values[name][index]]
    frame = pd.concat([frame, invalid], ignore_index=True) if len(invalid) else frame
    return frame.sort_values("line", kind="stable").reset_index(drop=True)
