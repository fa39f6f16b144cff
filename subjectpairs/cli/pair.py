"""``subjectpairs pair``: one training pair from one photo."""

from __future__ import annotations

from functools import partial

import posixpath
from typing import Annotated, Optional

import typer

from subjectpairs.cli.common import ConfigFile, console, fail, field_help, load_config, print_warning
from subjectpairs.errors import InputError


_help = partial(field_help, "subjectpairs.pipelines.config:PairConfig")


def pair_command(
    image: Annotated[str, typer.Argument(help="Photo path or URI.")],
    category: Annotated[str, typer.Option(help="Subject class name, e.g. 'Dog' (the CLIPSeg prompt).")],
    out: Annotated[str, typer.Option(help="Output folder or URI for the pair.")],
    box: Annotated[
        Optional[str], typer.Option(help="Subject box XMIN,XMAX,YMIN,YMAX normalized as in OpenImages.")
    ] = None,
    trimap: Annotated[Optional[str], typer.Option(help="Use this trimap (gray PNG) instead of segmenting.")] = None,
    background: Annotated[Optional[list[str]], typer.Option(
        help=_help("composite.backgrounds", "repeatable; default: generated"))] = None,
    segmenter: Annotated[Optional[str], typer.Option(help=_help("segmenter.kind"))] = None,
    model: Annotated[Optional[str], typer.Option(help=_help("segmenter.model"))] = None,
    require_clipseg: Annotated[bool, typer.Option(help=_help("segmenter.require_clipseg"))] = False,
    device: Annotated[Optional[str], typer.Option(help=_help("segmenter.device"))] = None,
    size: Annotated[Optional[int], typer.Option(help=_help("size"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_help("seed"))] = None,
    low: Annotated[Optional[float], typer.Option(help=_help("trimap.low"))] = None,
    high: Annotated[Optional[float], typer.Option(help=_help("trimap.high"))] = None,
    box_gate: Annotated[
        Optional[bool], typer.Option("--box-gate/--no-box-gate", help=_help("trimap.box_gate"))
    ] = None,
    quality_gate: Annotated[
        Optional[bool], typer.Option("--quality-gate/--no-quality-gate", help=_help("quality.enabled"))
    ] = None,
    config: ConfigFile = None,
) -> None:
    """Build one training pair: segment, trimap, matte, composite; write the images and meta.json."""
    from subjectpairs import storage
    from subjectpairs.configfile import config_yaml
    from subjectpairs.pipelines.boxes import WHOLE_IMAGE, Box
    from subjectpairs.pipelines.config import PairConfig
    from subjectpairs.pipelines.pairs import PairBuilder, PairRequest, photo_key, write_pair
    from subjectpairs.pipelines.rejections import Rejection
    from subjectpairs.pipelines.segmenters import resolve_segmenter

    settings = load_config(PairConfig, config, {
        "size": size, "seed": seed, "segmenter.kind": segmenter, "segmenter.model": model,
        "segmenter.require_clipseg": require_clipseg or None, "segmenter.device": device,
        "trimap.low": low, "trimap.high": high, "trimap.box_gate": box_gate,
        "composite.backgrounds": background or None, "quality.enabled": quality_gate,
    })
    try:
        # a given trimap needs no segmenter: nothing to resolve, nothing to warn about
        choice = None if trimap is not None else resolve_segmenter(settings.segmenter)
        if choice is not None and (warning := choice.warning()) is not None:
            print_warning(warning)
        subject_box = WHOLE_IMAGE if box is None else Box.parse(box)
        stem = posixpath.splitext(posixpath.basename(image.rstrip("/")))[0]
        request = PairRequest(
            key=photo_key(stem, category), category=category, photo=storage.read_bytes(image), box=subject_box,
            trimap=None if trimap is None else storage.read_bytes(trimap), source=image,
        )
        builder = PairBuilder(settings, choice=choice)
        (result,) = builder.build([request])
    except (InputError, ValueError) as exc:
        raise fail(str(exc)) from exc
    if isinstance(result, Rejection):
        raise fail(f"{image}: rejected at {result.stage}: {result.reason} ({result.detail})")
    write_pair(result, out, {"config.yaml": config_yaml(settings, "pair")})
    metrics = ", ".join(f"{name} {value}" for name, value in result.metrics.items())
    console.print(f"pair {result.key} ({result.segmenter['name']}) -> {out}")
    console.print(f"metrics: {metrics}", highlight=False)
    total = sum(result.seconds.values())
    console.print("seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in result.seconds.items()) + f", total {total:.3f}")
