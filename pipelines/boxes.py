"""Subject boxes in OpenImages' normalized order (xmin, xmax, ymin, ymax)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from subjectpairs.pipelines.rejections import PairRejected

# OpenImages coordinates sometimes overshoot [0, 1] by rounding; further out than this is a wrong box.
_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Box:
    xmin: float
    xmax: float
    ymin: float
    ymax: float

    @classmethod
    def parse(cls, text: str) -> "Box":
        """``"XMIN,XMAX,YMIN,YMAX"`` as in OpenImages (ValueError on anything else)."""
        parts = [part.strip() for part in text.split(",")]
        if len(parts) != 4:
            raise ValueError(f"expected XMIN,XMAX,YMIN,YMAX, got {text!r}")
        try:
            values = [float(part) for part in parts]
        except ValueError:
            raise ValueError(f"expected four numbers XMIN,XMAX,YMIN,YMAX, got {text!r}") from None
        if not all(math.isfinite(value) for value in values):  # float() takes "nan" and "inf"
            raise ValueError(f"expected four finite numbers XMIN,XMAX,YMIN,YMAX, got {text!r}")
        return cls(*values)

    def checked(self) -> "Box":
        """The box clipped to [0, 1]; a box that is outside the image or empty is a ``bad_box`` rejection."""
        values = (self.xmin, self.xmax, self.ymin, self.ymax)
        # "0.1,nan,0.2,0.9", not "[0.1, nan, ...]", which a rich console takes for a markup tag and drops
        box = f"box {','.join(f'{v:g}' for v in values)} (XMIN,XMAX,YMIN,YMAX)"
        if not all(math.isfinite(v) for v in values):  # a null coordinate in a candidates table reads as NaN
            raise PairRejected("box", "bad_box", f"{box} has a coordinate that is not a number")
        if min(values) < -_TOLERANCE or max(values) > 1 + _TOLERANCE:
            raise PairRejected("box", "bad_box", f"{box} is not inside [0, 1]")
        clipped = Box(*(min(max(v, 0.0), 1.0) for v in values))
        if clipped.xmax <= clipped.xmin or clipped.ymax <= clipped.ymin:
            raise PairRejected("box", "bad_box", f"{box} has no area")
        return clipped

    def padded(self, fraction: float) -> "Box":
        """Grown by ``fraction`` of its width and height on every side, clipped to the image."""
        dx = (self.xmax - self.xmin) * fraction
        dy = (self.ymax - self.ymin) * fraction
        return Box(
            max(self.xmin - dx, 0.0), min(self.xmax + dx, 1.0), max(self.ymin - dy, 0.0), min(self.ymax + dy, 1.0)
        )

    def pixels(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Pixel bounds (x0, x1, y0, y1), half-open, at least one pixel each way."""
        x0 = min(int(self.xmin * width), width - 1)
        y0 = min(int(self.ymin * height), height - 1)
        x1 = max(int(round(self.xmax * width)), x0 + 1)
        y1 = max(int(round(self.ymax * height)), y0 + 1)
        return x0, x1, y0, y1

    def as_list(self) -> list[float]:
        return [self.xmin, self.xmax, self.ymin, self.ymax]


WHOLE_IMAGE = Box(0.0, 1.0, 0.0, 1.0)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Pixel bounds (x0, x1, y0, y1), half-open, of the true pixels of ``mask``; None if there are none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
