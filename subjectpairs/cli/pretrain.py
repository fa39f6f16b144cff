"""``pretrain-qformer``: stage 1 of BLIP-Diffusion, the Q-Former's BLIP-2 representation learning on
image-text shards, whose result ``train --qformer`` takes."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Optional

import typer

from subjectpairs.cli.common import ConfigFile, console, field_help, input_errors, load_config, parse_settings
from subjectpairs.cli.train import ADDRESS_HELP, comma_list

_help = partial(field_help, "subjectpairs.training.config:PretrainQFormerConfig")


def pretrain_qformer_command(
    shards: Annotated[Optional[list[str]], typer.Option(
        help=_help("shards", "comma-separated or repeated"))] = None,
    out: Annotated[Optional[str], typer.Option(
        help="Run folder or URI: checkpoints, metrics.jsonl, config.yaml, and qformer/ at the end.")] = None,
    model: Annotated[Optional[str], typer.Option(help=_help("model"))] = None,
    clip: Annotated[Optional[str], typer.Option(help=_help("clip"))] = None,
    bert: Annotated[Optional[str], typer.Option(help=_help("bert"))] = None,
    init: Annotated[Optional[str], typer.Option(help=_help("init"))] = None,
    qformer_tokenizer: Annotated[Optional[str], typer.Option(help=_help("qformer_tokenizer"))] = None,
    workers: Annotated[Optional[int], typer.Option(help=_help("workers"))] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(help=_help("gpus_per_worker"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_help("batch_size"))] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Train until this step.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of new weights, data order, hard negatives.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    address: Annotated[Optional[str], typer.Option(help=ADDRESS_HELP)] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any config key: --set lr=5e-5; repeatable.")] = None,
    config: ConfigFile = None,
) -> None:
    """Pre-train the Q-Former (stage 1: image-text contrast, matching and captioning) on image-text shards."""
    from subjectpairs.training.config import PretrainQFormerConfig
    from subjectpairs.training.qformer_pretraining_job import QFORMER_DIR, run_qformer_pretraining

    settings = load_config(PretrainQFormerConfig, config, {
        "shards": comma_list(shards), "out": out, "model": model, "clip": clip, "bert": bert, "init": init,
        "qformer_tokenizer": qformer_tokenizer,
        "workers": workers, "gpus_per_worker": gpus_per_worker, "batch_size": batch_size, "max_steps": max_steps,
        "seed": seed, "resume": resume or None, "address": address, **parse_settings(set_),
    })
    with input_errors():
        report = run_qformer_pretraining(settings)
    last = report.last or {}
    losses = ", ".join(f"{name.removeprefix('loss_')} {last[name]:.4f}" for name in ("loss_itc", "loss_itm", "loss_lm")
                       if name in last)
    console.print(f"pre-trained to step {last.get('step', report.resumed_from)} (from {report.resumed_from}); "
                  f"last loss {last.get('loss', float('nan')):.4f} ({losses}), "
                  f"{last.get('samples_per_s', 0):.1f} samples/s -> {report.out}/{QFORMER_DIR}", highlight=False)
