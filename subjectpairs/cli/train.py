"""Training on the shards: ``latents`` (the targets' VAE latents beforehand), ``train`` (Ray Train) and
``export`` (a checkpoint as a diffusers folder)."""

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
)

ADDRESS_HELP = "Ray address (default: RAY_ADDRESS, else local Ray)."


_help = partial(field_help, "subjectpairs.training.config:TrainConfig")
_latents_help = partial(field_help, "subjectpairs.training.config:LatentsConfig")


def comma_list(values: list[str] | None) -> list[str] | None:
    """Repeatable options that also take comma-separated lists."""
    if not values:
        return None
    return [part for value in values for part in value.split(",") if part]


def train_command(
    shards: Annotated[Optional[list[str]], typer.Option(
        help=_help("shards", "comma-separated or repeated"))] = None,
    out: Annotated[Optional[str], typer.Option(help="Run folder or URI: checkpoints, metrics.jsonl, config.yaml.")] = None,
    model: Annotated[Optional[str], typer.Option(help="tiny or blip-diffusion (size of a random model).")] = None,
    init: Annotated[Optional[str], typer.Option(help=_help("init"))] = None,
    stable_diffusion: Annotated[Optional[str], typer.Option(help=_help("stable_diffusion"))] = None,
    qformer: Annotated[Optional[str], typer.Option(help=_help("qformer"))] = None,
    workers: Annotated[Optional[int], typer.Option(help=_help("workers"))] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(help=_help("gpus_per_worker"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_help("batch_size"))] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Train until this step.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of initialization, data order, noise.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    exclude: Annotated[Optional[str], typer.Option(help=_help("exclude"))] = None,
    latents: Annotated[Optional[list[str]], typer.Option(
        help=_help("latents", "one per shard folder, comma-separated or repeated"))] = None,
    address: Annotated[Optional[str], typer.Option(help=ADDRESS_HELP)] = None,
    eval_every: Annotated[Optional[int], typer.Option(help=_help("eval_every"))] = None,
    eval_dreambench: Annotated[Optional[str], typer.Option(help=_help("eval_dreambench"))] = None,
    eval_subjects: Annotated[Optional[list[str]], typer.Option(
        help=_help("eval_subjects", "comma-separated or repeated"))] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any config key: --set lr=1e-5; repeatable.")] = None,
    config: ConfigFile = None,
) -> None:
    """Pre-train the subject representation on pair shards with Ray Train (DDP), resumable exactly."""
    from subjectpairs.training.config import TrainConfig
    from subjectpairs.training.trainer import run_training

    settings = load_config(TrainConfig, config, {
        "shards": comma_list(shards), "out": out, "model": model, "init": init, "workers": workers,
        "stable_diffusion": stable_diffusion, "qformer": qformer,
        "gpus_per_worker": gpus_per_worker, "batch_size": batch_size, "max_steps": max_steps, "seed": seed,
        "resume": resume or None, "exclude": exclude, "latents": comma_list(latents), "address": address,
        "eval_every": eval_every, "eval_dreambench": eval_dreambench, "eval_subjects": comma_list(eval_subjects),
        **parse_settings(set_),
    })
    with input_errors():
        report = run_training(settings)
    last = report.last or {}
    console.print(f"trained to step {last.get('step', report.resumed_from)} (from {report.resumed_from}) -> {report.out}; "
                  f"last loss {last.get('loss', float('nan')):.4f}, {last.get('samples_per_s', 0):.1f} samples/s")


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


def latents_command(
    shards: Annotated[Optional[list[str]], typer.Option(
        help=_latents_help("shards", "comma-separated or repeated"))] = None,
    out: Annotated[Optional[str], typer.Option(help=_latents_help("out"))] = None,
    model: Annotated[Optional[str], typer.Option(help=_latents_help("model"))] = None,
    init: Annotated[Optional[str], typer.Option(help=_latents_help("init"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_latents_help("seed"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_latents_help("batch_size"))] = None,
    address: Annotated[Optional[str], typer.Option(help=ADDRESS_HELP)] = None,
    config: ConfigFile = None,
) -> None:
    """Precompute the targets' VAE latents as side-car shards for `train --latents`."""
    from subjectpairs.training.config import LatentsConfig
    from subjectpairs.training.latents import write_latents

    settings = load_config(LatentsConfig, config, {
        "shards": comma_list(shards), "out": out, "model": model, "init": init, "seed": seed,
        "batch_size": batch_size, "address": address,
    })
    with input_errors():
        manifest = write_latents(settings)
    out = settings.out
    total = sum(entry["samples"] for entry in manifest["shards"])
    skipped = [item for entry in manifest["shards"] for item in entry["skipped"]]
    console.print(f"{total:,} latents in {len(manifest['shards'])} shards -> {out}")
    if skipped:
        errors.print(f"{len(skipped)} targets did not decode and have no latent (listed under `skipped` in "
                     f"manifest.json), e.g. {skipped[0]['key']}: {skipped[0]['reason']}", highlight=False, soft_wrap=True)
