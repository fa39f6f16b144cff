"""One verifying, streaming shard reader, and the resolution of shard folders and URIs to shards."""

from __future__ import annotations

import collections
import hashlib
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from subjectpairs import storage

from .layout import MANIFEST_FILE
from .manifest import Manifest, ShardEntry


@dataclass(frozen=True)
class ShardInfo:
    uri: str
    samples: int | None  # from manifest.json when known
    first_key: str | None
    last_key: str | None


def resolve_shards(specs: list[str]) -> list[ShardInfo]:
    """The shards named by ``specs``: each a single ``.tar`` URI, or a folder (or object-store prefix)
    holding ``manifest.json`` (its shards, with their sample counts), or a folder without one (every
    ``.tar`` directly in it, counts unknown). Raises ValueError when a spec names no shard."""
    shards = [shard for spec in specs for shard in _resolve_spec(str(spec))]
    if not shards:
        raise ValueError("no shards given")
    repeated = sorted(uri for uri, count in collections.Counter(s.uri for s in shards).items() if count > 1)
    if repeated:
        raise ValueError(f"shards given more than once: {', '.join(repeated[:5])}")
    return shards


def _resolve_spec(spec: str) -> list[ShardInfo]:
    if spec.endswith(".tar"):
        if not storage.exists(spec):
            raise ValueError(f"{spec}: shard not found")
        entry = (_read_manifest(_parent(spec)) or {}).get(posixpath.basename(spec))
        return [_shard_info(spec, entry)]
    manifest = _read_manifest(spec)
    present = _tars_in(spec)
    if manifest is None:
        if not present:
            raise ValueError(f"{spec}: no shards (not a .tar, and no {MANIFEST_FILE} or .tar files in it)")
        return [_shard_info(uri, None) for uri in present]
    missing = sorted(set(manifest) - {posixpath.basename(uri) for uri in present})
    if missing:
        raise ValueError(
            f"{spec}: {len(missing)} shards of {MANIFEST_FILE} are missing: {', '.join(missing[:5])}"
        )
    if not manifest:
        raise ValueError(f"{spec}: {MANIFEST_FILE} lists no shards")
    return [_shard_info(storage.join(spec, name), entry) for name, entry in manifest.items()]


def _parent(uri: str) -> str:
    return posixpath.dirname(uri) if storage.is_remote(uri) else str(storage.local_path(uri).parent)


def _read_manifest(folder: str) -> dict[str, ShardEntry] | None:
    """The manifest's shard entries by file name, in its order; None when the folder has no manifest."""
    manifest = Manifest.read(folder)
    return None if manifest is None else {entry.name: entry for entry in manifest.shards}


def _tars_in(folder: str) -> list[str]:
    """The ``.tar`` files directly in ``folder``, sorted; not in sub-folders, where latents may lie."""
    return [storage.join(folder, name) for name in storage.list_folder(folder) if name.endswith(".tar")]


def _shard_info(uri: str, entry: ShardEntry | None) -> ShardInfo:
    if entry is None:
        return ShardInfo(uri, None, None, None)
    return ShardInfo(uri, entry.samples, entry.first_key, entry.last_key)


class HashingStream:
    """A read-only stream that hashes what passes through it (when asked to) and keeps its last bytes (more
    than tarfile reads ahead), so the end of a tar can be checked after tarfile is done with it."""

    TAIL = 1 << 20

    def __init__(self, stream: Any, hashing: bool = False) -> None:
        self._stream = stream
        self.digest = hashlib.sha256() if hashing else None
        self.bytes = 0
        self._tail: collections.deque[bytes] = collections.deque()
        self._tail_bytes = 0

    def read(self, size: int | None = -1) -> bytes:
        data = self._stream.read() if size is None or size < 0 else self._stream.read(size)
        if self.digest is not None:
            self.digest.update(data)
        self.bytes += len(data)
        self._tail.append(data)
        self._tail_bytes += len(data)
        while self._tail_bytes - len(self._tail[0]) >= self.TAIL:
            self._tail_bytes -= len(self._tail.popleft())
        return data

    def expect_zeros_from(self, offset: int) -> None:
        """Read to the end; every byte from ``offset`` on must be zero (a tar's end blocks and padding).

        tarfile takes a damaged header for the end of the archive and stops without a word; what it left
        unread then holds data, and this says so."""
        start = self.bytes - self._tail_bytes
        if offset < start:
            raise ValueError(f"cannot check the end of the tar from byte {offset}")
        held = b"".join(self._tail)[offset - start:]
        if held.strip(b"\0"):
            raise ValueError(f"data after the end of the archive at byte {offset} (a damaged member header?)")
        while block := self.read(1 << 20):
            if block.strip(b"\0"):
                raise ValueError(f"data after the end of the archive at byte {offset} (a damaged member header?)")


def _split_name(name: str, members: frozenset[str] | None) -> tuple[str, str] | None:
    """``(key, member)`` of a tar member name. With ``members``, the member is the one the name ends with
    (any case) and the key all before it, dots included, so a dotted key comes out whole for the caller to
    refuse by the sample-key grammar; a name of no such member is None (skipped). Without, the name splits at
    its first dot, as webdataset splits it."""
    if members is None:
        key, dot, member = name.partition(".")
        if not dot or not key or not member or member.startswith("_"):
            raise ValueError(f"member {name!r} is not a sample's file (<key>.<suffix>)")
        return key, member
    lowered = name.lower()
    for member in members:
        if lowered.endswith("." + member) and len(name) > len(member) + 1:
            return name[: -len(member) - 1], member
    return None


def iter_shard(uri: str, members: frozenset[str] | None = None, sha256: str | None = None
               ) -> Iterator[dict[str, Any]]:
    """A shard's samples in tar order: ``__key__`` and its members' bytes; with ``members``, only those (the
    others skipped unread), else every file of the sample.

    Streams the tar (local files and object stores alike) and checks it as it goes: a sample's members lie
    together and appear once, and nothing follows the end of the archive (tarfile alone stops silently at a
    damaged member header). With ``sha256``, the bytes must hash to it. A check that fails, or a shard that
    does not open or breaks off, raises once the samples before it have been yielded. This is webdataset's
    tar iteration (``tar_file_iterator`` then ``group_by_keys``), done here because webdataset's does not
    tell where the archive ended."""
    with storage.open_input_stream(uri) as raw:
        stream = HashingStream(raw, hashing=sha256 is not None)
        key: str | None = None
        sample: dict[str, Any] = {}
        seen: set[str] = set()
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if not info.isreg():
                    if members is None:
                        raise ValueError(f"member {info.name!r} is not a sample's file (<key>.<suffix>)")
                    continue
                split = _split_name(info.name, members)
                if split is None:
                    continue
                name_key, member = split
                if name_key != key:
                    if key is not None:
                        yield sample
                    if name_key in seen:
                        raise ValueError(f"the members of sample {name_key} are not together")
                    seen.add(name_key)
                    key, sample = name_key, {"__key__": name_key}
                if member in sample:
                    raise ValueError(f"member {info.name!r} appears twice")
                extracted = tar.extractfile(info)
                assert extracted is not None
                sample[member] = extracted.read()
            end = tar.offset  # where tarfile found the end of the archive
        if key is not None:
            yield sample
        stream.expect_zeros_from(end)
    if sha256 is not None and stream.digest.hexdigest() != sha256:
        raise ValueError("its SHA-256 differs from its manifest entry: the shard is damaged or changed since "
                         "it was written")


def read_shard(uri: str) -> list[dict[str, Any]]:
    """All samples of a shard, every member (for tests and tools); see :func:`iter_shard`."""
    return list(iter_shard(uri))
