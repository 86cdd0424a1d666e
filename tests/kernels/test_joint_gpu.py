"""GPU-only checks of the compiled joint-attention kernels: bf16 accuracy, FLUX-sized layers against
the reference, torch.compile(fullgraph=True), the custom-op contract (opcheck), and the peak memory
of a FLUX-sized guidance step (no ``(B, H, L, L)`` tensor). The fp32/fp16 suite in
test_joint_kernels.py runs compiled on a GPU as well."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import assert_close
from test_joint_kernels import JointCase, run_case

from dreamblend.kernels import backend as kernels
from dreamblend.ops import joint_reference

pytestmark = pytest.mark.gpu
BF16, F16 = torch.bfloat16, torch.float16

BF16_CASES = [
    JointCase(1, 4, 77, 300, 64, False, None, True, False, BF16),
    JointCase(2, 3, 40, 217, 128, True, (3, 0, 3, 39), False, True, BF16, transposed=True),
    JointCase(1, 2, 33, 129, 80, True, None, True, True, BF16, grads="sum", kv_grad=False),
]


@pytest.mark.parametrize("op", ["capture", "guided"])
@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: c.id)
def test_bf16_matches_fp64_reference(case: JointCase, op: str, device: torch.device) -> None:
    run_case(case, device, op)


@pytest.mark.parametrize("text_first", [True, False], ids=["flux_order", "sd3_order"])
def test_flux_sized_layer_matches_reference(text_first: bool, device: torch.device) -> None:
    """L = 4608 keys (512 text + 4096 image) at FLUX's D = 128, four of its 24 heads, fp16."""
    run_case(JointCase(1, 4, 512, 4096, 128, text_first, (5, 6, 7, 300), True, False, F16), device, "guided")


def _joint_qkv(device, b=2, h=4, length=300, d=64, dtype=F16, requires_grad=True):
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(b, h, length, d, generator=gen).to(device, dtype).requires_grad_(requires_grad)
        for _ in "qkv"
    ]


@pytest.mark.parametrize("guided", [False, True], ids=["capture", "guided"])
def test_torch_compile_fullgraph(guided: bool, device: torch.device) -> None:
    q, k, v = _joint_qkv(device)
    tokens = torch.tensor([1, 5, 5], device=device)
    ref = torch.rand(2, 4, 223, 3, device=device) * 0.02

    def layer(q, k, v):
        if guided:
            return kernels.joint_guided_attention(q, k, v, ref, 0.125, (223, 77), tokens, False, False)
        return kernels.joint_capture_attention(q, k, v, 0.125, (223, 77), tokens, False, True)

    def step(fn):
        for t in (q, k, v):
            t.grad = None
        out, aux = fn(q, k, v)
        (out.float().square().mean() + aux.sum()).backward()
        return out.detach(), aux.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()

    eager = step(layer)
    compiled = step(torch.compile(layer, fullgraph=True))
    for a, b, what in zip(compiled, eager, ("out", "aux", "dq", "dk", "dv"), strict=True):
        assert_close(a, b.double(), F16, what)


def test_opcheck(device: torch.device) -> None:
    q, k, v = _joint_qkv(device, length=150, d=40)
    tokens = torch.tensor([3, 9, 3], device=device)
    ops = torch.ops.dreamblend
    torch.library.opcheck(
        ops.triton_joint_capture_attention.default, (q, k, v, tokens, 0.15, True, 0, 20, False)
    )
    ref = torch.rand(2, 4, 130, 3, device=device)
    args = (q, k, v, ref, tokens, 0.15, False, 130, 20, True)
    torch.library.opcheck(ops.triton_joint_guided_attention.default, args)
    d_out = torch.randn_like(q)
    bwd = (q.detach(), k.detach(), v.detach(), tokens, d_out, None, ref, torch.ones(2, device=device))
    torch.library.opcheck(
        ops.triton_joint_attention_backward.default, (*bwd, 0.15, False, True, True, 130, 20, True)
    )


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_flux_guidance_step_never_allocates_probabilities(device: torch.device) -> None:
    """One FLUX joint layer at 1024 px (24 heads, L = 4608, D = 128, bf16), 4 tokens, head mean:
    the step holds dQ, the recomputed out and per-row statistics, against 2 GB of eager probabilities."""
    b, h, n_text, n_image, d = 1, 24, 512, 4096, 128
    length = n_text + n_image
    q = torch.randn(b, h, length, d, device=device, dtype=BF16, requires_grad=True)
    k, v = (torch.randn(b, h, length, d, device=device, dtype=BF16) for _ in range(2))
    tokens = torch.tensor([5, 6, 7, 300], device=device)
    ref = torch.rand(b, n_image, 4, device=device) * 1e-3

    def step():
        _, loss = kernels.joint_guided_attention(q, k, v, ref, d**-0.5, (0, n_text), tokens, True, False)
        loss.sum().backward()

    step()  # compile outside the measurement
    q.grad = None
    budget = 3 * q.numel() * q.element_size() + (8 << 20)  # dQ, recomputed out, its fp32 row sums + slack
    probs_bytes = b * h * length * length * 4
    assert budget < probs_bytes / 20
    peak = _peak_bytes(step)
    assert peak <= budget, f"peak {peak / 2**20:.1f} MiB over the {budget / 2**20:.1f} MiB budget"


def test_reference_is_chunked(device: torch.device) -> None:
    """The torch reference's forward on a FLUX-sized layer stays far below its 2 GB of probabilities."""
    q, k, v = _joint_qkv(device, b=1, h=24, length=4608, d=128, dtype=BF16, requires_grad=False)
    peak = _peak_bytes(
        lambda: joint_reference.joint_capture_attention(q, k, v, 0.09, (0, 512), None, True, False)
    )
    assert peak < 24 * 4608 * 4608 * 4 / 5  # chunks, fp32 copies of k and v, out and maps: ~0.2 GB
