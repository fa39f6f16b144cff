"""Candidates in, shard plans out; pairs in, deterministic WebDataset tars out.

Shard membership is fixed by the sorted sample keys, never by scheduling: chunk ``i`` holds the keys at
positions ``[i * samples, (i + 1) * samples)``. A chunk becomes ``pairs-<i>.tar`` (and ``pairs-<i>-1.tar``,
... if its pairs exceed the byte cap). Tar members are sorted, with fixed mtime, owner and mode, so the same
pairs always give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import math
import numbers
import os
import tarfile
import tempfile
from dataclasses import dataclass

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from subjectpairs import storage
from subjectpairs.errors import InputError
from subjectpairs.identifiers import check_image_id, check_label_mid, check_sample_key
from subjectpairs.pipelines.boxes import Box
from subjectpairs.pipelines.rejections import Rejection

SHARD_PREFIX = "pairs-"
TAR_MTIME = 0  # 1970-01-01: members carry no build time
# The files a build writes beside its shards (docs/FORMAT.md)
MANIFEST_FILE = "manifest.json"
REJECTS_FILE = "rejects.parquet"
STATS_FILE = "stats.json"
CONFIG_FILE = "config.yaml"
REJECT_SCHEMA = pa.schema([("key", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
                           ("detail", pa.string())])
# The candidates table's required columns
TEXT_COLUMNS = ("image_id", "label_mid", "category")
BOX_COLUMNS = ("xmin", "xmax", "ymin", "ymax")
# A pair a reviewer rejected (listed in an exclude file): not built, or removed by `shards compact`
REVIEW_STAGE = "review"
EXCLUDED_REASON = "excluded"


def sample_key(image_id: str, label_mid: str) -> str:
    """``<ImageID>_<MID without "/m/">``: no dots (webdataset splits names at the first dot), no slashes.

    A key names tar members and files, so it is made only if it follows the sample-key grammar
    (:mod:`subjectpairs.identifiers`; ValueError otherwise): an ImageID or MID with a dot or ``..`` never
    becomes one."""
    key = f"{image_id}_{label_mid.removeprefix('/m/').replace('/', '-')}"
    return check_sample_key(key, f"ImageID {image_id!r} with label MID {label_mid!r}")


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


def is_shard_name(name: object) -> bool:
    """A shard file's name, directly in its folder (no path): what a command may delete as a shard."""
    return isinstance(name, str) and name.startswith(SHARD_PREFIX) and name.endswith(".tar") and "/" not in name


def shard_name(chunk: int, part: int) -> str:
    return f"{SHARD_PREFIX}{chunk:06d}.tar" if part == 0 else f"{SHARD_PREFIX}{chunk:06d}-{part}.tar"


def shard_tar_writer(path: str) -> wds.TarWriter:
    """A tar writer with the shards' fixed member headers: mtime 0, owner and group 0 with empty names,
    mode 0444, USTAR; each sample's members are written sorted by name."""
    return wds.TarWriter(
        path, user="", group="", mode=0o444, encoder=False, mtime=TAR_MTIME, format=tarfile.USTAR_FORMAT
    )


def read_exclude(uri: str | None) -> frozenset[str]:
    """Sample keys to leave out, one per line; blank lines and ``#`` comments are ignored."""
    if uri is None:
        return frozenset()
    try:
        lines = storage.read_bytes(uri).decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{uri}: not a text file of sample keys ({exc})") from exc
    return frozenset(key for line in lines if (key := line.split("#", 1)[0].strip()))


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


@dataclass
class ShardFile:
    name: str
    samples: int
    bytes: int
    sha256: str
    first_key: str
    last_key: str


class ChunkWriter:
    """Writes one chunk's samples into local temporary tars, starting a new part at the byte cap, and
    publishes them under their final names only when the whole chunk is done."""

    # tar overhead per member: a 512-byte header and padding to 512 bytes
    _MEMBER_OVERHEAD = 1024

    def __init__(self, out_dir: str, chunk: int, max_bytes: int) -> None:
        self.out_dir = out_dir
        self.chunk = chunk
        self.max_bytes = max_bytes
        self._scratch = tempfile.TemporaryDirectory(prefix="subjectpairs-shard-")
        self._parts: list[tuple[str, list[str], int]] = []  # local path, keys, bytes estimate
        self._tar: wds.TarWriter | None = None

    def _open_part(self) -> None:
        if self._tar is not None:
            self._tar.close()
        path = os.path.join(self._scratch.name, shard_name(self.chunk, len(self._parts)))
        self._tar = shard_tar_writer(path)
        self._parts.append((path, [], 0))

    def write(self, key: str, members: dict[str, bytes]) -> None:
        # keys come from sample_key, already checked; a tar member name is the last place to stop one that
        # would climb out of a folder or be split at a dot
        check_sample_key(key, f"chunk {self.chunk}")
        size = sum(len(data) + self._MEMBER_OVERHEAD for data in members.values())
        if self._tar is None or (self._parts[-1][1] and self._parts[-1][2] + size > self.max_bytes):
            self._open_part()
        assert self._tar is not None
        self._tar.write({"__key__": key, **members})
        path, keys, total = self._parts[-1]
        keys.append(key)
        self._parts[-1] = (path, keys, total + size)

    def publish(self) -> list[ShardFile]:
        """Close the tars, hash them and move them to the output (rename locally, one put remotely).

        A chunk with no pairs publishes nothing."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        published = []
        for path, keys, _ in self._parts:
            name = os.path.basename(path)
            digest = file_sha256(path)
            size = os.path.getsize(path)
            publish_file(path, storage.join(self.out_dir, name))
            published.append(ShardFile(name, len(keys), size, digest, keys[0], keys[-1]))
        return published

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._scratch.cleanup()


def file_sha256(uri: str) -> str:
    digest = hashlib.sha256()
    with storage.open_input_stream(uri) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def publish_file(local: str, target: str) -> None:
    """Make ``local`` appear at ``target`` whole or not at all."""
    if storage.is_remote(target):
        fs, path = fsspec.core.url_to_fs(target)
        fs.put_file(local, path)  # an object store shows an object only once its upload completes
        return
    final = storage.local_path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.partial")
    with open(local, "rb") as source, open(staging, "wb") as sink:
        while block := source.read(1 << 22):
            sink.write(block)
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(staging, final)


def read_shard(uri: str) -> list[dict[str, bytes]]:
    """All samples of a shard as dicts of member name -> bytes, with ``__key__`` (for tests and tools)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri))) as tar:
        for member in tar.getmembers():
            key, _, suffix = member.name.partition(".")
            extracted = tar.extractfile(member)
            assert extracted is not None
            samples.setdefault(key, {"__key__": key.encode()})[suffix] = extracted.read()
    return list(samples.values())
