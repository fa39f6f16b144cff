"""The ``subjectpairs`` command line."""

from __future__ import annotations

import posixpath
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


@app.command("pair")
def pair_command(
    image: Annotated[str, typer.Argument(help="Photo path or URI.")],
    category: Annotated[str, typer.Option(help="Subject class name, e.g. 'Dog' (the CLIPSeg prompt).")],
    out: Annotated[str, typer.Option(help="Output folder or URI for the pair.")],
    box: Annotated[
        Optional[str], typer.Option(help="Subject box XMIN,XMAX,YMIN,YMAX normalized as in OpenImages.")
    ] = None,
    trimap: Annotated[Optional[str], typer.Option(help="Use this trimap (gray PNG) instead of segmenting.")] = None,
    background: Annotated[
        Optional[list[str]],
        typer.Option(help="Background image, folder of images, or list file; repeatable. Default: generated."),
    ] = None,
    segmenter: Annotated[Optional[str], typer.Option(help="auto, clipseg or grabcut.")] = None,
    model: Annotated[Optional[str], typer.Option(help="CLIPSeg hub id or local folder.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Short side of the pair (never upscaled).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the background choice and crop.")] = None,
    low: Annotated[Optional[float], typer.Option(help="Normalized map at or below this is background.")] = None,
    high: Annotated[Optional[float], typer.Option(help="Normalized map above this is foreground.")] = None,
    box_gate: Annotated[
        Optional[bool], typer.Option("--box-gate/--no-box-gate", help="Zero the map outside the padded box.")
    ] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML config; flags override its keys.")] = None,
) -> None:
    """Build one training pair: segment, trimap, matte, composite; write the images and meta.json."""
    from subjectpairs import storage
    from subjectpairs.configfile import config_yaml
    from subjectpairs.pipelines.boxes import WHOLE_IMAGE, Box
    from subjectpairs.pipelines.config import PairConfig
    from subjectpairs.pipelines.pairs import PairBuilder, PairRequest, sample_key, write_pair
    from subjectpairs.pipelines.rejections import Rejection

    settings = load_config(PairConfig, config, {
        "size": size, "seed": seed, "segmenter.kind": segmenter, "segmenter.model": model,
        "segmenter.device": device, "trimap.low": low, "trimap.high": high, "trimap.box_gate": box_gate,
        "composite.backgrounds": background or None,
    })
    try:
        subject_box = WHOLE_IMAGE if box is None else Box.parse(box)
        stem = posixpath.splitext(posixpath.basename(image.rstrip("/")))[0]
        request = PairRequest(
            key=sample_key(stem, category), category=category, photo=storage.read_bytes(image), box=subject_box,
            trimap=None if trimap is None else storage.read_bytes(trimap), source=image,
        )
        builder = PairBuilder(settings)
        (result,) = builder.build([request])
    except (InputError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    if isinstance(result, Rejection):
        raise _fail(f"{image}: rejected at {result.stage}: {result.reason} ({result.detail})")
    write_pair(result, out, {"config.yaml": config_yaml(settings, "pair")})
    metrics = ", ".join(f"{name} {value}" for name, value in result.metrics.items())
    console.print(f"pair {result.key} ({result.segmenter['name']}) -> {out}")
    console.print(f"metrics: {metrics}", highlight=False)
    total = sum(result.seconds.values())
    console.print("seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in result.seconds.items()) + f", total {total:.3f}")


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
