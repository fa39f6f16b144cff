"""Local paths and fsspec URIs behind one small interface.

Inputs and outputs are paths or URIs (``s3://bucket/key``, ``gs://...``, ``memory://...``). Local files
go through pyarrow's native streams (fast, GIL-free reads); everything else through fsspec.
Outputs are staged and published together, so a failed run never leaves a partial result behind.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from subjectpairs.errors import InputError

if TYPE_CHECKING:  # only annotations name it: a command that reads no table does not pay for pandas
    import pandas as pd

_COMPRESSION_BY_SUFFIX = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def local_path(uri: str | Path) -> Path:
    text = str(uri)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def join(base: str | Path, *parts: str) -> str:
    if is_remote(str(base)):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(local_path(base).joinpath(*parts))


def exists(uri: str | Path) -> bool:
    if is_remote(str(uri)):
        fs, path = fsspec.core.url_to_fs(str(uri))
        return fs.exists(path)
    return local_path(uri).exists()


def is_dir(uri: str | Path) -> bool:
    if is_remote(str(uri)):
        fs, path = fsspec.core.url_to_fs(str(uri))
        return fs.isdir(path)
    return local_path(uri).is_dir()


def list_files(folder: str | Path, suffixes: tuple[str, ...]) -> list[str]:
    """Every file under ``folder`` (recursively) whose name ends with one of ``suffixes``
    (case-insensitive), as sorted paths or URIs."""
    text = str(folder)
    if is_remote(text):
        fs, path = fsspec.core.url_to_fs(text)
        protocol = text.split("://", 1)[0]
        found = [f"{protocol}://{name}" for name in fs.find(path)]
    else:
        found = [str(p) for p in local_path(text).rglob("*") if p.is_file()]
    return sorted(name for name in found if name.lower().endswith(suffixes))


def list_folder(folder: str | Path) -> list[str]:
    """The names directly in a folder (files and sub-folders, hidden ones too), sorted; none when there is no
    such folder."""
    if not is_dir(folder):
        return []
    if is_remote(str(folder)):
        fs, path = fsspec.core.url_to_fs(str(folder))
        return sorted(name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(path, detail=False))
    return sorted(os.listdir(local_path(folder)))


def file_sizes(folder: str | Path) -> dict[str, int]:
    """The size in bytes of each file directly in a folder, by name (sub-folders left out); a folder that is
    not there raises FileNotFoundError."""
    if is_remote(str(folder)):
        fs, path = fsspec.core.url_to_fs(str(folder))
        return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry["size"]
                for entry in fs.ls(path, detail=True) if entry["type"] == "file"}
    return {entry.name: entry.stat().st_size for entry in os.scandir(local_path(folder)) if entry.is_file()}


def open_input_stream(uri: str | Path) -> pa.NativeFile:
    """A readable stream, decompressed by the file's suffix (.gz, .bz2, .zst, .lz4)."""
    text = str(uri)
    compression = _COMPRESSION_BY_SUFFIX.get(posixpath.splitext(text)[1].lower())
    try:
        if is_remote(text):
            fs, path = fsspec.core.url_to_fs(text)
            stream: pa.NativeFile = pa.PythonFile(fs.open(path, "rb"), mode="r")
            return pa.CompressedInputStream(stream, compression) if compression else stream
        return pa.input_stream(str(local_path(text)), compression=compression)
    except FileNotFoundError as exc:
        raise InputError(f"{text}: file not found") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{text}: is a directory, expected a file") from exc
    except OSError as exc:
        if not exists(text):
            raise InputError(f"{text}: file not found") from exc
        if is_dir(text):
            raise InputError(f"{text}: is a directory, expected a file") from exc
        raise InputError(f"{text}: cannot open the file ({exc})") from exc


@contextmanager
def reading(uri: str | Path) -> Iterator[pa.NativeFile]:
    """:func:`open_input_stream` for a ``with`` block in which the stream is read.

    Decompression only fails once the bytes are read, so a truncated, corrupt or not really compressed file
    (and a failing disk) raises there: it becomes one InputError naming the file instead of a traceback.
    """
    with open_input_stream(uri) as stream:
        try:
            yield stream
        except OSError as exc:
            compression = _COMPRESSION_BY_SUFFIX.get(posixpath.splitext(str(uri))[1].lower())
            problem = (f"cannot decompress as {compression}: the file is truncated, corrupt or not "
                       f"{compression}-compressed" if compression else "cannot read the file")
            raise InputError(f"{uri}: {problem} ({exc})") from exc


def read_bytes(uri: str | Path) -> bytes:
    with reading(uri) as stream:
        return stream.read()


class FileReader:
    """Reads whole files of one protocol (``"file"`` for local paths) as they are stored, not decompressed,
    through one fsspec filesystem made with ``options`` (``anon=True``: a public S3 bucket, no account).

    A read that fails raises what the filesystem raises (FileNotFoundError, another OSError, ...), for the
    caller to sort; :func:`read_bytes` is the reader whose failures are one InputError.
    """

    def __init__(self, protocol: str, **options: Any) -> None:
        self._fs = fsspec.filesystem(protocol, **options)

    def read(self, uri: str | Path) -> bytes:
        text = str(uri)
        return self._fs.cat_file(self._fs._strip_protocol(text) if is_remote(text) else str(local_path(text)))


def read_parquet(uri: str | Path, what: str, columns: list[str] | None = None) -> pd.DataFrame:
    """A parquet file as a table; a file that is missing, not parquet or lacks ``columns`` is one
    InputError naming it as ``what`` (pyarrow raises many exception types for these)."""
    try:
        with open_input_stream(uri) as stream:
            return pq.read_table(stream, columns=columns).to_pandas()
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{uri}: cannot read the {what} ({type(exc).__name__}: {exc})") from exc


def remove(uri: str | Path) -> None:
    """Delete a file or a folder tree at a path or URI, if it is there."""
    if is_remote(str(uri)):
        fs, path = fsspec.core.url_to_fs(str(uri))
        if fs.exists(path):
            fs.rm(path, recursive=True)
    elif local_path(uri).is_dir():
        shutil.rmtree(local_path(uri))
    else:
        local_path(uri).unlink(missing_ok=True)


def make_folder(uri: str | Path) -> None:
    """Create a local output folder and its parents (object stores have no folders).

    A path that is a file, lies under a file, or may not be written there is an InputError naming it.
    """
    if is_remote(str(uri)):
        return
    try:
        local_path(uri).mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise InputError(f"{uri}: is a file, expected an output folder") from exc
    except NotADirectoryError as exc:
        raise InputError(f"{uri}: lies under a file, expected an output folder") from exc
    except OSError as exc:
        raise InputError(f"{uri}: cannot create the output folder ({exc.strerror or exc})") from exc


def unstaged_name(name: str) -> str:
    """The file a staged copy stands for: ``.NAME.tmp-TOKEN`` (:class:`StagedOutputs`) and ``.NAME.partial``
    (a file being copied into place) are ``NAME``, which a killed run may leave behind; other names as
    they are."""
    return name.lstrip(".").split(".tmp-")[0].removesuffix(".partial") if name.startswith(".") else name


class StagedOutputs:
    """Collect an output folder's files and publish them only when the whole run succeeded.

    Local files are written under hidden temporary names in the destination folder (same filesystem, so
    ``os.replace`` is atomic) and renamed at commit; object stores get one whole ``put`` per file at commit,
    which is atomic per object. Leaving the ``with`` block by an exception removes every temporary.
    """

    def __init__(self, out_dir: str | Path):
        self.out_dir = str(out_dir)
        self._remote = is_remote(self.out_dir)
        self._token = uuid.uuid4().hex[:12]
        self._staged: dict[str, str | bytes] = {}

    def __enter__(self) -> StagedOutputs:
        make_folder(self.out_dir)
        return self

    def put(self, name: str, data: bytes) -> None:
        if self._remote:
            self._staged[name] = data
            return
        tmp = local_path(self.out_dir) / f".{name}.tmp-{self._token}"
        try:
            handle = open(tmp, "wb")
        except OSError as exc:
            raise InputError(
                f"{self.out_dir}: cannot write into the output folder ({exc.strerror or exc})") from exc
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        self._staged[name] = str(tmp)

    def commit(self) -> list[str]:
        published = []
        if self._remote:
            fs, root = fsspec.core.url_to_fs(self.out_dir)
            for name, data in self._staged.items():
                fs.pipe_file(posixpath.join(root, name), data)
                published.append(join(self.out_dir, name))
        else:
            for name, tmp in self._staged.items():
                final = local_path(self.out_dir) / name
                os.replace(str(tmp), final)
                published.append(str(final))
        self._staged.clear()
        return published

    def discard(self) -> None:
        if not self._remote:
            for tmp in self._staged.values():
                Path(str(tmp)).unlink(missing_ok=True)
        self._staged.clear()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def publish_bytes(uri: str | Path, data: bytes) -> str:
    """Write one whole file atomically (staged, then renamed or put in one request)."""
    text = str(uri)
    parent, name = (text.rstrip("/").rsplit("/", 1) if is_remote(text)
                    else (str(local_path(text).parent), local_path(text).name))
    with StagedOutputs(parent) as staged:
        staged.put(name, data)
        return staged.commit()[0]


def publish_folder(local_folder: str | Path, uri: str | Path) -> None:
    """Copy a local folder tree to a path or URI, replacing files of the same names."""
    if is_remote(str(uri)):
        fs, path = fsspec.core.url_to_fs(str(uri))
        fs.put(str(local_folder).rstrip("/") + "/", path, recursive=True)
        return
    shutil.copytree(local_folder, local_path(uri), dirs_exist_ok=True)


def download_folder(uri: str | Path, local_folder: str | Path) -> None:
    """Copy a folder tree at a path or URI into a local folder (made when missing; the tree's files land
    directly in it), replacing files of the same names; a folder that is not there raises
    FileNotFoundError."""
    if is_remote(str(uri)):
        fs, path = fsspec.core.url_to_fs(str(uri))
        fs.get(path.rstrip("/") + "/", str(local_folder), recursive=True)
        return
    shutil.copytree(local_path(uri), local_folder, dirs_exist_ok=True)


def publish_file(local: str | Path, uri: str | Path) -> None:
    """Make a local file appear at a path or URI whole or not at all. An object store gets one whole put: the
    object appears only once the upload completed. A local copy is written as ``.NAME.partial`` beside the
    target, flushed to disk (fsync) and renamed over it."""
    if is_remote(str(uri)):
        fs, path = fsspec.core.url_to_fs(str(uri))
        fs.put_file(str(local), path)
        return
    final = local_path(uri)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.partial")
    with open(local, "rb") as source, open(staging, "wb") as sink:
        while block := source.read(1 << 22):
            sink.write(block)
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(staging, final)


def absolute(uri: str) -> str:
    """A local path made absolute (Ray workers may run in another working directory); URIs unchanged."""
    return uri if is_remote(uri) else str(local_path(uri).expanduser().resolve())


def arrow_filesystem(uri: str | Path) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem for a path or URI, and the path in it, for libraries that take one (Ray Train's
    storage); the URI's fsspec filesystem underneath, so it reaches what the rest of this module does."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
