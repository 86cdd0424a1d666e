"""Kernel tests run the real kernels: compiled on CUDA, in Triton's interpreter on CPU.

``triton.jit`` (on these kernels and on triton's own standard library, ``tl.sum`` and friends)
picks compiled or interpreted when a function is defined, i.e. when triton is first imported, so
the choice is per process: tests/conftest.py sets TRITON_INTERPRET=1 on machines without CUDA
before anything imports triton. The ahead-of-time compile tests need triton in compiled mode and
run in a subprocess.
"""

from __future__ import annotations

import pytest
import torch

from dreamblend.kernels.launch import INTERPRETED


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels run: CUDA when present, else CPU through the interpreter."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not INTERPRETED:
        pytest.fail(
            "no GPU and the kernels are compiled: TRITON_INTERPRET=1 must be set before triton is first "
            "imported (tests/conftest.py does so; export it when running these tests another way)"
        )
    return torch.device("cpu")
