"""Configs written next to outputs, so every run can be reproduced with ``--config``, and read back: a
``--config`` file under the command line's flags, or the config an earlier run left in its folder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from subjectpairs import __version__
from subjectpairs.errors import InputError, validation_problems

# The config every command writes beside its output.
CONFIG_FILE = "config.yaml"

# ``json_schema_extra`` of a field that decides how a run goes (where, how fast, on which cluster), not what
# it makes: such fields are left out of the hashes that tell whether two runs make the same output.
RUN_ONLY = {"run_only": True}

# validation errors shown in a message; a file of another command's config has dozens
_SHOWN_ERRORS = 5

Config = TypeVar("Config", bound=BaseModel)


def config_yaml(config: BaseModel, command: str) -> bytes:
    header = f"# subjectpairs {__version__} {command} configuration; rerun with: subjectpairs {command} --config THIS\n"
    return (header + yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)).encode()


def read_config(
    model: type[Config], uri: str | Path | None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """The config in YAML file ``uri`` (a local path or a URI; None: no file) with ``overrides`` on top, keys
    dotted into sections (``pair.trimap.low``), validated as ``model``. Bad input is one InputError naming
    the file: unreadable, not YAML, not a mapping, or invalid (each problem as ``key: message``)."""
    values: dict[str, Any] = {}
    if uri is not None:
        from subjectpairs import storage  # here: the command line starts without pyarrow and fsspec

        try:
            loaded = yaml.safe_load(storage.read_bytes(uri)) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{uri}: not YAML ({_yaml_problem(exc)})") from exc
        if not isinstance(loaded, dict):
            raise InputError(f"{uri}: expected a mapping of config keys, found {type(loaded).__name__}")
        values.update(loaded)
    for key, value in (overrides or {}).items():
        *sections, name = key.split(".")
        target = values
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise InputError(f"{key}: {section} is not a section of the configuration")
        target[name] = value
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        details = validation_problems(exc, "config", _SHOWN_ERRORS)
        raise InputError(f"{uri}: invalid configuration: {details}" if uri is not None
                         else f"invalid configuration: {details}") from exc


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where, without the parser's quoted excerpt."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(exc).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def run_only_fields(model: type[BaseModel]) -> dict[str, Any]:
    """``model_dump``'s ``exclude`` of the fields marked RUN_ONLY, those of nested models included."""
    exclude: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        marks = field.json_schema_extra
        if isinstance(marks, dict) and RUN_ONLY.items() <= marks.items():
            exclude[name] = True
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            nested = run_only_fields(field.annotation)
            if nested:
                exclude[name] = nested
    return exclude


def hashed_settings(config: BaseModel) -> dict[str, Any]:
    """What decides a run's output: ``config`` as JSON values without its run-only fields."""
    return config.model_dump(mode="json", exclude=run_only_fields(type(config)))
