"""One rank's training, apart from Ray: the model, its optimizer, the step and what a checkpoint holds.

:func:`~subjectpairs.training.trainer.train_loop` drives one :class:`Trainer` per Ray Train worker (it wraps
the model for DDP, reads batches, reduces metrics across ranks and reports checkpoints); a test or a notebook
drives one in a single process the same way.
"""

from __future__ import annotations

import json
import math
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
from .config import PretrainQFormerConfig, TrainConfig
from .qformer_pretraining import QFormerPretraining, RankGather, tokenize_captions
from .trainable_weights import TrainableWeights

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


class RankTrainer:
    """One rank's optimizer steps: AdamW on the model's trainable parameters with the learning rate of each
    step (:meth:`learning_rate`), optional gradient clipping, bf16 autocast on GPUs (``mixed_precision``),
    and the checkpoint state. A subclass says what a batch's losses are (:meth:`losses`).

    ``network`` is what the forward pass runs through: the model itself, or its DDP wrapper, which a
    distributed loop sets after construction."""

    def __init__(self, model: TrainableWeights, device: torch.device, *, weight_decay: float,
                 max_grad_norm: float | None, mixed_precision: str) -> None:
        self.model, self.device = model, device
        self.network: torch.nn.Module = model
        self.max_grad_norm = max_grad_norm
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameter_groups(weight_decay), lr=self.learning_rate(0),
                                           fused=device.type == "cuda")
        self.step = 0
        bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")
        self._autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": self.trainable, "weight_decay": weight_decay}]

    def learning_rate(self, step: int) -> float:
        """The learning rate of the step that follows ``step`` steps."""
        raise NotImplementedError

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The batch's losses through ``network``; ``loss`` is the one optimised."""
        raise NotImplementedError

    def train_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One optimizer step on ``batch``; returns this rank's losses, detached."""
        for group in self.optimizer.param_groups:  # from the step alone, so a resumed run has it too
            group["lr"] = self.learning_rate(self.step)
        with self._autocast():
            losses = self.losses(batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        return {name: value.detach() for name, value in losses.items()}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds of the training state shared by every rank: the trainable weights, the
        optimizer's state and the step (each rank keeps its random streams and data position apart)."""
        return {"trainable": self.model.trainable_state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_trainable_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def rank_state(self) -> dict[str, Any]:
        """This rank's random streams, to resume exactly."""
        return {"rng": rng_state(self.device)}

    def set_rank_state(self, state: dict[str, Any]) -> None:
        set_rng_state(state["rng"], self.device)

    def save(self, folder: str, *, rank: int, position: dict[str, Any], epoch: int, run_hash: str) -> None:
        """This rank's part of a checkpoint, into the local ``folder``: rank 0 writes the shared state
        (trainable weights, optimizer, ``step``, ``epoch``, ``run_hash``), every rank its random streams and
        its data ``position``."""
        if rank == 0:
            state = self.state_dict()
            save_file({k: v.contiguous() for k, v in state["trainable"].items()}, os.path.join(folder, TRAINABLE_FILE))
            torch.save(state["optimizer"], os.path.join(folder, OPTIMIZER_FILE))
            Path(folder, STATE_FILE).write_text(json.dumps({"step": self.step, "epoch": epoch, "run_hash": run_hash}))
        torch.save({**self.rank_state(), "position": position}, os.path.join(folder, rank_file(rank)))

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
        self.set_rank_state(rank_state)
        return rank_state["position"]


class Trainer(RankTrainer):
    """Stage 2: the model's trainable parameters (the Q-Former without its image encoder, the text encoder,
    the UNet) at a constant learning rate on pair batches (:class:`~.data.BatchReader`)."""

    def __init__(self, config: TrainConfig, model: BlipDiffusion, device: torch.device) -> None:
        self.config = config
        super().__init__(model, device, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                         mixed_precision=config.mixed_precision)

    def learning_rate(self, step: int) -> float:
        return self.config.lr

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        to_device = {"non_blocking": True}
        return {"loss": self.network(
            batch["pixel_values"].to(self.device, **to_device), batch["captions"], batch["categories"],
            target=batch["target"].to(self.device, **to_device) if "target" in batch else None,
            latents=batch["latents"].to(self.device, **to_device) if "latents" in batch else None,
        )}


def warmup_cosine_lr(step: int, *, lr: float, warmup_lr: float, warmup_steps: int, min_lr: float,
                     decay_steps: int) -> float:
    """LAVIS's ``linear_warmup_cosine_lr`` by step: linear from ``warmup_lr`` to ``lr`` over ``warmup_steps``,
    then a cosine from ``lr`` down to ``min_lr`` at ``decay_steps``, and ``min_lr`` after. (LAVIS decays once
    per epoch; streamed shards have no fixed epoch, so the cosine runs over steps.)"""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(decay_steps - warmup_steps, 1))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class QFormerTrainer(RankTrainer):
    """Stage 1: the Q-Former and its pre-training heads (:class:`~.qformer_pretraining.QFormerPretraining`)
    on image-text batches (:class:`~.image_text_data.ImageTextBatchReader`), LAVIS's optimizer: no weight
    decay on biases and other 1-D parameters (LayerNorms), warm-up and cosine decay. ``gather`` shares the
    negatives between ranks (None: one process); the hard negatives are drawn from a generator seeded by
    ``seed``, which the rank's checkpoint keeps."""

    def __init__(self, config: PretrainQFormerConfig, model: QFormerPretraining, device: torch.device, *,
                 seed: int, gather: RankGather | None = None) -> None:
        self.config, self.gather = config, gather
        self.negatives = torch.Generator().manual_seed(seed)
        super().__init__(model, device, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                         mixed_precision=config.mixed_precision)

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        decayed, kept = [], []
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                # LAVIS's rule: vectors (biases, LayerNorms) and biases are not decayed; the 0-d temperature is
                no_decay = parameter.ndim == 1 or name.endswith(".bias")
                (kept if no_decay else decayed).append(parameter)
        return [{"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]

    def learning_rate(self, step: int) -> float:
        config = self.config
        return warmup_cosine_lr(step, lr=config.lr, warmup_lr=config.warmup_lr, warmup_steps=config.warmup_steps,
                                min_lr=config.min_lr, decay_steps=config.lr_decay_steps or config.max_steps)

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = tokenize_captions(self.model.tokenizer, batch["captions"],
                                                      self.model.config.max_txt_len)
        return self.network(batch["pixel_values"].to(self.device, non_blocking=True), input_ids.to(self.device),
                            attention_mask.to(self.device), gather=self.gather, generator=self.negatives)

    def rank_state(self) -> dict[str, Any]:
        return {**super().rank_state(), "negatives": self.negatives.get_state()}

    def set_rank_state(self, state: dict[str, Any]) -> None:
        super().set_rank_state(state)
        self.negatives.set_state(state["negatives"])


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
