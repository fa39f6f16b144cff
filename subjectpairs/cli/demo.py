"""``subjectpairs demo``: the whole pipeline offline on generated OpenImages-format data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from subjectpairs.cli.build import build_summary
from subjectpairs.cli.common import console
from subjectpairs.cli.filter import funnel_table


def demo_command(
    out: Annotated[Path, typer.Option(help="Folder for the generated data and every output.")] = Path("demo"),
    scenes: Annotated[int, typer.Option(help="Generated scenes besides the real photos.")] = 21,
    seed: Annotated[int, typer.Option(help="Seed of the generated data and the backgrounds.")] = 0,
    train: Annotated[bool, typer.Option(help="Train the tiny model a few steps on the shards, export, generate.")] = True,
    train_steps: Annotated[int, typer.Option(help="Training steps of the demo run.")] = 12,
    review: Annotated[bool, typer.Option(help="Build the FiftyOne review dataset of the demo pairs.")] = True,
) -> None:
    """Run the pipeline offline: photos in OpenImages format -> filter -> shards (GrabCut, local Ray)
    -> a short Ray Train run of the tiny model -> export -> one generated image."""
    from subjectpairs.demo import run_demo

    report = run_demo(out, scenes=scenes, seed=seed, train=train, train_steps=train_steps, review=review)
    console.print(funnel_table(report.filter.funnel))
    build_summary(report.build)
    console.print(f"shards in {report.build.out_dir}; contact sheet: {report.contact_sheet}")
    if report.train is not None:
        last = report.train.last or {}
        console.print(f"trained the tiny model to step {last.get('step')} (loss {last.get('loss', float('nan')):.4f}) "
                      f"-> {report.train.out}; exported to {out / 'model'}; generated {report.generated}")
    if report.review is not None:
        console.print(f"review dataset {report.review.name!r} ({report.review.pairs} pairs, saved views: "
                      f"{', '.join(report.review.views)}); open it with:")
        console.print(f"  subjectpairs review app --name {report.review.name}    # then http://127.0.0.1:5151",
                      soft_wrap=True, highlight=False)
