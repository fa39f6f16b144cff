"""What every subject segmenter is: a batch of RGB images and subject names in, probability maps out.

Every segmenter returns, for each image, an HxW float32 map in [0, 1] at that image's own size, so the
trimap stage does not care which one ran. A segmenter is one module (``segmenter_<name>.py``) with a class
that follows :class:`Segmenter`, and one line in the registry of :mod:`subjectpairs.pipelines.segmenters`.
A segmenter that runs a model also follows :class:`ModelSegmenter`: a build then serves it from model
actors (one per GPU by default), and only images shrunk to its input size travel to them.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, Sequence

import cv2
import numpy as np

from subjectpairs.pipelines.boxes import Box


class Segmenter(Protocol):
    name: ClassVar[str]
    # True: a model that a build serves from actors (see ModelSegmenter); False: runs inside each task
    runs_model: ClassVar[bool]
    # the model ``kind: NAME`` uses when the config names none (None: no model)
    default_model: ClassVar[str | None]

    @classmethod
    def from_config(cls, config: Any, choice: Any) -> "Segmenter":
        """The segmenter a run's ``pair.segmenter`` settings and the driver's choice describe."""
        ...

    def segment(self, images: Sequence[np.ndarray], prompts: Sequence[str], boxes: Sequence[Box]) -> list[np.ndarray]:
        ...

    def describe(self) -> dict[str, Any]:
        """What ran, for each pair's metadata."""
        ...


class ModelSegmenter(Segmenter, Protocol):
    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) the model sees."""
        ...

    def probabilities(self, shrunk: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """Maps (B, h, w) in [0, 1] for images already shrunk to ``input_size``."""
        ...


def prompt_for(category: str) -> str:
    """The authors prompted CLIPSeg with the lowercased class name."""
    return category.lower()


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
