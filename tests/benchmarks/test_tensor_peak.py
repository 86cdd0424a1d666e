"""The tensor peak counts what a call allocates and holds at once, and nothing it did not allocate."""

from __future__ import annotations

import torch

from benchmarks.tensor_peak import tensor_peak_bytes

MIB = 2**20


def test_peak_is_the_most_held_at_once_not_the_total_allocated() -> None:
    def call() -> torch.Tensor:
        a = torch.empty(MIB // 4)  # 1 MiB of float32
        b = torch.empty(MIB // 2)  # 2 MiB: 3 held
        del a
        c = torch.empty(MIB // 8)  # 0.5 MiB: 2.5 held
        del b
        return c

    assert tensor_peak_bytes(call) == 3 * MIB


def test_tensors_live_before_the_call_are_not_counted() -> None:
    before = torch.ones(MIB)  # 4 MiB, freed during the call

    def call() -> None:
        nonlocal before
        before = None
        torch.empty(MIB // 4).fill_(1.0)  # 1 MiB, freed at once

    assert tensor_peak_bytes(call) == MIB


def test_a_temporary_inside_an_op_counts() -> None:
    x = torch.randn(256, 256, dtype=torch.float64)
    # (x @ x).sum(): the 512 KiB product exists only inside the expression
    assert tensor_peak_bytes(lambda: (x @ x).sum()) >= 256 * 256 * 8
