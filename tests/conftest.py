"""Shared test configuration: GPU tests skip without CUDA; CPU tests always run.

Without CUDA, Triton kernels run under the interpreter. triton reads TRITON_INTERPRET when kernels
are defined, so it is set here, before any test module imports dreamblend. The C++ extension is built
before collection, where a C++ compiler exists: tests that choose backends when they are collected
(``available_backends()``) would otherwise leave its CPU path out on a fresh machine.
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Tiny models are overhead-bound; one thread avoids OpenMP spinning on a busy machine.
    # DREAMBLEND_TEST_THREADS=2 runs the suite multi-threaded, to check tolerances hold there too.
    torch.set_num_threads(int(os.environ.get("DREAMBLEND_TEST_THREADS", "1")))


def pytest_configure(config):
    from dreamblend.ops import cpp

    if cpp.AVAILABLE or shutil.which(os.environ.get("CXX", "c++")) is None:
        return  # without a compiler, tests/test_cpp_backend.py says so
    try:
        cpp.build()
    except Exception as exc:  # noqa: BLE001 - tests/test_cpp_backend.py fails with the compiler's message
        warnings.warn(f"building the C++ extension failed: {exc}", stacklevel=1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
