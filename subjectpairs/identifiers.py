"""The grammars of the identifiers that become file and tar member names (docs/FORMAT.md, "Identifiers").

ImageIDs name photos (``<images>/<ImageID>.jpg``) and, with label MIDs, sample keys; sample keys name tar
members (``<key>.input.jpg``) and review media files. Anything outside these grammars could climb out of a
folder (``../``), name an absolute path, or (with a dot) be split by webdataset at the wrong place and lose
its sample, so every reader checks them before a name is built from one.

- ImageID: OpenImages' own are 16 lowercase hex digits; other corpora may use 1-128 characters of
  ``A-Z a-z 0-9 _ -``, starting with a letter or digit.
- Label MID: ``/m/...`` or ``/g/...`` as in OpenImages' class list, or any ``/``-separated segments of
  ``A-Z a-z 0-9 _ -``; at most 128 characters.
- Sample key: 1-200 characters of ``A-Z a-z 0-9 _ -``, starting with a letter or digit: no dot (webdataset
  splits member names at the first dot), no slash. 200, not 255: a key names files such as
  ``.<key>.target.jpg.partial``, which must stay within the 255 bytes a file name may have.
"""

from __future__ import annotations

import re

IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
LABEL_MID = re.compile(r"/?[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*")
MAX_LABEL_MID = 128
SAMPLE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,199}")


def is_image_id(value: object) -> bool:
    return isinstance(value, str) and IMAGE_ID.fullmatch(value) is not None


def is_label_mid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_LABEL_MID and LABEL_MID.fullmatch(value) is not None


def is_sample_key(value: object) -> bool:
    return isinstance(value, str) and SAMPLE_KEY.fullmatch(value) is not None


def check_image_id(value: object, where: str) -> str:
    """``value`` if it is a valid ImageID, else ValueError naming ``where`` and the grammar."""
    if not is_image_id(value):
        raise ValueError(f"{where}: ImageID {value!r} is not valid (16 hex digits, or 1-128 of A-Z a-z 0-9 _ -)")
    return value  # type: ignore[return-value]


def check_label_mid(value: object, where: str) -> str:
    if not is_label_mid(value):
        raise ValueError(f"{where}: label MID {value!r} is not valid (/m/..., or /-separated A-Z a-z 0-9 _ -)")
    return value  # type: ignore[return-value]


def check_sample_key(value: object, where: str) -> str:
    if not is_sample_key(value):
        raise ValueError(f"{where}: sample key {value!r} is not valid (1-200 of A-Z a-z 0-9 _ -, no dot or slash)")
    return value  # type: ignore[return-value]
