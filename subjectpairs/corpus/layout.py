"""The corpus on disk (docs/FORMAT.md): the files beside the shards, shard and member names, sample keys.

Every part of the project that reads or writes the corpus takes these names from here.
"""

from __future__ import annotations

from subjectpairs import storage
from subjectpairs.errors import InputError
from subjectpairs.identifiers import check_sample_key

SHARD_PREFIX = "pairs-"
# The files a build writes beside its shards
# The files a build writes beside its shards (docs/FORMAT.md)
MANIFEST_FILE = "manifest.json"
REJECTS_FILE = "rejects.parquet"
STATS_FILE = "stats.json"
# A pair's members: ``<key>.input.jpg``, ``<key>.target.jpg``, ``<key>.json``
INPUT_MEMBER = "input.jpg"
TARGET_MEMBER = "target.jpg"
META_MEMBER = "json"
# Side-car latent shards carry the same file names as the pair shards, one member per sample, written in
# the pair shard's order (samples may be missing): ``<key>.latent.npy``, a float16 (8, h, w) array, the
# VAE latent's mean (4 channels) then its std (4 channels), h = w = target_size // 8.
LATENT_MEMBER = "latent.npy"
LATENT_CHANNELS = 8
LATENT_DOWNSCALE = 8


def sample_key(image_id: str, label_mid: str) -> str:
    """``<ImageID>_<MID without "/m/">``: no dots (webdataset splits names at the first dot), no slashes.

    A key names tar members and files, so it is made only if it follows the sample-key grammar
    (:mod:`subjectpairs.identifiers`; ValueError otherwise): an ImageID or MID with a dot or ``..`` never
    becomes one."""
    key = f"{image_id}_{label_mid.removeprefix('/m/').replace('/', '-')}"
    return check_sample_key(key, f"ImageID {image_id!r} with label MID {label_mid!r}")


def is_shard_name(name: object) -> bool:
    """A shard file's name, directly in its folder (no path): what a command may delete as a shard."""
    return isinstance(name, str) and name.startswith(SHARD_PREFIX) and name.endswith(".tar") and "/" not in name


def shard_name(chunk: int, part: int) -> str:
    return f"{SHARD_PREFIX}{chunk:06d}.tar" if part == 0 else f"{SHARD_PREFIX}{chunk:06d}-{part}.tar"


def read_exclude(uri: str | None) -> frozenset[str]:
    """Sample keys to leave out, one per line; blank lines and ``#`` comments are ignored."""
    if uri is None:
        return frozenset()
    try:
        lines = storage.read_bytes(uri).decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{uri}: not a text file of sample keys ({exc})") from exc
    return frozenset(key for line in lines if (key := line.split("#", 1)[0].strip()))

