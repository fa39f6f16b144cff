"""CLIPSeg (text-prompted segmentation, the paper's segmenter) through transformers."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from subjectpairs.devices import resolve_device
from subjectpairs.errors import InputError
from subjectpairs.pipelines.boxes import Box
from subjectpairs.pipelines.segmentation import shrink_for_model, upsample_maps

DEFAULT_CLIPSEG = "CIDAS/clipseg-rd64-refined"
# A cached CLIPSeg is its config and one of its weight formats (the processor's small files are named
# differently across transformers versions; a worker that misses one fetches it).
CLIPSEG_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class ClipSegSegmenter:
    """CLIPSeg (transformers) from a hub id or a local folder; bf16 autocast on GPU, fp32 on CPU."""

    name = "clipseg"
    runs_model = True
    default_model = DEFAULT_CLIPSEG

    def __init__(self, model: Any, processor: Any, source: str, batch_size: int) -> None:
        import torch

        self.model = model
        self.processor = processor
        self.source = source
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None

    @classmethod
    def from_config(cls, config: Any, choice: Any) -> "ClipSegSegmenter":
        """The model ``choice`` names, on ``config.device``, in batches of ``config.batch_size``."""
        assert choice.model is not None, "a CLIPSeg choice names its model"
        return cls.from_pretrained(choice.model, device=config.device, batch_size=config.batch_size)

    @classmethod
    def from_pretrained(
        cls, source: str, *, device: str = "auto", batch_size: int = 32, local_files_only: bool = False
    ) -> "ClipSegSegmenter":
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        device = resolve_device(device)
        try:
            processor = CLIPSegProcessor.from_pretrained(source, local_files_only=local_files_only)
            model = CLIPSegForImageSegmentation.from_pretrained(source, local_files_only=local_files_only)
        except (OSError, ValueError) as exc:  # missing files, bad repo ids, foreign configs
            raise InputError(f"{source}: cannot load CLIPSeg ({exc})") from exc
        model.requires_grad_(False)
        model.eval().to(device)
        return cls(model, processor, source, batch_size)

    def describe(self) -> dict[str, Any]:
        dtype = "bfloat16-autocast" if self.autocast_dtype is not None else "float32"
        return {"name": self.name, "model": self.source, "device": str(self.device), "dtype": dtype}

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) the model sees."""
        size = self.processor.image_processor.size
        return int(size["width"]), int(size["height"])

    def probabilities(self, shrunk: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """Sigmoid maps (B, h, w) for images already shrunk to ``input_size``, in batches."""
        import torch

        maps = []
        for start in range(0, len(shrunk), self.batch_size):
            chunk = list(shrunk[start:start + self.batch_size])
            inputs = self.processor(text=list(prompts[start:start + self.batch_size]), images=chunk,
                                    padding=True, return_tensors="pt")
            inputs = {name: tensor.to(self.device) for name, tensor in inputs.items()}
            with torch.inference_mode(), torch.autocast(
                self.device.type, dtype=self.autocast_dtype or torch.float32,
                enabled=self.autocast_dtype is not None,
            ):
                logits = self.model(**inputs).logits
            # One image gives (H, W) in some transformers versions and (1, H, W) in others.
            logits = logits.reshape(len(chunk), *logits.shape[-2:])
            maps.append(torch.sigmoid(logits.float()).cpu().numpy())
        return np.concatenate(maps)

    def segment(self, images: Sequence[np.ndarray], prompts: Sequence[str], boxes: Sequence[Box]) -> list[np.ndarray]:
        return upsample_maps(images, self.probabilities(shrink_for_model(images, self.input_size), prompts))


def clipseg_in_hub_cache(source: str = DEFAULT_CLIPSEG) -> bool:
    """Whether the local hub cache holds CLIPSeg's config and weights from ``source``: a look at the disk,
    no network and no model load."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(source, filename), str)

    return cached("config.json") and any(cached(name) for name in CLIPSEG_WEIGHTS)
