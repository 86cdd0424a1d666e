"""Helpers shared by the metric and eval tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DREAMBOOTH = Path(__file__).parents[2].parent / "shared/data/dreambooth"
"""The DreamBooth benchmark subjects beside the checkout (present in CI)."""


def random_images(count: int, seed: int = 0, size: tuple[int, int] = (40, 48)) -> list[Image.Image]:
    """Random RGB images (width x height ``size``), different per seed."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)
    ]
