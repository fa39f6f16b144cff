"""DreamBench (the DreamBooth data set; Ruiz et al., CVPR 2023) read from its official layout.

``ROOT/prompts_and_classes.txt`` holds the subjects and their classes (``subject_name,class``) and two
Python prompt lists, one for objects and one for live subjects, each entry
``'a {0} {1} in the jungle'.format(unique_token, class_token)``; ``ROOT/<subject>/NN.jpg`` are the photos.
DreamBooth's live subjects are its cats and dogs (9 of the 30), which the file itself does not mark.

For a model that takes the subject from a photo, the unique token goes: ``a dog in the jungle``, with the
class (``dog``) as the subject's category.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from subjectpairs.errors import InputError
from subjectpairs.identifiers import is_sample_key

PROMPTS_FILE = "prompts_and_classes.txt"
# DreamBooth's live subjects (its dog and cat photos) take the live prompt list, every other class the object one.
LIVE_CLASSES = frozenset({"dog", "cat"})
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_PROMPT = re.compile(r"""['"](?P<template>[^'"]*)['"]\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)""")
_SECTIONS = ("Classes", "Object Prompts", "Live Subject Prompts")
_HEADINGS = _SECTIONS + ("Prompts",)  # "Prompts" heads the two lists and holds nothing itself


@dataclass(frozen=True)
class BenchSubject:
    name: str
    category: str
    photos: tuple[Path, ...]

    @property
    def live(self) -> bool:
        return self.category in LIVE_CLASSES


@dataclass(frozen=True)
class DreamBench:
    root: Path
    classes: dict[str, str]  # every subject the file lists -> its class
    object_templates: tuple[str, ...]
    live_templates: tuple[str, ...]

    def prompts(self, subject: BenchSubject) -> list[str]:
        """The subject's prompt list with the unique token dropped and its class filled in."""
        templates = self.live_templates if subject.live else self.object_templates
        return [fill_prompt(template, subject.category) for template in templates]

    def present(self) -> list[str]:
        """Subjects of the file that have a photo folder here, in the file's order."""
        return [name for name in self.classes if _photos(self.root / name)]

    def subject(self, name: str) -> BenchSubject:
        if name not in self.classes:
            raise InputError(f"{self.root}: no subject {name!r} in {PROMPTS_FILE} (it lists "
                             f"{', '.join(list(self.classes)[:8])}, ...)")
        photos = _photos(self.root / name)
        if not photos:
            raise InputError(f"{self.root / name}: no photos of subject {name!r} (.jpg, .jpeg, .png, .webp)")
        return BenchSubject(name, self.classes[name], photos)

    def subjects(self, names: list[str] | None = None) -> list[BenchSubject]:
        """The named subjects (default: every one with photos here), each checked."""
        chosen = names or self.present()
        if not chosen:
            raise InputError(f"{self.root}: none of the {len(self.classes)} subjects of {PROMPTS_FILE} has a "
                             "photo folder")
        return [self.subject(name) for name in chosen]


def fill_prompt(template: str, category: str) -> str:
    """``'a {0} {1} in the snow'`` -> ``'a dog in the snow'`` (the unique token left out)."""
    return " ".join(template.format("", category).split())


def _photos(folder: Path) -> tuple[Path, ...]:
    if not folder.is_dir():
        return ()
    return tuple(sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES))


def read_dreambench(root: str | Path) -> DreamBench:
    """Parse ``ROOT/prompts_and_classes.txt``; a missing or malformed file is one InputError."""
    root = Path(root).expanduser()
    path = root / PROMPTS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the DreamBench prompt and class list ({exc})") from exc
    sections = _split_sections(text, path)
    classes: dict[str, str] = {}
    for line in sections["Classes"].splitlines():
        line = line.strip()
        if not line or line.replace(" ", "") == "subject_name,class":
            continue
        name, sep, category = line.partition(",")
        if not sep or not name.strip() or not category.strip():
            raise InputError(f"{path}: class line {line!r} is not 'subject_name,class'")
        if not is_sample_key(name.strip()):
            # a subject's name becomes folder and file names of the evaluation: nothing that climbs out of it
            raise InputError(f"{path}: subject name {name.strip()!r} is not 1-200 characters of A-Z a-z 0-9 _ - "
                             "starting with a letter or digit")
        classes[name.strip()] = category.strip()
    templates = {}
    for section in _SECTIONS[1:]:
        found = tuple(m.group("template") for m in _PROMPT.finditer(sections[section]))
        if not found or any(t.count("{0}") != 1 or t.count("{1}") != 1 for t in found):
            raise InputError(f"{path}: the {section!r} list has no prompts of the form "
                             "'a {0} {1} ...'.format(unique_token, class_token)")
        templates[section] = found
    if not classes:
        raise InputError(f"{path}: no subject_name,class lines under 'Classes'")
    return DreamBench(root, classes, templates["Object Prompts"], templates["Live Subject Prompts"])


def _split_sections(text: str, path: Path) -> dict[str, str]:
    lines = text.splitlines()
    starts = {}
    for index, line in enumerate(lines):
        if line.strip() in _HEADINGS and line.strip() not in starts:
            starts[line.strip()] = index
    missing = [name for name in _SECTIONS if name not in starts]
    if missing:
        raise InputError(f"{path}: not DreamBench's prompt and class list (no {', '.join(repr(m) for m in missing)} "
                         "section)")
    order = sorted(starts.items(), key=lambda item: item[1]) + [("", len(lines))]
    return {name: "\n".join(lines[start + 1:order[i + 1][1]]) for i, (name, start) in enumerate(order[:-1])}
