"""The ``subjectpairs`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from subjectpairs import __version__
from subjectpairs.errors import InputError

app = typer.Typer(
    help="Rebuild the BLIP-Diffusion subject-pair corpus from OpenImages-V6 and train on it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def load_config(model: type[BaseModel], config_file: Path | None, overrides: dict[str, Any]) -> BaseModel:
    """Config file values, then the flags that were given on the command line, validated together."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise _fail(f"{config_file}: cannot read the config file ({exc})") from exc
        if not isinstance(loaded, dict):
            raise _fail(f"{config_file}: expected a mapping of config keys")
        values.update(loaded)
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        target = values.setdefault(section, {}) if section else values
        target[name] = value
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise _fail(f"invalid configuration: {details}") from exc


def funnel_table(funnel: dict) -> Table:
    table = Table(title=f"Subject filter funnel ({funnel['rows']:,} rows read)")
    table.add_column("after rule")
    table.add_column("candidates", justify="right")
    table.add_column("dropped", justify="right")
    for rule, remaining in funnel["after"].items():
        dropped = funnel["dropped"].get(rule)
        table.add_row(rule, f"{remaining:,}", "" if dropped is None else f"{dropped:,}")
    return table


@app.command("filter")
def filter_command(
    out: Annotated[Optional[str], typer.Option(help="Output folder or URI.")] = None,
    bbox: Annotated[Optional[str], typer.Option(help="Box annotation CSV (train, validation or test).")] = None,
    classes: Annotated[Optional[str], typer.Option(help="Class list CSV (MID,DisplayName, no header).")] = None,
    images: Annotated[Optional[str], typer.Option(help="Image list CSV; adds url and rotation.")] = None,
    zoo_dir: Annotated[
        Optional[str], typer.Option(help="A FiftyOne zoo open-images-v6 folder instead of --bbox/--classes.")
    ] = None,
    split: Annotated[Optional[str], typer.Option(help="train, validation or test.")] = None,
    duplicates: Annotated[
        Optional[str], typer.Option(help="paper: drop repeated classes; keep-first: the authors' code.")
    ] = None,
    on_bad_rows: Annotated[
        Optional[str], typer.Option(help="error: stop at the first bad row; skip: record in bad_rows.csv.")
    ] = None,
    min_area: Annotated[Optional[float], typer.Option(help="Keep boxes with area above this.")] = None,
    max_area: Annotated[Optional[float], typer.Option(help="Keep boxes with area below this.")] = None,
    max_aspect: Annotated[Optional[float], typer.Option(help="Drop boxes with max(w/h, h/w) above this.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML config; flags override its keys.")] = None,
) -> None:
    """Filter OpenImages-V6 boxes down to salient single subjects (the paper's six rules)."""
    from subjectpairs.curation.candidates import run_filter
    from subjectpairs.curation.config import FilterConfig

    settings = load_config(FilterConfig, config, {
        "out": out, "bbox": bbox, "classes": classes, "images": images, "zoo_dir": zoo_dir, "split": split,
        "on_bad_rows": on_bad_rows, "rules.duplicates": duplicates, "rules.min_area": min_area,
        "rules.max_area": max_area, "rules.max_aspect": max_aspect,
    })
    try:
        report = run_filter(settings)
    except InputError as exc:
        raise _fail(str(exc)) from exc
    console.print(funnel_table(report.funnel))
    console.print(f"{report.funnel['kept']:,} candidates in {report.funnel['seconds']:.1f} s -> {report.out_dir}")


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option(help="Folder for the generated data and every output.")] = Path("demo"),
    rows: Annotated[int, typer.Option(help="Rows of the generated OpenImages-format box file.")] = 200_000,
    seed: Annotated[int, typer.Option(help="Seed of the generated data.")] = 0,
) -> None:
    """Run the pipeline offline on embedded, generated OpenImages-format data."""
    from subjectpairs.pipelines.demo import run_demo

    report = run_demo(out, rows=rows, seed=seed)
    console.print(funnel_table(report.funnel))
    top = list(report.funnel["per_category"].items())[:5]
    console.print("most frequent categories: " + ", ".join(f"{name} ({count})" for name, count in top))
    console.print(f"{report.funnel['kept']:,} candidates written to {report.out_dir}")


@app.command("version")
def version_command() -> None:
    """Print the version."""
    console.print(__version__)


if __name__ == "__main__":
    app()
