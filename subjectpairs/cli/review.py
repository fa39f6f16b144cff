"""``subjectpairs review``: audit pairs in FiftyOne (``build``, ``app``) and hand the rejected keys on
(``rejects``)."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Optional

import typer

from subjectpairs.cli.common import (
    ConfigFile,
    console,
    errors,
    field_help,
    input_errors,
    load_config,
    parse_settings,
    print_error,
    print_warning,
)

review_app = typer.Typer(help="Audit pairs in FiftyOne; rejected keys flow back to shards and training.",
                         no_args_is_help=True)


_help = partial(field_help, "subjectpairs.curation.review:ReviewConfig")


@review_app.command("build")
def review_build_command(
    shards: Annotated[str, typer.Option(help="Shard folder or URI (with manifest.json).")],
    name: Annotated[str, typer.Option(help="Name of the persistent FiftyOne dataset.")],
    media_dir: Annotated[Optional[str], typer.Option(help=_help("media_dir"))] = None,
    sample: Annotated[Optional[int], typer.Option(help=_help("sample"))] = None,
    embeddings_model: Annotated[Optional[str], typer.Option(help=_help("embeddings_model"))] = None,
    overwrite: Annotated[bool, typer.Option(help="Start afresh (drops reviewers' tags) instead of syncing.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any config key, e.g. thresholds.small_subject=0.4.")] = None,
    config: ConfigFile = None,
) -> None:
    """Create or sync a grouped review dataset (input/target slices) that mirrors the shards."""
    from subjectpairs.curation.review import ReviewConfig, build_review

    settings = load_config(ReviewConfig, config, {"shards": shards, "name": name, "media_dir": media_dir,
                                                  "sample": sample, "embeddings_model": embeddings_model,
                                                  **parse_settings(set_)})
    with input_errors():
        report = build_review(settings, overwrite=overwrite)
    console.print(f"review dataset {report.name!r}: {report.pairs} pairs ({report.added} added, {report.updated} "
                  f"kept, {report.removed} removed); saved views: {', '.join(report.views)}")
    console.print(f"open it with: subjectpairs review app --name {report.name}")
    if report.rejected:
        print_error(f"{len(report.rejected)} sample(s) not in the review dataset:")
        for rejected in report.rejected:
            errors.print(f"  {rejected.shard} {rejected.key!r}: {rejected.reason} ({rejected.detail})",
                         highlight=False, soft_wrap=True)
    if report.failed_shards:
        print_error(f"{len(report.failed_shards)} shard(s) could not be read:",
                    " " + ", ".join(report.failed_shards))
    if report.rejected or report.failed_shards:
        raise typer.Exit(code=1)


@review_app.command("app")
def review_app_command(
    name: Annotated[str, typer.Option(help="Review dataset name.")],
    port: Annotated[int, typer.Option(help="Port of the App.")] = 5151,
    address: Annotated[str, typer.Option(help="Address to serve on (localhost by default).")] = "127.0.0.1",
) -> None:
    """Serve the FiftyOne App on the review dataset until interrupted."""
    from subjectpairs.curation.review import exposure_warning, launch_app

    warning = exposure_warning(address)
    if warning:
        print_warning(warning)
    with input_errors():
        session = launch_app(name, port=port, address=address)
    console.print(f"FiftyOne App on http://{address}:{port} (Ctrl-C to stop)")
    session.wait(-1)


@review_app.command("rejects")
def review_rejects_command(
    name: Annotated[str, typer.Option(help="Review dataset name.")],
    out: Annotated[str, typer.Option(help="File to write the rejected keys to, one per line.")],
    tag: Annotated[str, typer.Option(help="The reviewers' reject tag (on either slice).")] = "reject",
) -> None:
    """Write the keys of the pairs tagged as rejected, for `shards compact`, `build --exclude`, `train --exclude`."""
    from subjectpairs.curation.review import write_rejects

    with input_errors():
        count = write_rejects(name, out, tag)
    console.print(f"{count} rejected keys -> {out}")
