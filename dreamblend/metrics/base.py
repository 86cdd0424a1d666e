"""The metric interface: an image set, its prompts and the subject's reference images in, one score per
image out. The DreamBooth benchmark's CLIP/DINO metrics and the toy world's metrics implement it, so
``dreamblend eval`` scores a real run and a toy run alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from PIL import Image

Role = Literal["subject", "prompt", "diversity"]
"""What a metric measures: subject fidelity (DINO, CLIP-I), prompt fidelity (CLIP-T) or diversity.
Operating points are chosen by F1 of a "subject" and a "prompt" metric."""


class Metric(ABC):
    """One score per image; higher is better for every role.

    ``score`` gets every image of one subject (for diversity: of one prompt), the prompt each was
    generated from (with the rare token, e.g. "a sks dog on the beach") and the subject's real
    images; it checks them once and hands a non-empty set to :meth:`compute`, which subclasses
    write. Implementations batch internally and return float64 scores in image order.
    """

    name: ClassVar[str]
    """Column name in eval outputs, e.g. "dino", "clip_i", "clip_t"."""
    role: ClassVar[Role]
    needs_references: ClassVar[bool] = False

    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        references: Sequence[Image.Image] = (),
    ) -> np.ndarray:
        """Scores of shape ``(len(images),)``: the shared input checks, then :meth:`compute`."""
        self.check_inputs(images, prompts, references)
        if not images:
            return np.zeros(0)
        return self.compute(images, prompts, references)

    @abstractmethod
    def compute(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image]
    ) -> np.ndarray:
        """The metric itself, on a checked, non-empty image set."""

    def check_inputs(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image]
    ) -> None:
        """The errors every implementation shares: mismatched lengths, missing references."""
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts; give one each")
        if self.needs_references and not references:
            raise ValueError(f"{self.name} compares with the subject's real images; no references given")
