"""Export a run's checkpoint as a diffusers BLIP-Diffusion folder (loadable by ``--init`` and ``generate``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from subjectpairs import storage
from subjectpairs.configfile import CONFIG_FILE, read_config
from subjectpairs.errors import InputError
from subjectpairs.guards import OutputLock, refuse_overlap

from .config import TrainConfig
from .rank_trainer import TRAINABLE_FILE
from .trainer import (
    checkpoint_name,
    latest_checkpoint,
    load_run_model,
)


def run_config(run: str) -> TrainConfig:
    uri = storage.join(run, CONFIG_FILE)
    if not storage.exists(uri):
        raise InputError(f"{run}: not a training run (no {CONFIG_FILE})")
    return read_config(TrainConfig, uri)


def export_run(run: str, out: str, step: int | None = None) -> str:
    """The run's starting weights with the checkpoint's trainable weights on top, saved in the diffusers
    layout to ``out``, which is checked against the run and its starting weights and locked for the export;
    returns the checkpoint used."""
    refuse_overlap(out, {"RUN": run})
    # the run's own folder, wherever it lies now (config.yaml names the folder the run was made in)
    config = run_config(run).model_copy(update={"out": run})
    init = config.init if config.init is not None and storage.exists(config.init) else None
    refuse_overlap(out, {"the run's --init": init})
    with OutputLock(out, "export"):
        return _export_locked(run, out, step, config)


def _export_locked(run: str, out: str, step: int | None, config: TrainConfig) -> str:
    from safetensors.torch import load

    checkpoint = storage.join(run, checkpoint_name(step)) if step is not None else latest_checkpoint(run)
    if checkpoint is None or not storage.exists(storage.join(checkpoint, TRAINABLE_FILE)):
        raise InputError(f"{run}: no checkpoint{f' at step {step}' if step is not None else ''} to export")
    with tempfile.TemporaryDirectory() as scratch:
        model = load_run_model(config, scratch)
        model.load_trainable_state_dict(load(storage.read_bytes(storage.join(checkpoint, TRAINABLE_FILE))))
        folder = model.save_pretrained(Path(scratch) / "export")
        storage.publish_folder(folder, out)
    return checkpoint
