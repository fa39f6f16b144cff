"""The OpenImages class list: MID <-> DisplayName.

The official file (``class-descriptions-boxable.csv``, and FiftyOne's zoo copy ``metadata/classes.csv``)
has no header and two columns, ``MID,DisplayName``. Display names contain commas in quotes in the full
(non-boxable) list, so this is read with a real CSV parser.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources

from subjectpairs.errors import InputError
from subjectpairs.identifiers import is_label_mid
from subjectpairs.storage import read_bytes


@dataclass(frozen=True)
class ClassList:
    """MIDs and display names in file order."""

    mids: tuple[str, ...]
    names: tuple[str, ...]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if len(self.mids) != len(self.names):
            raise ValueError("mids and names differ in length")

    def __len__(self) -> int:
        return len(self.mids)

    def mids_for_names(self, names: list[str] | tuple[str, ...]) -> dict[str, str]:
        """Resolve display names to MIDs, matched exactly but case-insensitively.

        A name absent from the class file is an error: a typo would otherwise silently keep a class that
        the user meant to exclude.
        """
        by_name: dict[str, list[str]] = {}
        for mid, name in zip(self.mids, self.names):
            by_name.setdefault(name.casefold(), []).append(mid)
        resolved: dict[str, str] = {}
        missing = []
        for name in names:
            mids = by_name.get(name.casefold())
            if not mids:
                missing.append(name)
                continue
            for mid in mids:
                resolved[mid] = name
        if missing:
            raise InputError(
                f"{self.source}: class name(s) not in the class file: {', '.join(repr(m) for m in missing)}"
            )
        return resolved


def parse_class_list(text: str, source: str) -> ClassList:
    mids: list[str] = []
    names: list[str] = []
    seen: dict[str, int] = {}
    for line_no, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise InputError(f"{source}, line {line_no}: expected 2 fields (MID,DisplayName), got {len(row)}")
        mid, name = row[0].strip(), row[1].strip()
        if line_no == 1 and mid.casefold() in {"labelname", "mid"}:
            continue  # tolerate a header line, which some mirrors add
        if not mid.startswith(("/m/", "/g/")) or not is_label_mid(mid):
            raise InputError(f"{source}, line {line_no}: {mid!r} is not an OpenImages MID "
                             "(/m/... or /g/..., then /-separated A-Z a-z 0-9 _ -, at most 128 characters)")
        if not name:
            raise InputError(f"{source}, line {line_no}: empty DisplayName for {mid}")
        if mid in seen:
            raise InputError(f"{source}, line {line_no}: MID {mid} repeats line {seen[mid]}")
        seen[mid] = line_no
        mids.append(mid)
        names.append(name)
    if not mids:
        raise InputError(f"{source}: the class file is empty")
    return ClassList(tuple(mids), tuple(names), source)


def read_class_list(uri: str) -> ClassList:
    data = read_bytes(uri)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{uri}: not UTF-8 text ({exc})") from exc
    return parse_class_list(text, uri)


def bundled_class_list() -> ClassList:
    """The official 601 boxable classes, shipped with the package for offline demos."""
    ref = resources.files("subjectpairs.data").joinpath("class-descriptions-boxable.csv")
    return parse_class_list(ref.read_text(encoding="utf-8"), "subjectpairs/data/class-descriptions-boxable.csv")
