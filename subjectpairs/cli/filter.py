"""``subjectpairs filter``: OpenImages-V6 boxes -> candidates.parquet and the rule funnel."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from subjectpairs.cli.common import ConfigFile, console, input_errors, load_config


def funnel_table(funnel: dict) -> Table:
    table = Table(title=f"Subject filter funnel ({funnel['rows']:,} rows read)")
    table.add_column("after rule")
    table.add_column("candidates", justify="right")
    table.add_column("dropped", justify="right")
    for rule, remaining in funnel["after"].items():
        dropped = funnel["dropped"].get(rule)
        table.add_row(rule, f"{remaining:,}", "" if dropped is None else f"{dropped:,}")
    return table


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
    config: ConfigFile = None,
) -> None:
    """Filter OpenImages-V6 boxes down to salient single subjects (the paper's six rules)."""
    from subjectpairs.curation.candidates import run_filter
    from subjectpairs.curation.config import FilterConfig

    settings = load_config(FilterConfig, config, {
        "out": out, "bbox": bbox, "classes": classes, "images": images, "zoo_dir": zoo_dir, "split": split,
        "on_bad_rows": on_bad_rows, "rules.duplicates": duplicates, "rules.min_area": min_area,
        "rules.max_area": max_area, "rules.max_aspect": max_aspect,
    })
    with input_errors():
        report = run_filter(settings)
    console.print(funnel_table(report.funnel))
    console.print(f"{report.funnel['kept']:,} candidates in {report.funnel['seconds']:.1f} s -> {report.out_dir}")
