"""``subjectpairs build``: candidates -> WebDataset shards of pairs, on Ray; its summary and reject table."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Optional

import typer
from rich.table import Table

from subjectpairs.cli.common import (
    ConfigFile,
    console,
    field_help,
    input_errors,
    load_config,
    parse_settings,
    print_warning,
)


_help = partial(field_help, "subjectpairs.pipelines.config:BuildConfig")


def rejects_table(rejects) -> Table:
    """Rejects by stage, the stages in the order candidates pass them (the build's funnel), then by reason."""
    from subjectpairs.pipelines.rejections import stage_rank

    table = Table(title="Rejected candidates")
    table.add_column("stage")
    table.add_column("reason")
    table.add_column("count", justify="right")
    counts = rejects.groupby(["stage", "reason"]).size().items()
    for (stage, reason), count in sorted(counts, key=lambda row: (stage_rank(row[0][0]), -row[1], row[0][1])):
        table.add_row(stage, reason, f"{count:,}")
    return table


def build_summary(report) -> None:
    stats, manifest = report.stats, report.manifest
    console.print(
        f"{manifest['pairs']:,} pairs and {manifest['rejects']:,} rejects from {manifest['candidates']:,} "
        f"candidates in {len(manifest['shards'])} shards -> {report.out_dir} "
        f"({stats['wall_seconds']:.1f} s, {stats['pairs_per_second'] or 0:.2f} pairs/s; "
        f"{stats['chunks_resumed']} of {stats['chunks']} chunks resumed, "
        f"{stats['retried']:,} earlier retryable rejects tried again)"
    )
    if len(report.rejects):
        console.print(rejects_table(report.rejects))
    stages = ", ".join(f"{name} {seconds:.1f}" for name, seconds in stats["stage_seconds"].items())
    console.print(f"stage seconds (summed over workers): {stages}", highlight=False)
    segmenter = stats["segmenter"]
    if segmenter["fallback"]:
        print_warning(f"segmenter: grabcut instead of CLIPSeg (auto: {segmenter['reason']}); "
                      "not the paper's recipe")
    else:
        console.print(f"segmenter: {segmenter['name']} ({segmenter['reason']})", highlight=False)


def build_command(
    out: Annotated[Optional[str], typer.Option(help="Output folder or URI for shards and manifest.")] = None,
    candidates: Annotated[Optional[str], typer.Option(help=_help("candidates"))] = None,
    bbox: Annotated[Optional[str], typer.Option(help="Or run the filter first: box annotation CSV.")] = None,
    classes: Annotated[Optional[str], typer.Option(help="With --bbox: the class list CSV.")] = None,
    images: Annotated[Optional[str], typer.Option(help=_help("images"))] = None,
    backgrounds: Annotated[
        Optional[list[str]], typer.Option(help=_help("pair.composite.backgrounds", "repeatable"))
    ] = None,
    captions: Annotated[Optional[str], typer.Option(help=_help("captions"))] = None,
    segmenter: Annotated[Optional[str], typer.Option(help=_help("pair.segmenter.kind"))] = None,
    model: Annotated[Optional[str], typer.Option(help=_help("pair.segmenter.model"))] = None,
    require_clipseg: Annotated[bool, typer.Option(help=_help("pair.segmenter.require_clipseg"))] = False,
    size: Annotated[Optional[int], typer.Option(help=_help("pair.size"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_help("pair.seed"))] = None,
    samples_per_shard: Annotated[Optional[int], typer.Option(help=_help("shards.samples"))] = None,
    limit: Annotated[Optional[int], typer.Option(help=_help("limit"))] = None,
    exclude: Annotated[Optional[str], typer.Option(help=_help("exclude"))] = None,
    address: Annotated[Optional[str], typer.Option(help=_help("address"))] = None,
    max_tasks: Annotated[Optional[int], typer.Option(help=_help("max_tasks"))] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a build made with another configuration.")] = False,
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Any config key: --set pair.trimap.low=0.2; repeatable.")
    ] = None,
    config: ConfigFile = None,
) -> None:
    """Build WebDataset shards of pairs from candidates, on Ray (local unless --address/RAY_ADDRESS)."""
    from subjectpairs.pipelines.build import run_build
    from subjectpairs.pipelines.config import BuildConfig

    settings = load_config(BuildConfig, config, {
        "out": out, "candidates": candidates, "images": images, "captions": captions, "limit": limit,
        "exclude": exclude, "address": address, "max_tasks": max_tasks, "pair.composite.backgrounds": backgrounds or None,
        "pair.segmenter.kind": segmenter, "pair.segmenter.model": model,
        "pair.segmenter.require_clipseg": require_clipseg or None, "pair.size": size, "pair.seed": seed,
        "shards.samples": samples_per_shard, "filter.bbox": bbox, "filter.classes": classes,
        **parse_settings(set_),
    })
    with input_errors():
        report = run_build(settings, overwrite=overwrite, warn=print_warning)
    build_summary(report)
