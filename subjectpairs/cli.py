"""The ``subjectpairs`` command line."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from subjectpairs import __version__
from subjectpairs.errors import InputError
from subjectpairs.training.inference_defaults import (
    GUIDANCE_SCALE,
    NUM_INFERENCE_STEPS,
    PROMPT_REPS,
    PROMPT_STRENGTH,
)

app = typer.Typer(
    help="Rebuild the BLIP-Diffusion subject-pair corpus from OpenImages-V6 and train on it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Printed text holds paths, keys and messages that users chose: with markup and emoji codes off, a path
# like ``data/[red]x[/bold]`` or ``a:smile:b`` prints as it is; styles are applied with Text objects.
console = Console(markup=False, emoji=False)
errors = Console(stderr=True, markup=False, emoji=False)


def _print_error(headline: str, details: str = "") -> None:
    errors.print(Text.assemble((headline, "bold red"), details), highlight=False, soft_wrap=True)


def _print_warning(message: str) -> None:
    _print_error("WARNING:", f" {message}")


def _fail(message: str) -> typer.Exit:
    _print_error("error:", f" {message}")
    return typer.Exit(code=2)


@contextmanager
def input_errors() -> Iterator[None]:
    """Bad input (InputError) ends the command with its one-line message and exit code 2."""
    try:
        yield
    except InputError as exc:
        raise _fail(str(exc)) from exc


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
        *sections, name = key.split(".")
        target = values
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise _fail(f"{key}: {section} is not a section of the configuration")
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
    with input_errors():
        report = run_filter(settings)
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
    require_clipseg: Annotated[
        bool, typer.Option(help="Stop instead of letting --segmenter auto fall back to GrabCut.")
    ] = False,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Short side of the pair (never upscaled).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the background choice and crop.")] = None,
    low: Annotated[Optional[float], typer.Option(help="Normalized map at or below this is background.")] = None,
    high: Annotated[Optional[float], typer.Option(help="Normalized map above this is foreground.")] = None,
    box_gate: Annotated[
        Optional[bool], typer.Option("--box-gate/--no-box-gate", help="Zero the map outside the padded box.")
    ] = None,
    quality_gate: Annotated[
        Optional[bool],
        typer.Option("--quality-gate/--no-quality-gate", help="Reject a pair outside the bounds quality.*."),
    ] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML config; flags override its keys.")] = None,
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
            _print_warning(warning)
        subject_box = WHOLE_IMAGE if box is None else Box.parse(box)
        stem = posixpath.splitext(posixpath.basename(image.rstrip("/")))[0]
        request = PairRequest(
            key=photo_key(stem, category), category=category, photo=storage.read_bytes(image), box=subject_box,
            trimap=None if trimap is None else storage.read_bytes(trimap), source=image,
        )
        builder = PairBuilder(settings, choice=choice)
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


def parse_settings(pairs: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` overrides of any config key (dotted: ``pair.trimap.low=0.2``); values are YAML."""
    overrides: dict[str, Any] = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _fail(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


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
        _print_warning(f"segmenter: grabcut instead of CLIPSeg (auto: {segmenter['reason']}); "
                       "not the paper's recipe")
    else:
        console.print(f"segmenter: {segmenter['name']} ({segmenter['reason']})", highlight=False)


@app.command("build")
def build_command(
    out: Annotated[Optional[str], typer.Option(help="Output folder or URI for shards and manifest.")] = None,
    candidates: Annotated[Optional[str], typer.Option(help="candidates.parquet from `subjectpairs filter`.")] = None,
    bbox: Annotated[Optional[str], typer.Option(help="Or run the filter first: box annotation CSV.")] = None,
    classes: Annotated[Optional[str], typer.Option(help="With --bbox: the class list CSV.")] = None,
    images: Annotated[
        Optional[str], typer.Option(help="Folder or URI prefix of <ImageID>.jpg (default: filepath or url column).")
    ] = None,
    backgrounds: Annotated[
        Optional[list[str]], typer.Option(help="Background folder, URI prefix, list file or image; repeatable.")
    ] = None,
    captions: Annotated[Optional[str], typer.Option(help="captions.jsonl (image_id, label, captions).")] = None,
    segmenter: Annotated[Optional[str], typer.Option(help="auto, clipseg or grabcut.")] = None,
    model: Annotated[Optional[str], typer.Option(help="CLIPSeg hub id or local folder.")] = None,
    require_clipseg: Annotated[
        bool, typer.Option(help="Stop at start-up instead of letting --segmenter auto fall back to GrabCut.")
    ] = False,
    size: Annotated[Optional[int], typer.Option(help="Short side of the pairs.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of backgrounds and crops.")] = None,
    samples_per_shard: Annotated[Optional[int], typer.Option(help="Candidates planned per shard.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Build only the first N candidates (by key).")] = None,
    exclude: Annotated[
        Optional[str], typer.Option(help="File of sample keys not to build (reviewers' rejects), one per line.")
    ] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray address (default: RAY_ADDRESS, else local Ray).")] = None,
    max_tasks: Annotated[Optional[int], typer.Option(help="Shard tasks in flight (default: cluster CPUs).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a build made with another configuration.")] = False,
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Any config key: --set pair.trimap.low=0.2; repeatable.")
    ] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML config; flags override its keys.")] = None,
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
        report = run_build(settings, overwrite=overwrite, warn=_print_warning)
    build_summary(report)


shards_app = typer.Typer(help="Work on built shards.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")


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


def _comma_list(values: list[str] | None) -> list[str] | None:
    """Repeatable options that also take comma-separated lists."""
    if not values:
        return None
    return [part for value in values for part in value.split(",") if part]


@app.command("train")
def train_command(
    shards: Annotated[Optional[list[str]], typer.Option(help="Pair shard folders/URIs (comma-separated or repeated).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Run folder or URI: checkpoints, metrics.jsonl, config.yaml.")] = None,
    model: Annotated[Optional[str], typer.Option(help="tiny or blip-diffusion (size of a random model).")] = None,
    init: Annotated[Optional[str], typer.Option(help="Start from a diffusers BLIP-Diffusion folder or hub id.")] = None,
    stable_diffusion: Annotated[Optional[str], typer.Option(help="Or start from SD-1.5 (folder or hub id) ...")] = None,
    qformer: Annotated[Optional[str], typer.Option(help="... with this Q-Former (folder, BLIP-Diffusion layout).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Ray Train workers (one per GPU).")] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(help="Default: 1 when the cluster has GPUs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Samples per worker per step.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Train until this step.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of initialization, data order, noise.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    exclude: Annotated[Optional[str], typer.Option(help="File of pair keys to leave out, one per line.")] = None,
    latents: Annotated[Optional[list[str]], typer.Option(help="Latent folders from `subjectpairs latents`, one per shard folder.")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray address (default: RAY_ADDRESS, else local Ray).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any config key: --set lr=1e-5; repeatable.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML config; flags override its keys.")] = None,
) -> None:
    """Pre-train the subject representation on pair shards with Ray Train (DDP), resumable exactly."""
    from subjectpairs.training.config import TrainConfig
    from subjectpairs.training.trainer import run_training

    settings = load_config(TrainConfig, config, {
        "shards": _comma_list(shards), "out": out, "model": model, "init": init, "workers": workers,
        "stable_diffusion": stable_diffusion, "qformer": qformer,
        "gpus_per_worker": gpus_per_worker, "batch_size": batch_size, "max_steps": max_steps, "seed": seed,
        "resume": resume or None, "exclude": exclude, "latents": _comma_list(latents), "address": address,
        **parse_settings(set_),
    })
    with input_errors():
        report = run_training(settings)
    last = report.last or {}
    console.print(f"trained to step {last.get('step', report.resumed_from)} (from {report.resumed_from}) -> {report.out}; "
                  f"last loss {last.get('loss', float('nan')):.4f}, {last.get('samples_per_s', 0):.1f} samples/s")


@app.command("export")
def export_command(
    run: Annotated[str, typer.Argument(help="Run folder or URI of `subjectpairs train`.")],
    out: Annotated[str, typer.Option(help="Folder for the diffusers BLIP-Diffusion layout.")],
    step: Annotated[Optional[int], typer.Option(help="Checkpoint step (default: the latest).")] = None,
) -> None:
    """Export a run's checkpoint as a diffusers BLIP-Diffusion folder (for --init and generate)."""
    from subjectpairs.training.export import export_run

    with input_errors():
        checkpoint = export_run(run, out, step)
    console.print(f"exported {checkpoint} -> {out}")


def generated_image_paths(out: Path, count: int) -> list[Path]:
    """``out`` for one image, ``STEM-0.SUFFIX``, ``STEM-1.SUFFIX``, ... beside it for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{index}{out.suffix}") for index in range(count)]


@app.command("generate")
def generate_command(
    model: Annotated[str, typer.Option(help="Diffusers BLIP-Diffusion folder or hub id.")],
    subject_image: Annotated[Path, typer.Option(help="Photo of the subject (cropped to it).")],
    category: Annotated[str, typer.Option(help="The subject's category in the photo (the source), e.g. dog.")],
    prompt: Annotated[str, typer.Option(help="What to show, after \"a {target category}\", e.g. \"on the beach\".")],
    out: Annotated[Path, typer.Option(help="Image to write (PNG, JPEG, ...); STEM-N.SUFFIX for several.")],
    target_category: Annotated[Optional[str], typer.Option(
        help="The category the prompt names (default: --category), e.g. to render a dog's look as a cat.")] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = NUM_INFERENCE_STEPS,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale; off at 1 or below.")] = GUIDANCE_SCALE,
    seed: Annotated[int, typer.Option(help="Seed of the CPU generator that draws the initial noise.")] = 0,
    negative_prompt: Annotated[str, typer.Option(help="Text of the unconditional branch.")] = "",
    prompt_strength: Annotated[float, typer.Option(
        help="The prompt is repeated int(strength x reps) times.")] = PROMPT_STRENGTH,
    prompt_reps: Annotated[int, typer.Option(help="See --prompt-strength.")] = PROMPT_REPS,
    height: Annotated[Optional[int], typer.Option(help="Image height (default: the model's, 512 for SD-1.5).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Image width (default: the model's).")] = None,
    num_images: Annotated[int, typer.Option(min=1, help="Images of the prompt, one batch from one generator.")] = 1,
    scheduler: Annotated[Optional[str], typer.Option(
        help="Sampler: the folder's (PNDM for the released model) or one of diffusers' by name, e.g. DDIM.")] = None,
    qformer_tokenizer: Annotated[Optional[str], typer.Option(
        help="BERT tokenizer folder or hub id of the Q-Former (default: the one qformer/config.json names).")] = None,
) -> None:
    """Zero-shot subject-driven generation as the authors and diffusers' BlipDiffusionPipeline do it."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from subjectpairs.training.pipeline_blip_diffusion import BlipDiffusionPipeline, build_prompt
    from subjectpairs.training.schedulers import scheduler_class_name

    paths = generated_image_paths(out, num_images)
    if out.suffix.lower() not in Image.registered_extensions():
        raise _fail(f"--out {out}: not an image file name (PNG, JPEG, ...)")
    if subject_image.resolve() in {path.resolve() for path in paths}:
        raise _fail(f"--out {out}: would overwrite the subject image")
    with input_errors():
        build_prompt(prompt, target_category or category, prompt_strength, prompt_reps)
        if scheduler:
            scheduler_class_name(scheduler)
    try:
        subject = Image.open(subject_image)
        subject.load()
    except (OSError, UnidentifiedImageError) as exc:
        raise _fail(f"{subject_image}: cannot read the subject image ({exc})") from exc
    try:
        with input_errors():
            pipeline = BlipDiffusionPipeline.from_pretrained(model, scheduler=scheduler,
                                                             qformer_tokenizer=qformer_tokenizer, progress=True)
    except OSError as exc:
        raise _fail(f"{model}: cannot load the model ({exc})") from exc
    if torch.cuda.is_available():
        pipeline = pipeline.to("cuda")
    with input_errors():
        images = pipeline([prompt] * num_images, subject, category, target_category, guidance_scale=guidance,
                          height=height, width=width, num_inference_steps=steps,
                          generator=torch.Generator().manual_seed(seed), neg_prompt=negative_prompt,
                          prompt_strength=prompt_strength, prompt_reps=prompt_reps)
    out.parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths):
        try:
            image.save(path)
        except (OSError, ValueError) as exc:
            raise _fail(f"{path}: cannot write the image ({exc})") from exc
        console.print(f"{image.size[0]}x{image.size[1]} -> {path}")


@app.command("latents")
def latents_command(
    shards: Annotated[list[str], typer.Option(help="Pair shard folders/URIs (comma-separated or repeated).")],
    out: Annotated[str, typer.Option(help="Folder or URI for the latent shards.")],
    model: Annotated[str, typer.Option(help="tiny or blip-diffusion: the run's --model.")] = "blip-diffusion",
    init: Annotated[Optional[str], typer.Option(help="The run's --init (its VAE encodes).")] = None,
    seed: Annotated[int, typer.Option(help="The run's --seed (random models).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Targets per VAE call.")] = 32,
    address: Annotated[Optional[str], typer.Option(help="Ray address (default: RAY_ADDRESS, else local Ray).")] = None,
) -> None:
    """Precompute the targets' VAE latents as side-car shards for `train --latents`."""
    from subjectpairs.training.latents import VaeSource, write_latents

    if model not in ("tiny", "blip-diffusion"):
        raise _fail(f"--model {model}: expected tiny or blip-diffusion")
    with input_errors():
        manifest = write_latents(_comma_list(shards), out, VaeSource(model, init, seed), batch_size, address)
    total = sum(entry["samples"] for entry in manifest["shards"])
    skipped = [item for entry in manifest["shards"] for item in entry["skipped"]]
    console.print(f"{total:,} latents in {len(manifest['shards'])} shards -> {out}")
    if skipped:
        errors.print(f"{len(skipped)} targets did not decode and have no latent (listed under `skipped` in "
                     f"manifest.json), e.g. {skipped[0]['key']}: {skipped[0]['reason']}", highlight=False, soft_wrap=True)


review_app = typer.Typer(help="Audit pairs in FiftyOne; rejected keys flow back to shards and training.",
                          no_args_is_help=True)
app.add_typer(review_app, name="review")


@review_app.command("build")
def review_build_command(
    shards: Annotated[str, typer.Option(help="Shard folder or URI (with manifest.json).")],
    name: Annotated[str, typer.Option(help="Name of the persistent FiftyOne dataset.")],
    media_dir: Annotated[Optional[str], typer.Option(help="Where the pairs' images are extracted.")] = None,
    sample: Annotated[Optional[int], typer.Option(help="Review a seeded random subset of N pairs.")] = None,
    embeddings_model: Annotated[Optional[str], typer.Option(help="CLIP id or folder: mark near-duplicates.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start afresh (drops reviewers' tags) instead of syncing.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any config key, e.g. thresholds.small_subject=0.4.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML config; flags override its keys.")] = None,
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
        _print_error(f"{len(report.rejected)} sample(s) not in the review dataset:")
        for rejected in report.rejected:
            errors.print(f"  {rejected.shard} {rejected.key!r}: {rejected.reason} ({rejected.detail})",
                         highlight=False, soft_wrap=True)
    if report.failed_shards:
        _print_error(f"{len(report.failed_shards)} shard(s) could not be read:",
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
        _print_warning(warning)
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


@app.command("backgrounds")
def backgrounds_command(
    out: Annotated[Optional[str], typer.Option(help="Pool folder or URI: backgrounds.parquet, funnel.json.")] = None,
    from_openimages: Annotated[bool, typer.Option(help="Pick scene-like photos from OpenImages boxes.")] = False,
    bbox: Annotated[Optional[str], typer.Option(help="With --from-openimages: the box CSV.")] = None,
    classes: Annotated[Optional[str], typer.Option(help="With --from-openimages: the class list CSV.")] = None,
    images: Annotated[Optional[str], typer.Option(help="OpenImages image list CSV (ImageID -> OriginalURL).")] = None,
    image_root: Annotated[Optional[str], typer.Option(help="Or a folder/URI prefix of <ImageID>.jpg.")] = None,
    from_folder: Annotated[Optional[str], typer.Option(help="Or your own images: a folder or URI prefix.")] = None,
    count: Annotated[Optional[int], typer.Option(help="Backgrounds to select (the paper: 59000).")] = None,
    min_side: Annotated[Optional[int], typer.Option(help="Folder mode: shortest side allowed.")] = None,
    exclude_candidates: Annotated[Optional[str], typer.Option(help="candidates.parquet: never a subject photo.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the selection order.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any config key, e.g. max_boxes=4.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML config; flags override its keys.")] = None,
) -> None:
    """Make a background pool (`build --backgrounds POOL`): scene-like OpenImages photos or your own."""
    from subjectpairs.curation.backgrounds import BackgroundConfig, build_pool

    if from_openimages and not bbox:
        raise _fail("--from-openimages needs --bbox and --classes")
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


@app.command("demo")
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


@app.command("version")
def version_command() -> None:
    """Print the version."""
    console.print(__version__)


if __name__ == "__main__":
    app()
