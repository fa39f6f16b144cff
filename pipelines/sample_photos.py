"""Real photos that ship with scikit-image, for the demo, the benchmarks and known-alpha composites."""

from __future__ import annotations

import numpy as np

from subjectpairs.pipelines.boxes import Box

# (scikit-image name, OpenImages class, subject box placed by hand)
SUBJECT_PHOTOS = (
    ("coffee", "Coffee cup", Box(0.28, 0.70, 0.03, 0.77)),
    ("chelsea", "Cat", Box(0.08, 0.85, 0.04, 1.0)),
    ("astronaut", "Person", Box(0.04, 0.72, 0.02, 1.0)),
    ("rocket", "Rocket", Box(0.40, 0.62, 0.25, 0.98)),
)
TEXTURES = ("brick", "grass", "gravel")


def photo(name: str) -> np.ndarray:
    """A scikit-image photo as HxWx3 uint8 (grey textures repeated over three channels)."""
    from skimage import data

    image = getattr(data, name)()
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3]
