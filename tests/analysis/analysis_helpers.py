"""Checks shared by the analysis tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def check_png(path: Path, min_size: tuple[int, int] = (200, 150)) -> np.ndarray:
    """A real, non-blank PNG of at least ``min_size`` (width, height) pixels; returns its RGB pixels."""
    assert path.is_file() and path.stat().st_size > 2000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1], image.size
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 5 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # not a constant fill
    return pixels
