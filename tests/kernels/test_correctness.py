"""The kernels (interpreted on CPU, compiled on CUDA) against the fp64 reference: outputs, maps,
losses and dQ/dK/dV, over a covering set of shapes, modes and layouts; the full product is slow."""

from __future__ import annotations

import itertools

import pytest
import torch
from kernel_cases import Case, assert_close, check_case

from dreamblend.kernels import backend as kernels
from dreamblend.ops import reference

F32, F16 = torch.float32, torch.float16


def subset(n: int) -> tuple[int, ...]:
    """A token list with duplicates (and the last token), valid for ``n`` keys."""
    return (n - 1, 0, n // 2, 0)


# Every value of every axis appears at least once: M {1, 63, 100, 256}, N {1, 77, 154},
# D {40, 64, 80, 160}, H {1, 5, 8}, B {1, 3}, tokens, map mode, dtype, layout, gradient mode.
COVERING = [
    Case(1, 1, 1, 1, 40),
    Case(3, 5, 63, 77, 64, subset(77), True, F32, "transposed"),
    Case(1, 8, 100, 77, 80, None, True, F16),
    Case(1, 1, 256, 77, 160, subset(77), False, F16, grads="sum"),
    Case(3, 1, 100, 77, 40, None, False, F16, "broadcast"),
    Case(1, 5, 63, 154, 160, subset(154), True, F32, grads="maps", kv_grad=False),
    Case(3, 8, 1, 77, 64, None, False, F32, "transposed", grads="out"),
    Case(1, 8, 256, 1, 80, None, True, F32),
    Case(3, 5, 100, 154, 64, subset(154), False, F16, "transposed", kv_grad=False),
    Case(1, 1, 63, 77, 80, subset(77), True, F16, "broadcast", grads="sum"),
    Case(3, 1, 256, 154, 40, None, False, F32, grads="maps"),
    Case(1, 5, 1, 1, 160, (0, 0), False, F16),
    Case(3, 8, 63, 77, 40, None, True, F16, grads="out"),
]


def _full_product() -> list[Case]:
    layouts = itertools.cycle(["contiguous", "transposed", "broadcast"])
    grads = itertools.cycle(["both", "sum", "out", "maps", "both"])
    cases = []
    bools = (False, True)
    axes = ((1, 63, 100, 256), (1, 77, 154), (40, 64, 80, 160), (1, 5, 8), (1, 3), bools, bools, (F32, F16))
    for m, n, d, h, b, sel, hm, dt in itertools.product(*axes):
        cases.append(Case(b, h, m, n, d, subset(n) if sel else None, hm, dt, next(layouts), next(grads)))
    return cases


@pytest.mark.parametrize("op", ["capture", "guided"])
@pytest.mark.parametrize("case", COVERING, ids=lambda c: c.id)
def test_matches_fp64_reference(case: Case, op: str, device: torch.device) -> None:
    check_case(case, device, op)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["capture", "guided"])
@pytest.mark.parametrize("case", _full_product(), ids=lambda c: c.id)
def test_matches_fp64_reference_full_product(case: Case, op: str, device: torch.device) -> None:
    check_case(case, device, op)


def test_head_mean_maps_are_the_mean_of_head_maps(device: torch.device) -> None:
    q, k, v = (torch.randn(2, 4, 40, 32, device=device) for _ in range(3))
    tokens = torch.tensor([5, 1, 5], device=device)
    _, per_head = kernels.capture_attention(q, k, v, 0.2, tokens, False)
    _, mean = kernels.capture_attention(q, k, v, 0.2, tokens, True)
    assert_close(mean, per_head.double().mean(dim=1), torch.float32, "head-mean maps")


@pytest.mark.parametrize(
    ("dtype", "n", "d", "n_tokens"),
    [(F32, 300, 16, None), (F32, 20, 288, None), (torch.float64, 20, 16, None), (F32, 77, 16, 80)],
    ids=["keys>256", "head_dim>256", "float64", "large-token-subset"],
)
def test_unsupported_problems_fall_back_to_the_reference(dtype, n, d, n_tokens, device: torch.device) -> None:
    q = torch.randn(1, 2, 5, d, dtype=dtype, device=device)
    k, v = (torch.randn(1, 2, n, d, dtype=dtype, device=device) for _ in range(2))
    tokens = None if n_tokens is None else torch.arange(n_tokens, device=device) % n
    out, maps = kernels.capture_attention(q, k, v, 0.1, tokens, False)
    out_ref, maps_ref = reference.capture_attention(q, k, v, 0.1, tokens, False)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(maps, maps_ref, rtol=0, atol=0)
