"""Fixtures for the DreamBlend pipeline tests (helpers live in pipeline_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from pipeline_helpers import add_random_lora

from dreamblend.testing import tiny_sd_components


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and far faster than on oversubscribed shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def lora_unet() -> torch.nn.Module:
    """The tiny SD UNet with two random LoRA adapters, "early" (G) and "late" (E)."""
    unet = tiny_sd_components(0)["unet"]
    add_random_lora(unet, "early", seed=10)
    add_random_lora(unet, "late", seed=11)
    return unet
