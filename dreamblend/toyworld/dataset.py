"""The base world as a torch Dataset for training the toy text-to-image model."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from dreamblend.toyworld.scenes import Sample, Scene, caption, make_sample, sample_scene

__all__ = ["ToyWorldDataset", "to_tensor"]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 to float32 CxHxW in [-1, 1], the range SD's VAE and UNet train on."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ToyWorldDataset(Dataset):
    """`length` captioned base-world images; item `i` depends only on (seed, i), never on worker or order.

    Held-out combinations never appear. Items are (image tensor, caption); `sample(i)` gives the same
    item with its scene ground truth and mask, `describe(i)` its scene and caption alone.
    """

    def __init__(self, seed: int, length: int, size: int = 64) -> None:
        self.seed = seed
        self.length = length
        self.size = size

    def __len__(self) -> int:
        return self.length

    def describe(self, index: int) -> tuple[Scene, str]:
        """Item `index`'s scene and caption, without the cost of rendering it."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, index])
        scene = sample_scene(rng)
        return scene, caption(scene, rng)

    def sample(self, index: int) -> Sample:
        """Item `index` with its ground truth."""
        return make_sample(*self.describe(index), self.size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        sample = self.sample(index)
        return to_tensor(sample.rendered.image), sample.caption
