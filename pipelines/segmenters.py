"""Subject segmenters: a batch of RGB images and subject names in, probability maps out.

Every segmenter returns, for each image, an HxW float32 map in [0, 1] at that image's own size, so the
trimap stage does not care which one ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence

import cv2
import numpy as np

from subjectpairs.errors import InputError
from subjectpairs.pipelines.boxes import Box
from subjectpairs.pipelines.config import DEFAULT_CLIPSEG, SegmenterConfig


class Segmenter(Protocol):
    name: str

    def segment(self, images: Sequence[np.ndarray], prompts: Sequence[str], boxes: Sequence[Box]) -> list[np.ndarray]:
        ...

    def describe(self) -> dict[str, Any]:
        """What ran, for each pair's metadata."""
        ...


def prompt_for(category: str) -> str:
    """The authors prompted CLIPSeg with the lowercased class name."""
    return category.lower()


class ClipSegSegmenter:
    """CLIPSeg (transformers) from a hub id or a local folder; bf16 autocast on GPU, fp32 on CPU."""

    name = "clipseg"

    def __init__(self, model: Any, processor: Any, source: str, batch_size: int) -> None:
        import torch

        self.model = model
        self.processor = processor
        self.source = source
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None

    @classmethod
    def from_pretrained(
        cls, source: str, *, device: str = "auto", batch_size: int = 32, local_files_only: bool = False
    ) -> "ClipSegSegmenter":
        import torch
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
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


def shrink_for_model(images: Sequence[np.ndarray], size: tuple[int, int]) -> list[np.ndarray]:
    """Images squashed to the model's input size (as CLIPSeg's processor does), with area averaging.

    Done before the images travel to a model (a GPU actor) so 352x352 arrays cross the network, not
    full photos, and the processor's own resize becomes a no-op.
    """
    return [cv2.resize(image, size, interpolation=cv2.INTER_AREA) for image in images]


def upsample_maps(images: Sequence[np.ndarray], probs: np.ndarray) -> list[np.ndarray]:
    """Each map brought back to its image's size."""
    return [
        cv2.resize(prob, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
        for image, prob in zip(images, probs)
    ]


class GrabCutSegmenter:
    """OpenCV GrabCut seeded with the subject box: no weights, runs anywhere.

    It works at a reduced short side (GrabCut's cost grows with pixels) and its hard mask is upsampled
    bilinearly, which gives the trimap stage a soft edge to threshold.
    """

    name = "grabcut"
    # GrabCut needs some pixels outside its rectangle to model the background.
    _MIN_BORDER = 0.02
    # OpenCV's k-means start is random; a fixed seed makes every run give the same mask.
    _RNG_SEED = 12345

    def __init__(self, iterations: int = 3, work_side: int = 128, why: str = "") -> None:
        self.iterations = iterations
        self.work_side = work_side
        self.why = why

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.name, "iterations": self.iterations, "work_side": self.work_side}
        if self.why:
            info["why"] = self.why
        return info

    def _rect(self, box: Box, height: int, width: int) -> tuple[int, int, int, int]:
        border = self._MIN_BORDER
        inner = Box(
            max(box.xmin, border), min(box.xmax, 1 - border), max(box.ymin, border), min(box.ymax, 1 - border)
        )
        x0, x1, y0, y1 = inner.pixels(height, width)
        return x0, y0, max(x1 - x0, 1), max(y1 - y0, 1)

    def segment_one(self, image: np.ndarray, box: Box) -> np.ndarray:
        height, width = image.shape[:2]
        scale = min(1.0, self.work_side / min(height, width))
        small = cv2.resize(image, (max(round(width * scale), 8), max(round(height * scale), 8)),
                           interpolation=cv2.INTER_AREA) if scale < 1.0 else image
        mask = np.zeros(small.shape[:2], np.uint8)
        models = (np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64))
        cv2.setRNGSeed(self._RNG_SEED)
        cv2.grabCut(cv2.cvtColor(small, cv2.COLOR_RGB2BGR), mask, self._rect(box, *small.shape[:2]),
                    *models, self.iterations, cv2.GC_INIT_WITH_RECT)
        hard = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.float32)
        return cv2.resize(hard, (width, height), interpolation=cv2.INTER_LINEAR)

    def segment(self, images: Sequence[np.ndarray], prompts: Sequence[str], boxes: Sequence[Box]) -> list[np.ndarray]:
        return [self.segment_one(image, box) for image, box in zip(images, boxes)]


# A cached CLIPSeg is its config and one of its weight formats (the processor's small files are named
# differently across transformers versions; a worker that misses one fetches it).
CLIPSEG_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Kept word for word: it is in the metadata of every pair an ``auto`` build made with GrabCut, so those
# shards stay byte-identical.
NO_CLIPSEG = f"no CLIPSeg weights configured and {DEFAULT_CLIPSEG} is not on disk"


@dataclass(frozen=True)
class SegmenterChoice:
    """Which segmenter a run uses and why, decided once before any photo is segmented (in a build, by the
    driver before Ray starts, so every worker runs the same one)."""

    name: Literal["clipseg", "grabcut"]
    requested: str  # the configured kind: auto, clipseg or grabcut
    reason: str
    model: str | None = None  # the CLIPSeg hub id or folder

    @property
    def fallback(self) -> bool:
        """``auto`` found no CLIPSeg and took GrabCut: not the paper's recipe, and not chosen knowingly."""
        return self.requested == "auto" and self.name == "grabcut"

    def record(self) -> dict[str, Any]:
        """What ran and why, for stats.json."""
        record: dict[str, Any] = {"name": self.name, "requested": self.requested, "reason": self.reason,
                                  "fallback": self.fallback}
        if self.model is not None:
            record["model"] = self.model
        return record

    def warning(self) -> str | None:
        """One line for start-up when ``auto`` fell back to GrabCut, else None."""
        if not self.fallback:
            return None
        return (f"segmenter auto fell back to GrabCut ({self.reason}): the paper segments with CLIPSeg; "
                f"pass --model {DEFAULT_CLIPSEG} to use it (the weights download once into the hub cache), "
                "or --segmenter grabcut to choose GrabCut knowingly; --require-clipseg makes this an error")


def clipseg_in_hub_cache(source: str = DEFAULT_CLIPSEG) -> bool:
    """Whether the local hub cache holds CLIPSeg's config and weights from ``source``: a look at the disk,
    no network and no model load."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(source, filename), str)

    return cached("config.json") and any(cached(name) for name in CLIPSEG_WEIGHTS)


def resolve_segmenter(config: SegmenterConfig) -> SegmenterChoice:
    """The segmenter ``config`` asks for. ``auto`` takes CLIPSeg when a model is configured or the default
    one is in the local hub cache, and otherwise GrabCut, which needs no weights; with ``require_clipseg``
    that fallback is an InputError instead."""
    if config.kind == "grabcut":
        return SegmenterChoice("grabcut", "grabcut", "configured as kind grabcut")
    if config.kind == "clipseg":
        return SegmenterChoice("clipseg", "clipseg", "configured as kind clipseg",
                               config.model or DEFAULT_CLIPSEG)
    if config.model is not None:
        return SegmenterChoice("clipseg", "auto", "auto, a CLIPSeg model is configured", config.model)
    if clipseg_in_hub_cache():
        return SegmenterChoice("clipseg", "auto", f"auto, {DEFAULT_CLIPSEG} is in the local hub cache",
                               DEFAULT_CLIPSEG)
    if config.require_clipseg:
        raise InputError(f"CLIPSeg is required (--require-clipseg) but segmenter auto would fall back to "
                         f"GrabCut: {NO_CLIPSEG}; pass --model {DEFAULT_CLIPSEG} (downloads the weights) "
                         "or --model with a CLIPSeg folder")
    return SegmenterChoice("grabcut", "auto", NO_CLIPSEG)


def load_clipseg(choice: SegmenterChoice, config: SegmenterConfig) -> ClipSegSegmenter:
    assert choice.model is not None, "a CLIPSeg choice names its model"
    return ClipSegSegmenter.from_pretrained(choice.model, device=config.device, batch_size=config.batch_size)


def build_segmenter(config: SegmenterConfig, choice: SegmenterChoice | None = None) -> Segmenter:
    """The segmenter ``choice`` names (by default the one ``config`` resolves to). A GrabCut that ``auto``
    fell back to says why in each pair's metadata."""
    choice = choice or resolve_segmenter(config)
    if choice.name == "clipseg":
        return load_clipseg(choice, config)
    why = choice.reason if choice.fallback else ""
    return GrabCutSegmenter(config.grabcut_iterations, config.grabcut_side, why=why)
