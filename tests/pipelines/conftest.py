"""Fixtures for the DreamBlend pipeline tests (helpers live in pipeline_helpers.py)."""

from __future__ import annotations

import pytest
import torch
from pipeline_helpers import add_random_lora

from dreamblend.testing import tiny_sd_components


@pytest.fixture
def lora_unet() -> torch.nn.Module:
    """The tiny SD UNet with two random LoRA adapters, "early" (G) and "late" (E)."""
    unet = tiny_sd_components(0)["unet"]
    add_random_lora(unet, "early", seed=10)
    add_random_lora(unet, "late", seed=11)
    return unet
