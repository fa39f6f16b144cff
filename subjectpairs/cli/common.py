"""What the commands share: the printers, bad input as one line and exit code 2, the typed configuration
read from a YAML file and the flags, and flag help taken from the configuration's field descriptions."""

from __future__ import annotations

import importlib

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml
from pydantic import BaseModel
from rich.console import Console
from rich.text import Text

from subjectpairs.configfile import read_config
from subjectpairs.errors import InputError

# Printed text holds paths, keys and messages that users chose: with markup and emoji codes off, a path
# like ``data/[red]x[/bold]`` or ``a:smile:b`` prints as it is; styles are applied with Text objects.
console = Console(markup=False, emoji=False)
errors = Console(stderr=True, markup=False, emoji=False)

ConfigFile = Annotated[Optional[Path], typer.Option(help="YAML config; flags override its keys.")]


def print_error(headline: str, details: str = "") -> None:
    errors.print(Text.assemble((headline, "bold red"), details), highlight=False, soft_wrap=True)


def print_warning(message: str) -> None:
    print_error("WARNING:", f" {message}")


def fail(message: str) -> typer.Exit:
    print_error("error:", f" {message}")
    return typer.Exit(code=2)


@contextmanager
def input_errors() -> Iterator[None]:
    """Bad input (InputError) ends the command with its one-line message and exit code 2."""
    try:
        yield
    except InputError as exc:
        raise fail(str(exc)) from exc


def load_config(model: type[BaseModel], config_file: Path | None, overrides: dict[str, Any]) -> BaseModel:
    """Config file values, then the flags that were given on the command line (those not None), validated
    together; bad input ends the command with one line and exit code 2."""
    with input_errors():
        given = {key: value for key, value in overrides.items() if value is not None}
        return read_config(model, config_file, given)


def parse_settings(pairs: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` overrides of any config key (dotted: ``pair.trimap.low=0.2``); values are YAML."""
    overrides: dict[str, Any] = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise fail(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def field_help(config: str, key: str, note: str = "") -> str:
    """The help of a flag that sets ``key`` (dotted) of the config class ``config`` (``module:Class``), from
    the field's description, so that the two never drift; ``note`` adds what only the command line has
    (``repeatable``).

    Commands call it in their flags' annotations, which ``from __future__ import annotations`` leaves
    unevaluated until typer builds the command line: importing the commands imports no config module."""
    module, _, class_name = config.partition(":")
    model: type[BaseModel] = getattr(importlib.import_module(module), class_name)
    *sections, name = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    description = model.model_fields[name].description
    if not description:
        raise LookupError(f"{model.__name__}.{name} has no description to show as a flag's help")
    text = "; ".join(part for part in (description, note) if part)
    first = text.split(" ", 1)[0]
    if first.replace("-", "").isalpha() and first.islower():  # a word, not a value such as "auto," or a file
        text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."
