"""Helpers shared by the JeDi tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import numpy as np
from PIL import Image

SIZE = 32  # the tiny SD pipeline's native resolution (16x16 latents)
CAPTIONS = ("a photo of a dog", "a dog on the grass", "a photo of a cat", "a cat in the snow")


def random_images(n: int, seed: int, size: int = SIZE) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
