"""OpenCV's GrabCut, seeded with the subject box: the segmenter that needs no weights."""

from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from subjectpairs.pipelines.boxes import Box


class GrabCutSegmenter:
    """OpenCV GrabCut seeded with the subject box: no weights, runs anywhere.

    It works at a reduced short side (GrabCut's cost grows with pixels) and its hard mask is upsampled
    bilinearly, which gives the trimap stage a soft edge to threshold.
    """

    name = "grabcut"
    runs_model = False
    default_model = None
    # GrabCut needs some pixels outside its rectangle to model the background.
    _MIN_BORDER = 0.02
    # OpenCV's k-means start is random; a fixed seed makes every run give the same mask.
    _RNG_SEED = 12345

    def __init__(self, iterations: int = 3, work_side: int = 128, why: str = "") -> None:
        self.iterations = iterations
        self.work_side = work_side
        self.why = why

    @classmethod
    def from_config(cls, config: Any, choice: Any) -> "GrabCutSegmenter":
        """GrabCut with ``config``'s iterations and working side; one that ``auto`` fell back to says why in
        each pair's metadata."""
        return cls(config.grabcut_iterations, config.grabcut_side, why=choice.reason if choice.fallback else "")

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
