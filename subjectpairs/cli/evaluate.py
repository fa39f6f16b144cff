"""``subjectpairs finetune`` (subject-specific fine-tuning) and ``subjectpairs evaluate`` (DreamBench)."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Optional

import typer

from subjectpairs.cli.common import ConfigFile, console, field_help, input_errors, load_config, parse_settings

_finetune_help = partial(field_help, "subjectpairs.training.config:FinetuneConfig")
_evaluate_help = partial(field_help, "subjectpairs.training.config:EvaluateConfig")


def finetune_command(
    model: Annotated[Optional[str], typer.Option(help=_finetune_help("model"))] = None,
    subject_dir: Annotated[Optional[str], typer.Option(help=_finetune_help("subject_dir"))] = None,
    category: Annotated[Optional[str], typer.Option(help=_finetune_help("category"))] = None,
    out: Annotated[Optional[str], typer.Option(
        help="New model folder: export's layout plus the cached subject embedding.")] = None,
    steps: Annotated[Optional[int], typer.Option(help=_finetune_help("steps"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_finetune_help("batch_size"))] = None,
    lr: Annotated[Optional[float], typer.Option(help=_finetune_help("lr"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_finetune_help("seed"))] = None,
    validation_prompts: Annotated[Optional[str], typer.Option(help=_finetune_help("validation_prompts"))] = None,
    validation_every: Annotated[Optional[int], typer.Option(help=_finetune_help("validation_every"))] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Any config key: --set train_embedding=false; repeatable.")] = None,
    config: ConfigFile = None,
) -> None:
    """Fine-tune a model on one subject's photos (paper 3.3, A.6): the cached mean subject embedding, the UNet
    trained, the text encoder and Q-Former frozen."""
    from subjectpairs.training.config import FinetuneConfig
    from subjectpairs.training.finetune import run_finetune

    settings = load_config(FinetuneConfig, config, {
        "model": model, "subject_dir": subject_dir, "category": category, "out": out, "steps": steps,
        "batch_size": batch_size, "lr": lr, "seed": seed, "validation_prompts": validation_prompts,
        "validation_every": validation_every, **parse_settings(set_),
    })
    with input_errors():
        report = run_finetune(settings)
    console.print(f"fine-tuned {report.steps} steps on {report.photos} photos in {report.seconds:.1f} s "
                  f"({report.steps_per_s:.2f} steps/s), last loss {report.final_loss:.4f} -> {report.out}")
    if report.sheets:
        console.print(f"contact sheets: {', '.join(report.sheets)}")


def _finetune_steps(value: str | None):
    if value is None or value == "paper":
        return value
    try:
        return int(value)
    except ValueError:
        return value  # the config's validation names it


def evaluate_command(
    model: Annotated[Optional[str], typer.Option(help=_evaluate_help("model"))] = None,
    dreambench: Annotated[Optional[str], typer.Option(help=_evaluate_help("dreambench"))] = None,
    out: Annotated[Optional[str], typer.Option(
        help="Evaluation folder: metrics.parquet, summary.json, report.png, images/; a rerun resumes.")] = None,
    subjects: Annotated[Optional[str], typer.Option(help=_evaluate_help("subjects", "comma-separated"))] = None,
    images_per_prompt: Annotated[Optional[int], typer.Option(help=_evaluate_help("images_per_prompt"))] = None,
    seeds: Annotated[Optional[str], typer.Option(help=_evaluate_help("seeds", "comma-separated"))] = None,
    steps: Annotated[Optional[int], typer.Option(help=_evaluate_help("steps"))] = None,
    guidance: Annotated[Optional[float], typer.Option(help=_evaluate_help("guidance"))] = None,
    finetune_steps: Annotated[Optional[str], typer.Option(help=_evaluate_help("finetune_steps"))] = None,
    clip_model: Annotated[Optional[str], typer.Option(help=_evaluate_help("clip_model"))] = None,
    dino_model: Annotated[Optional[str], typer.Option(help=_evaluate_help("dino_model"))] = None,
    address: Annotated[Optional[str], typer.Option(help=_evaluate_help("address"))] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Any config key: --set reference_image=1; repeatable.")] = None,
    config: ConfigFile = None,
) -> None:
    """DreamBench evaluation (the paper's Table 1): generate zero-shot or after fine-tuning, score DINO,
    CLIP-I and CLIP-T, and compare with the paper."""
    from subjectpairs.training.config import EvaluateConfig
    from subjectpairs.training.evaluation_job import run_evaluation

    settings = load_config(EvaluateConfig, config, {
        "model": model, "dreambench": dreambench, "out": out, "subjects": subjects,
        "images_per_prompt": images_per_prompt, "seeds": seeds, "steps": steps, "guidance": guidance,
        "finetune_steps": _finetune_steps(finetune_steps), "clip_model": clip_model, "dino_model": dino_model,
        "address": address, **parse_settings(set_),
    })
    with input_errors():
        report = run_evaluation(settings)
    summary = report.summary
    paper = summary["paper"]["table1"]
    subjects = len(summary["subjects"])
    console.print(f"{summary['mode']}: {summary['images']} images of {subjects} subject{'s' * (subjects != 1)} "
                  f"({report.generated} made now, {report.seconds:.0f} s) -> {report.out}")
    console.print(f"DINO {summary['dino']:.3f}  CLIP-I {summary['clip_i']:.3f}  CLIP-T {summary['clip_t']:.3f}"
                  f"   (paper: {paper['dino']:.3f} / {paper['clip_i']:.3f} / {paper['clip_t']:.3f}; real images "
                  f"here {summary['oracle']['dino']:.3f} / {summary['oracle']['clip_i']:.3f})")
