"""Errors that reach users as one clear line instead of a traceback."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class InputError(ValueError):
    """Bad input: names the file, the line where known, and the problem."""


def validation_problems(error: ValidationError, whole: str, shown: int | None = None) -> str:
    """pydantic's errors on one line, ``field.path: message`` joined by ``; `` (``whole`` names an error of the
    whole input), the first ``shown`` of them and how many more."""
    problems = [f"{'.'.join(str(part) for part in problem['loc']) or whole}: {problem['msg']}"
                for problem in error.errors()]
    more = len(problems) - shown if shown is not None else 0
    return "; ".join(problems[:shown]) + (f"; and {more} more" if more > 0 else "")
