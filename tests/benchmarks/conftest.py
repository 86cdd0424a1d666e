"""The benchmarks live in the source tree (not the installed package): import them from the checkout."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True, scope="package")
def one_thread() -> Iterator[None]:
    """These tests check results, not speed; on a shared CI machine two OpenMP workers spinning against
    other processes make tiny UNets many times slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
