"""The trainer's streaming data loader: pair shards in, decoded and augmented batches out.

The machinery (:class:`ShardStream`, :class:`ShardBatchReader`) serves any tar shards: a subclass says
which members a sample is read with and how it is decoded and collated (stage 1's image-text loader is one).

Each rank splits the shards into ``num_workers`` streams (:func:`plan_streams`), one per DataLoader
worker. A stream reads its shards in order, drops excluded keys, passes the raw (undecoded) samples
through a seeded shuffle buffer, decodes and augments them (each sample's randomness comes from
``(seed, epoch, key)``) and batches them. Everything that decides what a batch holds is a function of
``(seed, epoch, rank, logical worker)``, so a checkpoint needs only :class:`StreamPosition`: how many raw
samples each worker consumed. A resumed reader regenerates the same streams, skips that many samples
without decoding them and goes on with exactly the batches an uninterrupted reader would have produced,
as long as the shards read the same as before.

An epoch of a rank ends when any of its streams runs out (:class:`BatchReader` returns ``None``), so
streams are balanced by expected sample count; with fewer shards than ``world_size * num_workers``
streams some streams are empty and the epoch ends at once.
"""

from __future__ import annotations

import collections
import functools
import heapq
import io
import itertools
import json
import logging
import math
import posixpath
import random
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
# default_collate stacks straight into shared memory in a DataLoader worker: no copy on the way out
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from subjectpairs.corpus.layout import (
    INPUT_MEMBER,
    LATENT_CHANNELS,
    LATENT_DOWNSCALE,
    LATENT_MEMBER,
    META_MEMBER,
    TARGET_MEMBER,
)
from subjectpairs.corpus.reader import ShardInfo, iter_shard
from subjectpairs.identifiers import check_sample_key
from subjectpairs.seeds import stable_seed

log = logging.getLogger(__name__)


# CLIP's normalization, which the BLIP-2 image encoder of BLIP-Diffusion was trained with
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
_PIXEL_SCALE = 1 / (255 * CLIP_STD)
_PIXEL_OFFSET = CLIP_MEAN / CLIP_STD
# BLIP-Diffusion's subject-image augmentation: RandomResizedCrop(scale=(0.9, 1.0)), default ratio range
CROP_SCALE = (0.9, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10  # torchvision's number of tries before its centred fallback


def _expected_samples(shards: list[ShardInfo], exclude: frozenset[str] = frozenset()) -> list[float]:
    """Per shard: its manifest count less the excluded keys within its key range; a shard of unknown count
    is taken as the mean of the known ones (1 when none is known)."""
    excluded = sorted(exclude)
    known = [
        max(shard.samples - _excluded_within(shard, excluded), 0)
        for shard in shards if shard.samples is not None
    ]
    unknown = sum(known) / len(known) if known else 1.0
    counts = iter(known)
    return [float(next(counts)) if shard.samples is not None else unknown for shard in shards]


def _excluded_within(shard: ShardInfo, excluded: list[str]) -> int:
    if shard.first_key is None or shard.last_key is None:
        return 0
    return bisect_right(excluded, shard.last_key) - bisect_left(excluded, shard.first_key)


def plan_streams(
    shards: list[ShardInfo], *, rank: int, world_size: int, num_workers: int, seed: int, epoch: int,
    exclude: frozenset[str] = frozenset(),
) -> list[list[ShardInfo]]:
    """This rank's ``max(num_workers, 1)`` streams: every shard goes to exactly one of the
    ``world_size * workers`` streams of all ranks (rank r owns streams ``r * workers ..``).

    The shards are dealt in an order shuffled by ``(seed, epoch)``, each to the stream with the fewest
    expected samples so far, so streams end at about the same time and each epoch mixes differently. With
    fewer shards than streams, some streams are empty.
    """
    workers = max(num_workers, 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    expected = _expected_samples(shards, exclude)
    order = list(range(len(shards)))
    random.Random(stable_seed("plan", seed, epoch)).shuffle(order)
    streams: list[list[ShardInfo]] = [[] for _ in range(world_size * workers)]
    loads = [(0.0, stream) for stream in range(len(streams))]  # a heap: lightest first, then lowest index
    for index in order:
        load, stream = heapq.heappop(loads)
        streams[stream].append(shards[index])
        heapq.heappush(loads, (load + expected[index], stream))
    return streams[rank * workers:(rank + 1) * workers]


def smallest_stream(shards: list[ShardInfo], *, world_size: int, num_workers: int, seed: int,
                    exclude: frozenset[str] = frozenset()) -> float | None:
    """The fewest samples any loader stream of the first epoch expects (manifest counts less the excluded
    keys); None when a shard's count is unknown."""
    if any(shard.samples is None for shard in shards):
        return None
    expected = dict(zip((shard.uri for shard in shards), _expected_samples(shards, exclude)))
    return min(sum(expected[shard.uri] for shard in stream) for rank in range(world_size)
               for stream in plan_streams(shards, rank=rank, world_size=world_size, num_workers=num_workers,
                                          seed=seed, epoch=0, exclude=exclude))


@dataclass
class StreamPosition:
    """Where a rank's reading stands: what a checkpoint stores per rank."""

    epoch: int = 0
    batches: int = 0  # batches this rank consumed in this epoch
    raw: list[int] = field(default_factory=list)  # per logical worker: raw (post-shuffle) samples consumed
    corrupt: int = 0  # corrupt samples skipped so far, all epochs: a metric, not needed to resume
    bad_shards: list[str] = field(default_factory=list)  # shards that failed to open or broke off: the same

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamPosition:
        return cls(epoch=int(d.get("epoch", 0)), batches=int(d.get("batches", 0)),
                   raw=[int(n) for n in d.get("raw", [])], corrupt=int(d.get("corrupt", 0)),
                   bad_shards=[str(uri) for uri in d.get("bad_shards", [])])


@dataclass
class _StreamCounts:
    corrupt: int = 0
    bad_shards: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """What a batch or a stream's end record carries of them (a copy: the counting goes on)."""
        return {"corrupt": self.corrupt, "bad_shards": list(self.bad_shards)}


class ShardStream(IterableDataset):
    """One rank's batches of some kind of shard; under a DataLoader each worker plays one logical worker's
    stream. A subclass names the tar ``members`` a sample needs and says how a raw sample is decoded
    (:meth:`_decode`) and a batch of decoded samples collated (:meth:`_collate`).

    Worker slot ``s`` (the torch worker id, 0 in process) plays logical worker
    ``(s + rotation) % workers``, skipping the first ``skip[w]`` raw samples of its stream undecoded.
    Each sample is decoded with a generator seeded by ``(seed, epoch, key)``; one that fails to decode is
    skipped and counted. A batch is the subclass's collated fields plus ``keys``, ``worker`` (the logical
    worker), ``position`` (raw samples it consumed after this batch, skipped ones included), ``corrupt``
    (corrupt samples it skipped) and ``bad_shards`` (shards that failed to open or broke off). A partial
    last batch is dropped; the stream ends with ``{"end": True, "worker", "corrupt", "bad_shards"}``.
    """

    members: frozenset[str]  # the tar members a sample is read with; the others are skipped unread

    def __init__(
        self, shards: list[ShardInfo], *, rank: int, world_size: int, num_workers: int, batch_size: int,
        seed: int, epoch: int, exclude: frozenset[str] = frozenset(), shuffle_buffer: int = 1000,
        skip: list[int] | None = None, rotation: int = 0,
    ) -> None:
        super().__init__()
        self.workers = max(num_workers, 1)
        if skip is not None and len(skip) != self.workers:
            raise ValueError(f"skip has {len(skip)} entries for {self.workers} workers")
        self.streams = plan_streams(shards, rank=rank, world_size=world_size, num_workers=num_workers,
                                    seed=seed, epoch=epoch, exclude=exclude)
        self.rank, self.seed, self.epoch, self.batch_size = rank, seed, epoch, batch_size
        self.exclude = exclude
        self.shuffle_buffer = shuffle_buffer
        self.skip = list(skip) if skip is not None else [0] * self.workers
        self.rotation = rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.rotation) % self.workers
        counts = _StreamCounts()
        samples = self._shuffled(worker, counts)
        position = self.skip[worker]
        collections.deque(itertools.islice(samples, position), maxlen=0)  # fast-forward, nothing decoded
        batch: list[dict[str, Any]] = []
        for sample in samples:
            position += 1
            try:
                # a bad key also names bad member files
                key = check_sample_key(sample["__key__"], "sample key")
                rng = np.random.default_rng(stable_seed("sample", self.seed, self.epoch, key))
                batch.append({"key": key, **self._decode(sample, rng)})
            except Exception as exc:  # PIL, json and numpy raise many types for a bad member
                counts.corrupt += 1
                log.warning("%s: corrupt sample skipped (%s: %s)", sample["__key__"], type(exc).__name__, exc)
                continue
            if len(batch) == self.batch_size:
                yield {"keys": [s["key"] for s in batch], **self._collate(batch), "worker": worker,
                       "position": position, **counts.report()}
                batch = []
        # The stream's last word, in its turn: the samples skipped after its last full batch count too.
        yield {"end": True, "worker": worker, **counts.report()}

    def _shuffled(self, worker: int, counts: _StreamCounts) -> Iterator[dict[str, Any]]:
        rng = random.Random(stable_seed("shuffle", self.seed, self.epoch, self.rank, worker))
        return iter(wds.filters.shuffle(bufsize=self.shuffle_buffer, rng=rng)(self._raw(worker, counts)))

    def _raw(self, worker: int, counts: _StreamCounts) -> Iterator[dict[str, Any]]:
        for shard in self.streams[worker]:
            samples = self._shard_raw(shard, counts)
            yield from (sample for sample in samples if sample["__key__"] not in self.exclude)

    def _shard_raw(self, shard: ShardInfo, counts: _StreamCounts) -> Iterator[dict[str, Any]]:
        """A shard's raw samples, before the exclusions."""
        return _shard_samples(shard.uri, self.members, shard.samples, counts)

    def _decode(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """A raw sample's fields for :meth:`_collate`, its randomness drawn from ``rng``; raises when the
        sample is corrupt."""
        raise NotImplementedError

    def _collate(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch's fields (but its keys and bookkeeping) from the decoded samples."""
        raise NotImplementedError


class PairStream(ShardStream):
    """One rank's pair batches (see :class:`ShardStream`): ``pixel_values`` (B, 3, input_size, input_size;
    the subject box, randomly cropped, flipped, CLIP-normalized), ``target`` (B, 3, target_size,
    target_size in [-1, 1]) or, with ``latents``, ``latents`` (B, 8, target_size // 8, target_size // 8),
    ``captions`` and ``categories``.
    """

    def __init__(
        self, shards: list[ShardInfo], *, rank: int, world_size: int, num_workers: int, batch_size: int,
        seed: int, epoch: int, input_size: int = 224, target_size: int = 512,
        exclude: frozenset[str] = frozenset(), latents: list[ShardInfo] | None = None,
        shuffle_buffer: int = 1000, skip: list[int] | None = None, rotation: int = 0,
    ) -> None:
        if latents is not None and target_size % LATENT_DOWNSCALE:
            raise ValueError(f"target_size {target_size} is not a multiple of {LATENT_DOWNSCALE}")
        super().__init__(shards, rank=rank, world_size=world_size, num_workers=num_workers,
                         batch_size=batch_size, seed=seed, epoch=epoch, exclude=exclude,
                         shuffle_buffer=shuffle_buffer, skip=skip, rotation=rotation)
        self.input_size, self.target_size = input_size, target_size
        self.latents = None if latents is None else {posixpath.basename(s.uri): s for s in latents}
        # Only the members a batch needs are read out of the tar; alpha, trimap (and the target when
        # latents stand in for it) are skipped over.
        self.members = frozenset({INPUT_MEMBER, META_MEMBER, TARGET_MEMBER} if latents is None
                                 else {INPUT_MEMBER, META_MEMBER})
        if self.latents is not None:
            missing = [s.uri for stream in self.streams for s in stream
                       if posixpath.basename(s.uri) not in self.latents]
            if missing:
                log.warning("%d shards have no latent shard (their samples will be skipped): %s",
                            len(missing), ", ".join(missing[:5]))

    def _shard_raw(self, shard: ShardInfo, counts: _StreamCounts) -> Iterator[dict[str, Any]]:
        samples = super()._shard_raw(shard, counts)
        if self.latents is None:
            return samples
        # The latent merge walks both shards in step, so the exclusions come after it.
        latent_shard = self.latents.get(posixpath.basename(shard.uri))
        latents = (_shard_samples(latent_shard.uri, frozenset({LATENT_MEMBER}), None, counts)
                   if latent_shard is not None else iter(()))
        return _with_latents(samples, latents)

    def _decode(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        meta = json.loads(sample[META_MEMBER])
        decoded = {
            "pixel_values": subject_pixels(sample[INPUT_MEMBER], meta["box"], self.input_size, rng),
            "caption": _pick_caption(meta, rng),
            "category": str(meta["category"]),
        }
        if self.latents is None:
            decoded["target"] = target_pixels(sample[TARGET_MEMBER], self.target_size)
        else:
            decoded["latents"] = decode_latent(sample[LATENT_MEMBER], self.target_size)
        return decoded

    def _collate(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        image_key = "target" if self.latents is None else "latents"
        return {
            "pixel_values": default_collate([s["pixel_values"] for s in batch]),
            "captions": [s["caption"] for s in batch],
            "categories": [s["category"] for s in batch],
            image_key: default_collate([s[image_key] for s in batch]),
        }


def _shard_samples(uri: str, members: frozenset[str], expected: int | None,
                   counts: _StreamCounts) -> Iterator[dict[str, Any]]:
    """:func:`iter_shard`, never fatal: a shard that does not open, breaks off, or holds fewer samples than
    its listing (a manifest, img2dataset's stats) says is logged and counted; the samples read before still
    count."""
    read = 0
    try:
        for sample in iter_shard(uri, members):
            read += 1
            yield sample
    except Exception as exc:  # tarfile, pyarrow and fsspec raise many types for a broken or missing file
        counts.bad_shards.append(uri)
        log.warning("%s: shard skipped after %d samples (%s: %s)", uri, read, type(exc).__name__, exc)
        return
    if expected is not None and read < expected:
        counts.bad_shards.append(uri)
        log.warning("%s: %d samples, its listing says %d (truncated?)", uri, read, expected)


def _with_latents(
    pairs: Iterator[dict[str, Any]], latents: Iterator[dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """Pairs with their latent member from a side-car shard in the same order; a pair whose latent is
    missing goes on without one, so decoding counts it as corrupt."""
    pending = next(latents, None)
    for pair in pairs:
        if pending is not None and pending["__key__"] == pair["__key__"]:
            pair[LATENT_MEMBER] = pending[LATENT_MEMBER]
            pending = next(latents, None)
        yield pair


def _pick_caption(meta: dict[str, Any], rng: np.random.Generator) -> str:
    captions = meta.get("captions") or []
    return str(captions[int(rng.integers(len(captions)))]) if captions else str(meta["category"])


def subject_pixels(data: bytes, box: list[float], size: int, rng: np.random.Generator) -> np.ndarray:
    """The composite cropped to the subject box (normalized [xmin, xmax, ymin, ymax]), then
    :func:`augmented_pixels` with scale 0.9-1.0: (3, size, size)."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size  # from the header: crops are planned at full size, before any draft
    return augmented_pixels(image, _box_pixels(box, width, height), size, rng, CROP_SCALE)


def augmented_pixels(image: Image.Image, region: tuple[int, int, int, int], size: int,
                     rng: np.random.Generator, scale: tuple[float, float]) -> np.ndarray:
    """A random resized crop (area ``scale`` of ``region``, the (left, top, right, bottom) pixels of the
    opened, not yet decoded ``image``), bicubic to ``size`` square, a coin-flip mirror and CLIP
    normalization: (3, size, size)."""
    left, top, right, bottom = region
    x, y, w, h = random_resized_crop(right - left, bottom - top, rng, scale)
    image, crop = _decode_for_crop(image, (left + x, top + y, left + x + w, top + y + h), size)
    resized = image.resize((size, size), Image.Resampling.BICUBIC, box=crop)
    if rng.random() < 0.5:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(resized, dtype=np.float32)
    pixels *= _PIXEL_SCALE  # in place: (pixels / 255 - mean) / std in two passes over the array
    pixels -= _PIXEL_OFFSET
    return pixels.transpose(2, 0, 1)


def target_pixels(data: bytes, size: int) -> np.ndarray:
    """The photo's centred square resized bicubic to ``size``, in [-1, 1]: (3, size, size). The authors'
    target transform (``Resize(size, BICUBIC)``, ``CenterCrop(size)``), resizing only the part it keeps."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    image, crop = _decode_for_crop(image, (left, top, left + side, top + side), size)
    resized = image.resize((size, size), Image.Resampling.BICUBIC, box=crop)
    pixels = np.asarray(resized, dtype=np.float32)
    pixels *= 1 / 127.5
    pixels -= 1.0
    return pixels.transpose(2, 0, 1)


def decode_latent(data: bytes, target_size: int) -> np.ndarray:
    latent = np.load(io.BytesIO(data), allow_pickle=False)
    side = target_size // LATENT_DOWNSCALE
    if latent.shape != (LATENT_CHANNELS, side, side):
        raise ValueError(f"latent of shape {latent.shape}, expected {(LATENT_CHANNELS, side, side)}")
    return latent.astype(np.float32)


def _box_pixels(box: list[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The normalized box in whole pixels (left, top, right, bottom), inside the image, at least 1x1."""
    xmin, xmax, ymin, ymax = (float(v) for v in box)
    left = min(max(round(xmin * width), 0), width - 1)
    top = min(max(round(ymin * height), 0), height - 1)
    right = max(min(round(xmax * width), width), left + 1)
    bottom = max(min(round(ymax * height), height), top + 1)
    return left, top, right, bottom


def random_resized_crop(width: int, height: int, rng: np.random.Generator,
                        scale: tuple[float, float] = CROP_SCALE) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` with ``scale`` and ratio 3/4-4/3, drawn from
    ``rng``: (x, y, w, h) within a ``width`` x ``height`` image."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # A box too elongated for the ratio range: the largest centred crop within it, as torchvision does.
    if width / height < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif width / height > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _decode_for_crop(image: Image.Image, crop: tuple[float, float, float, float],
                     size: int) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Decode ``image`` as RGB, letting libjpeg reduce it by 2, 4 or 8 when ``crop`` still keeps at least
    ``size`` pixels each way (much less work for a small output); returns ``crop`` in the decoded pixels."""
    width, height = image.size
    request = (math.ceil(width * size / (crop[2] - crop[0])), math.ceil(height * size / (crop[3] - crop[1])))
    drafted = image.draft("RGB", request)  # None for anything but a JPEG
    scale = drafted[1][2] / width if drafted is not None else 1.0
    return image.convert("RGB"), tuple(c * scale for c in crop)


class ShardBatchReader:
    """One rank's batches in strict cyclic order of logical workers 0, 1, .., W-1, 0, .. from a DataLoader
    (``batch_size=None``, ``num_workers=W``; in process when ``num_workers`` is 0, W taken as 1) over the
    :class:`ShardStream` that ``stream`` makes when given ``epoch``, ``skip`` and ``rotation``.

    ``position`` (from a checkpoint) resumes exactly: each stream skips the raw samples it had consumed,
    and the DataLoader's first slot plays the logical worker that comes next (rotation
    ``batches % W``). Resuming needs the same shards, exclusions, seed, world size and ``num_workers``.
    """

    def __init__(self, stream: Callable[..., ShardStream], *, num_workers: int, seed: int,
                 position: StreamPosition | None = None, prefetch_factor: int = 2) -> None:
        self.workers = max(num_workers, 1)
        start = position or StreamPosition()
        # A copy: the caller's checkpoint object stays as it was.
        self.position = StreamPosition(start.epoch, start.batches, list(start.raw) or [0] * self.workers,
                                       start.corrupt, list(start.bad_shards))
        if len(self.position.raw) != self.workers:
            raise ValueError(f"the position has {len(self.position.raw)} workers' counts, the reader "
                             f"{self.workers}: resume with the same num_workers")
        self._stream, self._seed = stream, seed
        self._num_workers, self._prefetch_factor = num_workers, prefetch_factor
        self._batches: Iterator[dict[str, Any]] | None = self._open()

    def _open(self) -> Iterator[dict[str, Any]]:
        stream = self._stream(epoch=self.position.epoch, skip=list(self.position.raw),
                              rotation=self.position.batches % self.workers)
        self._corrupt_seen = [0] * self.workers  # each new stream's corrupt count at its last batch
        # Its own generator: a DataLoader iterator otherwise draws its base seed from the global torch RNG,
        # which the trainer checkpoints, so opening the loader at resume time would shift the noise.
        loader = DataLoader(stream, batch_size=None, num_workers=self._num_workers,
                            prefetch_factor=self._prefetch_factor if self._num_workers else None,
                            generator=torch.Generator().manual_seed(stable_seed(self._seed, "loader")))
        return iter(loader)

    def next_batch(self) -> dict[str, Any] | None:
        """The next batch, or None once this rank's epoch is over: the worker whose turn it is ran out
        (the DataLoader stops, or hands a batch from the next worker instead)."""
        if self._batches is None:
            return None
        batch = next(self._batches, None)
        if batch is not None:
            self._count_skips(batch)
        if batch is None or "end" in batch or batch["worker"] != self.position.batches % self.workers:
            self._batches = None  # drops the DataLoader iterator, which shuts its workers down
            return None
        self.position.batches += 1
        self.position.raw[batch["worker"]] = batch["position"]
        return batch

    def _count_skips(self, item: dict[str, Any]) -> None:
        """Adds what a batch or a stream's end record skipped since that stream's last word."""
        worker = item["worker"]
        self.position.corrupt += item["corrupt"] - self._corrupt_seen[worker]
        self._corrupt_seen[worker] = item["corrupt"]
        self.position.bad_shards = sorted({*self.position.bad_shards, *item["bad_shards"]})

    def start_next_epoch(self) -> None:
        self._batches = None
        self.position.epoch += 1
        self.position.batches = 0
        self.position.raw = [0] * self.workers
        self._batches = self._open()


class BatchReader(ShardBatchReader):
    """A :class:`ShardBatchReader` of pair shards (:class:`PairStream`)."""

    def __init__(
        self, shards: list[ShardInfo], *, rank: int, world_size: int, num_workers: int, batch_size: int,
        seed: int, input_size: int = 224, target_size: int = 512, exclude: frozenset[str] = frozenset(),
        latents: list[ShardInfo] | None = None, shuffle_buffer: int = 1000,
        position: StreamPosition | None = None, prefetch_factor: int = 2,
    ) -> None:
        # Everything of the streams but the epoch and the place to resume from, which change.
        stream = functools.partial(
            PairStream, shards, rank=rank, world_size=world_size, num_workers=num_workers,
            batch_size=batch_size, seed=seed, input_size=input_size, target_size=target_size,
            exclude=exclude, latents=latents, shuffle_buffer=shuffle_buffer,
        )
        super().__init__(stream, num_workers=num_workers, seed=seed, position=position,
                         prefetch_factor=prefetch_factor)
