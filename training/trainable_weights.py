"""The weights a run trains, as checkpoints hold them: every parameter that requires a gradient, by name."""

from __future__ import annotations

import torch
from torch import nn


class TrainableWeights(nn.Module):
    """A model whose checkpoints hold its trainable parameters only; the frozen ones come from the weights
    the run started from."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {name for name, p in self.named_parameters() if p.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"trainable weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        self.load_state_dict(state, strict=False)
