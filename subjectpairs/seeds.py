"""Seeded values that are the same in every process, run and machine (unlike ``hash``)."""

from __future__ import annotations

import hashlib

import numpy as np


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from values: seeds generators and orders items (sort by it) reproducibly."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def keyed_digest(*parts: object) -> bytes:
    """SHA-256 of the values joined by NUL: the seeds of the pair stages (background choice and crop,
    caption sampling), whose outputs are in the shards, so it stays what the shards were built with."""
    return hashlib.sha256("\0".join(str(part) for part in parts).encode()).digest()


def sample_rng(seed: int, key: str, purpose: str) -> tuple[int, np.random.Generator]:
    """A 64-bit draw and a generator, both fixed by (seed, key, purpose)."""
    digest = keyed_digest(seed, key, purpose)
    return int.from_bytes(digest[:8], "little"), np.random.default_rng(int.from_bytes(digest[8:24], "little"))
