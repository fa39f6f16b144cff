"""One deterministic shard writer: fixed tar headers, sorted members, atomic publish.

The same samples always give the same bytes, pair shards and latent shards alike.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile

import numpy as np
import webdataset as wds

from subjectpairs import storage
from subjectpairs.identifiers import check_sample_key

from .layout import LATENT_CHANNELS, LATENT_MEMBER, shard_name
from .manifest import ShardEntry

TAR_MTIME = 0  # 1970-01-01: members carry no build time


def shard_tar_writer(path: str) -> wds.TarWriter:
    """A tar writer with the shards' fixed member headers: mtime 0, owner and group 0 with empty names,
    mode 0444, USTAR; each sample's members are written sorted by name."""
    return wds.TarWriter(
        path, user="", group="", mode=0o444, encoder=False, mtime=TAR_MTIME, format=tarfile.USTAR_FORMAT
    )


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

    def publish(self) -> list[ShardEntry]:
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
            storage.publish_file(path, storage.join(self.out_dir, name))
            published.append(ShardEntry(name=name, samples=len(keys), bytes=size, sha256=digest,
                                        first_key=keys[0], last_key=keys[-1]))
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


def encode_latent(latent: np.ndarray) -> bytes:
    """The ``latent.npy`` member of one sample: a (8, h, w) array stored as float16."""
    if latent.ndim != 3 or latent.shape[0] != LATENT_CHANNELS:
        raise ValueError(f"a latent is ({LATENT_CHANNELS}, h, w), got {latent.shape}")
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(latent, dtype=np.float16), allow_pickle=False)
    return buffer.getvalue()


def write_latent_member(writer: wds.TarWriter, key: str, latent: np.ndarray) -> None:
    """Write one sample's latent into a side-car shard: call in the order of the pair shard's samples."""
    writer.write({"__key__": key, LATENT_MEMBER: encode_latent(latent)})

