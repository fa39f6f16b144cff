"""Candidates in, shard plans out; pairs in, deterministic WebDataset tars out.

Shard membership is fixed by the sorted sample keys, never by scheduling: chunk ``i`` holds the keys at
positions ``[i * samples, (i + 1) * samples)``. A chunk becomes ``pairs-<i>.tar`` (and ``pairs-<i>-1.tar``,
... if its pairs exceed the byte cap). Tar members are sorted, with fixed mtime, owner and mode, so the same
pairs always give the same bytes.
"""

from __future__ import annotations

import io
import math
import numbers
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from subjectpairs import storage
from subjectpairs.corpus.layout import sample_key
from subjectpairs.errors import InputError
from subjectpairs.identifiers import check_image_id, check_label_mid
from subjectpairs.pipelines.boxes import Box
from subjectpairs.pipelines.rejections import Rejection

REJECT_SCHEMA = pa.schema([("key", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
                           ("detail", pa.string())])
# The candidates table's required columns
TEXT_COLUMNS = ("image_id", "label_mid", "category")
BOX_COLUMNS = ("xmin", "xmax", "ymin", "ymax")
# A pair a reviewer rejected (listed in an exclude file): not built, or removed by `shards compact`
REVIEW_STAGE = "review"
EXCLUDED_REASON = "excluded"


@dataclass(frozen=True)
class Candidate:
    key: str
    image_id: str
    label_mid: str
    category: str
    box: Box
    photo_uri: str
    # a photo from the url column is read only over HTTP(S) or from an object store, never from local files
    photo_from_url: bool = False


@dataclass(frozen=True)
class ChunkPlan:
    index: int
    candidates: tuple[Candidate, ...]

    @property
    def name(self) -> str:
        return f"chunk-{self.index:06d}"


def excluded_rejection(key: str, exclude: str) -> Rejection:
    """The reject row of a pair left out because ``exclude`` lists it."""
    return Rejection(key=key, stage=REVIEW_STAGE, reason=EXCLUDED_REASON, detail=f"listed in {exclude}")


def rejects_parquet(rejects: list[Rejection]) -> tuple[pd.DataFrame, bytes]:
    """``rejects.parquet``: one row per rejection, sorted by key; the table and the file's bytes."""
    rows = [{"key": r.key, "stage": r.stage, "reason": r.reason, "detail": r.detail}
            for r in sorted(rejects, key=lambda r: r.key)]
    table = pd.DataFrame(rows, columns=REJECT_SCHEMA.names)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(table, schema=REJECT_SCHEMA, preserve_index=False), buffer)
    return table, buffer.getvalue()


def _describe(value: object) -> str:
    return "null" if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) \
        else repr(value)


def _typed_columns(table: pd.DataFrame, uri: str) -> pd.DataFrame:
    """The table with float box columns, or InputError naming the column and row of the first value of
    the wrong type: the text columns hold non-empty strings, the box columns numbers. A null coordinate
    becomes NaN, that pair's ``bad_box`` rejection, like a box outside the image."""
    for column in TEXT_COLUMNS:
        for number, value in enumerate(table[column], start=1):
            if not isinstance(value, str) or not value:
                raise InputError(f"{uri}: row {number}: {column} is {_describe(value)}, not text")
    for column in BOX_COLUMNS:
        values = table[column]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            continue
        for number, value in enumerate(values, start=1):
            if not pd.isna(value) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise InputError(f"{uri}: row {number}: {column} is {_describe(value)}, not a number")
    return table.astype(dict.fromkeys(BOX_COLUMNS, "float64"))


def load_candidates(uri: str, images: str | None, limit: int | None = None) -> list[Candidate]:
    """The filter's candidates, sorted by key, each with the place its photo is read from.

    ``images`` (a folder or URI prefix of ``<ImageID>.jpg``) wins; otherwise the table's ``filepath``
    (a zoo folder), otherwise its ``url`` (HTTP(S) or an object store only).
    """
    table = storage.read_parquet(uri, "candidates table")
    missing = sorted({*TEXT_COLUMNS, *BOX_COLUMNS} - set(table.columns))
    if missing:
        raise InputError(f"{uri}: not a candidates table, missing columns {', '.join(missing)}")
    if images is None and "filepath" not in table.columns and "url" not in table.columns:
        raise InputError(f"{uri}: has neither filepath nor url; give --images (a folder or URI prefix)")
    table = _typed_columns(table, uri)
    candidates = []
    for number, row in enumerate(table.itertuples(index=False), start=1):
        try:  # before any name is built from them: <images>/<ImageID>.jpg, <key>.input.jpg
            check_image_id(row.image_id, f"row {number}")
            check_label_mid(row.label_mid, f"row {number}")
            key = sample_key(row.image_id, row.label_mid)
        except ValueError as exc:
            raise InputError(f"{uri}: {exc}") from exc
        if images is not None:
            photo = storage.join(images, f"{row.image_id}.jpg")
        else:
            filepath = getattr(row, "filepath", None)
            photo = filepath or getattr(row, "url", None)
            if not isinstance(photo, str) or not photo:
                raise InputError(f"{uri}: {row.image_id} has no filepath or url; give --images")
        candidates.append(Candidate(
            key=key, image_id=row.image_id, label_mid=row.label_mid,
            category=row.category, box=Box(row.xmin, row.xmax, row.ymin, row.ymax), photo_uri=photo,
            photo_from_url=images is None and not filepath,
        ))
    candidates.sort(key=lambda c: c.key)
    keys = [c.key for c in candidates]
    duplicates = sorted({a for a, b in zip(keys, keys[1:]) if a == b})
    if duplicates:
        raise InputError(f"{uri}: repeated candidates {', '.join(duplicates[:5])}")
    return candidates[:limit] if limit is not None else candidates


def plan_chunks(candidates: list[Candidate], samples: int) -> list[ChunkPlan]:
    return [
        ChunkPlan(index, tuple(candidates[start:start + samples]))
        for index, start in enumerate(range(0, len(candidates), samples))
    ]


