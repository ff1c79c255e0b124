"""Real photos that ship inside installed packages (no downloads): the astronaut and t1.jpg (six faces)."""

from __future__ import annotations

import importlib.resources
from functools import cache

import numpy as np
from PIL import Image


@cache
def astronaut() -> np.ndarray:
    """skimage's astronaut (Eileen Collins): (512, 512, 3) uint8 RGB, one face."""
    from skimage import data

    return data.astronaut()


@cache
def group_photo() -> np.ndarray:
    """insightface's t1.jpg: (886, 1280, 3) uint8 RGB, six faces."""
    path = importlib.resources.files("insightface") / "data" / "images" / "t1.jpg"
    return np.asarray(Image.open(str(path)).convert("RGB"))
