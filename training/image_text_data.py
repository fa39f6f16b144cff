"""Stage 1's streaming data loader: img2dataset's image-text WebDataset shards in, augmented batches out.

img2dataset writes ``NNNNN.tar`` (members ``KEY.jpg``, ``KEY.txt``, the caption, and ``KEY.json``), and
beside each its ``NNNNN_stats.json`` (``successes``: the samples in the tar) and ``NNNNN.parquet``. The
stage-2 loader's machinery (:mod:`.data`) reads them with the same guarantees: shards dealt to balanced
streams, a seeded shuffle buffer, per-sample randomness from ``(seed, epoch, key)``, corrupt samples (an
image that does not decode, a missing caption, a caption that is not UTF-8) skipped and counted, an epoch
that ends on every rank at once by the caller's all-reduce on :meth:`ShardBatchReader.next_batch`, and
exact resume from a :class:`~.data.StreamPosition`.

Samples are processed as LAVIS's stage 1 does (``blip2_image_train`` and ``blip_caption``): a random
resized crop of 0.5-1.0 of the image, bicubic, a coin-flip mirror and CLIP normalization; the caption
lower-cased, stripped of some punctuation and cut to 50 words. Tokenization stays with the model
(:func:`~.qformer_pretraining.tokenize_captions`).
"""

from __future__ import annotations

import functools
import io
import json
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import default_collate

from subjectpairs import storage
from subjectpairs.corpus.reader import ShardInfo, resolve_shards

from .data import ShardBatchReader, ShardStream, StreamPosition, augmented_pixels

IMAGE_MEMBER, CAPTION_MEMBER = "jpg", "txt"
STATS_SUFFIX = "_stats.json"  # img2dataset's per-shard stats, beside NNNNN.tar as NNNNN_stats.json
IMAGE_CROP_SCALE = (0.5, 1.0)  # blip2_image_train's min_scale and max_scale
MAX_CAPTION_WORDS = 50  # blip_caption's max_words
STATS_READERS = 16  # stats files read at once: an object store answers each in tens of milliseconds
_CAPTION_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_REPEATED_SPACE = re.compile(r"\s{2,}")


def resolve_image_text_shards(specs: list[str]) -> list[ShardInfo]:
    """The shards named by ``specs`` (folders, object-store prefixes or single ``.tar`` URIs, as
    :func:`~subjectpairs.corpus.reader.resolve_shards` resolves them), each with its sample count from the
    ``successes`` of its img2dataset stats file; a shard without one has an unknown count."""
    shards = resolve_shards(specs)
    present = {folder: frozenset(storage.list_folder(folder))
               for folder in {posixpath.dirname(shard.uri) for shard in shards}}

    def counted(shard: ShardInfo) -> ShardInfo:
        folder, name = posixpath.split(shard.uri)
        stats = name.removesuffix(".tar") + STATS_SUFFIX
        if stats not in present[folder]:
            return shard
        return replace(shard, samples=_successes(storage.join(folder, stats)))

    with ThreadPoolExecutor(max_workers=STATS_READERS) as pool:
        return list(pool.map(counted, shards))


def _successes(uri: str) -> int:
    try:
        return int(json.loads(storage.read_bytes(uri))["successes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{uri}: not img2dataset stats with a count of successes ({exc})") from exc


def blip_caption(caption: str, max_words: int = MAX_CAPTION_WORDS) -> str:
    """LAVIS's ``BlipCaptionProcessor.pre_caption``: lower case, ``.!"()*#:;~`` made spaces, runs of
    white space made one space, stripped, the first ``max_words`` words."""
    caption = _REPEATED_SPACE.sub(" ", _CAPTION_PUNCTUATION.sub(" ", caption.lower()))
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def image_text_pixels(data: bytes, size: int, rng: np.random.Generator) -> np.ndarray:
    """``blip2_image_train``: a random resized crop of 0.5-1.0 of the image, bicubic to ``size`` square, a
    coin-flip mirror and CLIP normalization, drawn from ``rng``: (3, size, size)."""
    image = Image.open(io.BytesIO(data))
    return augmented_pixels(image, (0, 0, *image.size), size, rng, IMAGE_CROP_SCALE)


class ImageTextStream(ShardStream):
    """One rank's image-text batches (see :class:`~.data.ShardStream`, whose settings ``settings`` are):
    ``pixel_values`` (B, 3, image_size, image_size) and ``captions`` (cleaned by :func:`blip_caption`)."""

    members = frozenset({IMAGE_MEMBER, CAPTION_MEMBER})  # the .json metadata is skipped unread

    def __init__(self, shards: list[ShardInfo], *, image_size: int = 224, **settings: Any) -> None:
        super().__init__(shards, **settings)
        self.image_size = image_size

    def _decode(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        # A missing member raises KeyError and a caption that is not UTF-8 UnicodeDecodeError: both corrupt.
        return {"pixel_values": image_text_pixels(sample[IMAGE_MEMBER], self.image_size, rng),
                "caption": blip_caption(sample[CAPTION_MEMBER].decode("utf-8"))}

    def _collate(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        return {"pixel_values": default_collate([s["pixel_values"] for s in batch]),
                "captions": [s["caption"] for s in batch]}


class ImageTextBatchReader(ShardBatchReader):
    """A :class:`~.data.ShardBatchReader` of image-text shards (:class:`ImageTextStream`): ``next_batch``
    gives ``keys``, ``pixel_values``, ``captions`` and the bookkeeping, or None once this rank's epoch is
    over; ``position`` is what a checkpoint stores."""

    def __init__(
        self, shards: list[ShardInfo], *, rank: int, world_size: int, num_workers: int, batch_size: int,
        seed: int, image_size: int = 224, shuffle_buffer: int = 1000, position: StreamPosition | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        stream = functools.partial(
            ImageTextStream, shards, rank=rank, world_size=world_size, num_workers=num_workers,
            batch_size=batch_size, seed=seed, image_size=image_size, shuffle_buffer=shuffle_buffer,
        )
        super().__init__(stream, num_workers=num_workers, seed=seed, position=position,
                         prefetch_factor=prefetch_factor)
