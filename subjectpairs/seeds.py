"""Seeded values that are the same in every process, run and machine (unlike ``hash``)."""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from values: seeds generators and orders items (sort by it) reproducibly."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
