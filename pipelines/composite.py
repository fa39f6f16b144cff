"""Backgrounds and alpha blending.

The background of a pair and its crop are functions of (seed, sample key) alone, so a pair comes out the
same whichever worker builds it and in whatever order.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

import cv2
import numpy as np

from subjectpairs import storage
from subjectpairs.curation.backgrounds import IMAGE_SUFFIXES, is_pool, read_pool
from subjectpairs.errors import InputError
from subjectpairs.pipelines.images import decode_image
from subjectpairs.pipelines.rejections import PairRejected
from subjectpairs.seeds import sample_rng

LIST_SUFFIXES = (".txt", ".lst")
PROCEDURAL = "procedural"




def _expand(entry: str) -> list[str]:
    if storage.is_dir(entry):
        found = storage.list_files(entry, IMAGE_SUFFIXES)
        if not found:
            raise InputError(f"{entry}: no background images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return found
    if entry.lower().endswith(LIST_SUFFIXES):
        base = posixpath.dirname(entry) if storage.is_remote(entry) else str(storage.local_path(entry).parent)
        try:
            lines = storage.read_bytes(entry).decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise InputError(f"{entry}: not a text file of background paths ({exc})") from exc
        listed = [
            line if storage.is_remote(line) or line.startswith("/") else storage.join(base, line)
            for line in (raw.strip() for raw in lines) if line and not line.startswith("#")
        ]
        if not listed:  # an empty pool would silently mean generated backgrounds
            raise InputError(f"{entry}: lists no backgrounds (one path or URI per line)")
        return listed
    if not storage.exists(entry):
        raise InputError(f"{entry}: background not found")
    return [entry]


@dataclass(frozen=True)
class BackgroundPool:
    """Background images by path or URI, in a fixed order. Empty means generated backgrounds.
    ``pool_id`` names the pool in every pair's json: the id of a ``subjectpairs backgrounds`` pool, or
    for any other entries a hash of their URIs."""

    uris: tuple[str, ...]
    pool_id: str | None = None

    @classmethod
    def from_entries(cls, entries: list[str]) -> "BackgroundPool":
        """Entries are pool folders (``backgrounds.parquet`` of ``subjectpairs backgrounds``), images,
        folders of images (searched recursively) or text files of paths/URIs."""
        uris: set[str] = set()
        pool_ids = []
        for entry in entries:
            if is_pool(entry):
                pool_id, pool_uris = read_pool(entry)
                if not pool_uris:
                    raise InputError(f"{entry}: the background pool has no backgrounds")
                pool_ids.append(pool_id)
                uris.update(pool_uris)
            else:
                uris.update(_expand(entry))
        ordered = tuple(sorted(uris))
        if not ordered:
            return cls(ordered)
        if len(entries) == 1 and pool_ids:
            return cls(ordered, pool_ids[0])
        return cls(ordered, hashlib.sha256("\n".join(ordered).encode()).hexdigest()[:16])

    def choose(self, seed: int, key: str) -> str:
        """The background of sample ``key``: a hash of (seed, key), so no shared state between workers."""
        if not self.uris:
            return PROCEDURAL
        draw, _ = sample_rng(seed, key, "background")
        return self.uris[draw % len(self.uris)]

    def background_for(self, seed: int, key: str, shape: tuple[int, int]) -> tuple[str, np.ndarray]:
        """(background id, HxWx3 uint8 background) for sample ``key`` at ``shape``."""
        uri = self.choose(seed, key)
        _, rng = sample_rng(seed, key, "crop")
        if uri == PROCEDURAL:
            return uri, procedural_background(shape, rng)
        try:
            data = storage.read_bytes(uri)
        except (OSError, InputError) as exc:
            raise PairRejected("composite", "background_error", f"{uri}: {exc}") from exc
        try:
            # decode no larger than needed: both sides at least the longer side of the target
            background = decode_image(data, draft_side=max(shape))
        except PairRejected as exc:
            raise PairRejected("composite", exc.reason, f"background {uri}: {exc.detail}") from exc
        return uri, cover_crop(background, shape, rng)


def cover_crop(image: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Scale ``image`` to cover ``shape`` (aspect kept) and crop a random window of that shape."""
    height, width = shape
    src_h, src_w = image.shape[:2]
    scale = max(height / src_h, width / src_w)
    new_size = (max(width, round(src_w * scale)), max(height, round(src_h * scale)))
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
    resized = cv2.resize(image, new_size, interpolation=interpolation)
    top = int(rng.integers(0, resized.shape[0] - height + 1))
    left = int(rng.integers(0, resized.shape[1] - width + 1))
    return np.ascontiguousarray(resized[top:top + height, left:left + width])


def procedural_background(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour field with fine grain: used when no background pool is configured, so a
    single pair can be built with nothing but a photo. Real runs use a pool of photos."""
    height, width = shape
    coarse = rng.uniform(0, 255, size=(3, 4, 3)).astype(np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0.0, 6.0, size=(height, width, 3)).astype(np.float32)
    return np.clip(np.rint(field + grain), 0, 255).astype(np.uint8)


def blend(foreground: np.ndarray, alpha: np.ndarray, background: np.ndarray) -> np.ndarray:
    """alpha * F + (1 - alpha) * B for uint8 F and B; returns uint8 (rounded, saturated)."""
    weight = alpha.astype(np.float32)
    return cv2.blendLinear(foreground, background, weight, 1.0 - weight)
