"""Where a model runs: one rule for every command and stage."""

from __future__ import annotations


def resolve_device(requested: str = "auto") -> str:
    """``auto``: the GPU when torch sees one, else the CPU; anything else (``cpu``, ``cuda``, ``cuda:1``)
    as given."""
    if requested != "auto":
        return requested
    import torch  # only a model loader asks, and it has torch loaded already

    return "cuda" if torch.cuda.is_available() else "cpu"
