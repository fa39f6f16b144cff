"""``subjectpairs shards``: work on built shards (``compact``: drop the pairs reviewers rejected)."""

from __future__ import annotations

from typing import Annotated

import typer

from subjectpairs.cli.common import console, input_errors

shards_app = typer.Typer(help="Work on built shards.", no_args_is_help=True)


@shards_app.command("compact")
def shards_compact_command(
    source: Annotated[str, typer.Argument(help="Shard folder or URI of `subjectpairs build` (with manifest.json).")],
    exclude: Annotated[str, typer.Option(help="File of sample keys to remove (reviewers' rejects), one per line.")],
    out: Annotated[str, typer.Option(help="Folder or URI for the compacted shards (not the source).")],
) -> None:
    """Rewrite shards without the pairs an exclude file lists; they become rejects (review, excluded)."""
    from subjectpairs.pipelines.compact import compact_shards

    with input_errors():
        report = compact_shards(source, exclude, out)
    manifest = report.manifest
    dropped = f", {len(report.dropped_shards)} left empty and dropped" if report.dropped_shards else ""
    console.print(
        f"removed {len(report.removed):,} pairs; {manifest['pairs']:,} pairs in {len(manifest['shards'])} "
        f"shards{dropped} -> {report.out_dir}", highlight=False,
    )
    if report.already_rejected:
        console.print(f"{len(report.already_rejected):,} listed keys were already rejects", highlight=False)
    if report.not_found:
        shown = ", ".join(report.not_found[:5]) + (", ..." if len(report.not_found) > 5 else "")
        console.print(f"{len(report.not_found):,} listed keys are not in the corpus: {shown}", highlight=False)
