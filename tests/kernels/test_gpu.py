"""GPU-only checks of the compiled kernels: bf16 accuracy, torch.compile(fullgraph=True), the
custom-op contract (opcheck), and peak memory with no ``(B, H, M, N)`` tensor. The fp32/fp16
correctness suite in test_correctness.py runs compiled on a GPU as well."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import Case, assert_close, check_case
from torch import nn

from dreamblend.kernels import backend as kernels
from dreamblend.kernels import config
from dreamblend.ops import reference

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16

BF16_CASES = [
    Case(1, 8, 256, 77, 40, None, False, BF16),
    Case(3, 5, 100, 154, 160, (153, 0, 77, 0), True, BF16, "transposed"),
    Case(2, 10, 63, 77, 64, (1, 2), False, BF16, "broadcast", grads="sum"),
    Case(1, 20, 256, 77, 64, None, True, BF16, grads="maps", kv_grad=False),
]


@pytest.mark.parametrize("op", ["capture", "guided"])
@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: c.id)
def test_bf16_matches_fp64_reference(case: Case, op: str, device: torch.device) -> None:
    check_case(case, device, op)


class CrossAttention(nn.Module):
    """A diffusers-style cross-attention block around the kernels (projections, head split)."""

    def __init__(self, dim: int = 320, ctx_dim: int = 768, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.heads, -1).transpose(1, 2)

    def forward(self, x, ctx, ref=None, tokens=None):
        q, k, v = self.split(self.to_q(x)), self.split(self.to_k(ctx)), self.split(self.to_v(ctx))
        scale = q.shape[-1] ** -0.5
        if ref is None:
            out, aux = kernels.capture_attention(q, k, v, scale, tokens, True)
        else:
            out, aux = kernels.guided_attention(q, k, v, ref, scale, tokens, False)
        return self.to_out(out.transpose(1, 2).flatten(2)), aux


@pytest.mark.parametrize("guided", [False, True], ids=["capture", "guided"])
def test_torch_compile_fullgraph(guided: bool, device: torch.device) -> None:
    torch.manual_seed(0)
    model = CrossAttention().to(device, torch.float16)
    x = torch.randn(2, 1024, 320, device=device, dtype=torch.float16, requires_grad=True)
    ctx = torch.randn(2, 77, 768, device=device, dtype=torch.float16)
    tokens = torch.tensor([1, 5, 5], device=device)
    ref = torch.rand(2, 8, 1024, 3, device=device) * 0.02 if guided else None

    def step(fn):
        x.grad = None
        y, aux = fn(x, ctx, ref, tokens)
        (y.float().square().mean() + aux.sum()).backward()
        return y.detach(), aux.detach(), x.grad.clone()

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True))
    for a, b, what in zip(compiled, eager, ("out", "aux", "dx"), strict=True):
        assert_close(a, b.double(), torch.float16, what)


def test_opcheck(device: torch.device) -> None:
    q, k, v = (
        torch.randn(2, 4, length, 40, device=device, dtype=torch.float16, requires_grad=True)
        for length in (100, 77, 77)
    )
    tokens = torch.tensor([3, 9, 3], device=device)
    ops = torch.ops.dreamblend
    torch.library.opcheck(ops.triton_capture_attention.default, (q, k, v, tokens, 0.15, True))
    ref = torch.rand(2, 4, 100, 3, device=device)
    torch.library.opcheck(ops.triton_guided_attention.default, (q, k, v, ref, tokens, 0.15, False))
    d_out = torch.randn_like(q)
    args = (q.detach(), k.detach(), v.detach(), tokens, d_out, None, ref, torch.ones(2, device=device))
    torch.library.opcheck(ops.triton_attention_backward.default, (*args, 0.15, False, True, True))


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("head_mean", [False, True], ids=["heads", "mean"])
def test_guidance_step_never_allocates_probabilities(head_mean: bool, device: torch.device) -> None:
    """SD1.5's largest cross-attention layer: out + dQ (+ the recomputed head-mean map) only."""
    b, h, m, n, d = 2, 8, 4096, 77, 40
    q = torch.randn(b, h, m, d, device=device, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(b, h, n, d, device=device, dtype=torch.float16) for _ in range(2))
    ref = torch.rand((b, m, n) if head_mean else (b, h, m, n), device=device) * 0.02
    probs_bytes = b * h * m * n * 4

    def step():
        _, loss = kernels.guided_attention(q, k, v, ref, d**-0.5, None, head_mean)
        loss.sum().backward()

    step()  # compile outside the measurement
    q.grad = None
    budget = 2 * q.numel() * q.element_size() + (b * m * n * 4 if head_mean else 0) + (1 << 20)
    assert budget < probs_bytes
    peak = _peak_bytes(step)
    assert peak <= budget, f"peak {peak / 2**20:.1f} MiB over the {budget / 2**20:.1f} MiB budget"


def test_training_step_memory_is_outputs_plus_bounded_partials(device: torch.device) -> None:
    """With dK/dV the backward adds per-program partials, bounded by DKV_PROGRAMS, not by M."""
    b, h, m, n, d = 2, 8, 4096, 77, 40
    q = torch.randn(b, h, m, d, device=device, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(b, h, n, d, device=device, dtype=torch.float16, requires_grad=True) for _ in range(2))
    ref = torch.rand(b, h, m, n, device=device) * 0.02

    def step():
        out, loss = kernels.guided_attention(q, k, v, ref, d**-0.5, None, False)
        (out.float().mean() + loss.sum()).backward()

    step()
    q.grad = k.grad = v.grad = None
    block_m = config.select_config("backward", d, n, None).block_m
    partial = b * h * config.backward_programs(m, block_m, b * h, True) * n * d * 4  # one of dK, dV
    assert partial < b * h * m * n * 4 / 2
    tensors = 3 * q.numel() * 2 + 2 * k.numel() * 2  # out, d_out, dq, dk, dv
    peak = _peak_bytes(step)
    assert peak <= tensors + 2 * partial + q.numel() * 4 + (1 << 20)  # + out.float() in the loss


def test_matches_reference_on_sd_layer_shapes(device: torch.device) -> None:
    """SDXL's 20-head, D=64 layer and SD1.5's D=160 layer, fp16, against the fp32 reference."""
    for h, m, d in ((20, 1024, 64), (8, 64, 160)):
        q = torch.randn(2, h, m, d, device=device, dtype=torch.float16)
        k, v = (torch.randn(2, h, 77, d, device=device, dtype=torch.float16) for _ in range(2))
        out, maps = kernels.capture_attention(q, k, v, d**-0.5, None, False)
        q64, k64, v64 = q.double(), k.double(), v.double()
        out_ref, maps_ref = reference.capture_attention(q64, k64, v64, d**-0.5, None, False)
        assert_close(out, out_ref, torch.float16, "out")
        assert_close(maps, maps_ref, torch.float16, "maps")
