"""One rank's training, apart from Ray: the model, its optimizer, the step and what a checkpoint holds.

:func:`~subjectpairs.training.trainer.train_loop` drives one :class:`Trainer` per Ray Train worker (it wraps
the model for DDP, reads batches, reduces metrics across ranks and reports checkpoints); a test or a notebook
drives one in a single process the same way.
"""

from __future__ import annotations

import json
import os
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .blip_diffusion import BlipDiffusion
from .config import TrainConfig

# A checkpoint folder: the state every rank shares (written by rank 0) and one file per rank.
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"


def rank_file(rank: int) -> str:
    """A rank's random streams and data position in a checkpoint."""
    return f"rank-{rank:05d}.pt"


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random stream a step draws from (torch, Python, NumPy, and the GPU's), to resume exactly."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """AdamW on the model's trainable parameters (the Q-Former without its image encoder, the text encoder,
    the UNet), gradient clipping, bf16 autocast on GPUs (``mixed_precision``), one optimizer step per batch.

    ``network`` is what the forward pass runs through: the model itself, or its DDP wrapper, which a
    distributed loop sets after construction."""

    def __init__(self, config: TrainConfig, model: BlipDiffusion, device: torch.device) -> None:
        self.config, self.model, self.device = config, model, device
        self.network: torch.nn.Module = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay,
                                           fused=device.type == "cuda")
        self.step = 0
        bf16 = config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and device.type == "cuda")
        self._autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """One optimizer step on ``batch`` (a :class:`~subjectpairs.training.data.BatchReader` batch);
        returns this rank's loss, detached."""
        to_device = {"non_blocking": True}
        with self._autocast():
            loss = self.network(
                batch["pixel_values"].to(self.device, **to_device), batch["captions"], batch["categories"],
                target=batch["target"].to(self.device, **to_device) if "target" in batch else None,
                latents=batch["latents"].to(self.device, **to_device) if "latents" in batch else None,
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds of the training state shared by every rank: the trainable weights, the
        optimizer's state and the step (each rank keeps its random streams and data position apart)."""
        return {"trainable": self.model.trainable_state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_trainable_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def save(self, folder: str, *, rank: int, position: dict[str, Any], epoch: int, run_hash: str) -> None:
        """This rank's part of a checkpoint, into the local ``folder``: rank 0 writes the shared state
        (trainable weights, optimizer, ``step``, ``epoch``, ``run_hash``), every rank its random streams and
        its data ``position``."""
        if rank == 0:
            state = self.state_dict()
            save_file({k: v.contiguous() for k, v in state["trainable"].items()}, os.path.join(folder, TRAINABLE_FILE))
            torch.save(state["optimizer"], os.path.join(folder, OPTIMIZER_FILE))
            Path(folder, STATE_FILE).write_text(json.dumps({"step": self.step, "epoch": epoch, "run_hash": run_hash}))
        torch.save({"rng": rng_state(self.device), "position": position}, os.path.join(folder, rank_file(rank)))

    def restore(self, folder: str, *, rank: int) -> dict[str, Any]:
        """The state :meth:`save` wrote into the local ``folder``, this rank's random streams included;
        returns the rank's data position."""
        self.load_state_dict({
            "trainable": load_file(os.path.join(folder, TRAINABLE_FILE), device=str(self.device)),
            "optimizer": torch.load(os.path.join(folder, OPTIMIZER_FILE), map_location=self.device,
                                    weights_only=False),
            "step": json.loads(Path(folder, STATE_FILE).read_text())["step"],
        })
        rank_state = torch.load(os.path.join(folder, rank_file(rank)), weights_only=False)
        set_rng_state(rank_state["rng"], self.device)
        return rank_state["position"]


class Collectives:
    """What the ranks agree on each step, through torch.distributed; in a single process, the value itself."""

    def __init__(self, world_size: int, device: torch.device) -> None:
        self.world_size, self.device = world_size, device
        self.distributed = world_size > 1 and dist.is_available() and dist.is_initialized()

    def _reduce(self, value: float, op: Any) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(tensor, op=op)
        return float(tensor.item())

    def sum(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM)

    def all(self, flag: bool) -> bool:
        """Whether every rank says ``flag``."""
        return self._reduce(1.0 if flag else 0.0, dist.ReduceOp.MIN) == 1.0

    def union(self, items: list[str]) -> list[str]:
        """Every rank's items, sorted, once each."""
        gathered = [items] * self.world_size
        if self.distributed:
            dist.all_gather_object(gathered, items)
        return sorted({item for rank_items in gathered for item in rank_items})

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
