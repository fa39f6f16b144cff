"""``subjectpairs backgrounds``: a background pool for ``build --backgrounds``."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Optional

import typer

from subjectpairs.cli.common import (
    ConfigFile,
    console,
    fail,
    field_help,
    input_errors,
    load_config,
    parse_settings,
)


_help = partial(field_help, "subjectpairs.curation.config:BackgroundConfig")


def backgrounds_command(
    out: Annotated[Optional[str], typer.Option(help="Pool folder or URI: backgrounds.parquet, funnel.json.")] = None,
    from_openimages: Annotated[bool, typer.Option(help="Pick scene-like photos from OpenImages boxes.")] = False,
    bbox: Annotated[Optional[str], typer.Option(help=_help("bbox"))] = None,
    classes: Annotated[Optional[str], typer.Option(help="With --from-openimages: the class list CSV.")] = None,
    images: Annotated[Optional[str], typer.Option(help=_help("images"))] = None,
    image_root: Annotated[Optional[str], typer.Option(help=_help("image_root"))] = None,
    from_folder: Annotated[Optional[str], typer.Option(help=_help("folder"))] = None,
    count: Annotated[Optional[int], typer.Option(help="Backgrounds to select (the paper: 59000).")] = None,
    min_side: Annotated[Optional[int], typer.Option(help="Folder mode: shortest side allowed.")] = None,
    exclude_candidates: Annotated[Optional[str], typer.Option(help=_help("exclude_candidates"))] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the selection order.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any config key, e.g. max_boxes=4.")] = None,
    config: ConfigFile = None,
) -> None:
    """Make a background pool (`build --backgrounds POOL`): scene-like OpenImages photos or your own."""
    from subjectpairs.curation.config import BackgroundConfig
    from subjectpairs.curation.backgrounds import build_pool

    if from_openimages and not bbox:
        raise fail("--from-openimages needs --bbox and --classes")
    settings = load_config(BackgroundConfig, config, {
        "out": out, "bbox": bbox, "classes": classes, "images": images, "image_root": image_root,
        "folder": from_folder, "count": count, "min_side": min_side, "exclude_candidates": exclude_candidates,
        "seed": seed, **parse_settings(set_),
    })
    with input_errors():
        report = build_pool(settings)
    funnel = report.funnel
    dropped = ", ".join(f"{k} {v:,}" for k, v in funnel["dropped"].items()) or "none"
    console.print(f"{funnel['selected']:,} backgrounds of {funnel['images']:,} images (dropped: {dropped}) -> "
                  f"{report.out} (pool {funnel['pool_id']})")
