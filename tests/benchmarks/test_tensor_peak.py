"""The tensor peak counts what a step holds at once, with what the step before left to it, and
nothing older."""

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


def test_what_the_step_before_left_counts_until_it_is_freed() -> None:
    kept = [torch.empty(MIB // 4)]  # older than the session: its free is not the step's

    def call() -> None:
        kept.append(torch.empty(MIB // 4))  # 1 MiB for the next call: 2 held with the last one's
        del kept[0]  # the last call's: 1 held
        torch.empty(MIB // 2).fill_(1.0)  # a 2 MiB temporary: 3 held

    assert tensor_peak_bytes(call) == 3 * MIB


def test_tensors_older_than_the_step_before_are_not_counted() -> None:
    older = [torch.ones(MIB)]  # 4 MiB, freed by the first call

    def call() -> None:
        older.clear()
        torch.empty(MIB // 4).fill_(1.0)  # 1 MiB, freed at once

    assert tensor_peak_bytes(call) == MIB


def test_a_temporary_inside_an_op_counts() -> None:
    x = torch.randn(256, 256, dtype=torch.float64)
    # (x @ x).sum(): the 512 KiB product exists only inside the expression
    assert tensor_peak_bytes(lambda: (x @ x).sum()) >= 256 * 256 * 8
