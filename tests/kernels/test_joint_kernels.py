"""The joint-attention (MMDiT) kernels, interpreted on CPU or compiled on CUDA, against the fp64 torch
reference (itself held to eager autograd through an explicit softmax in tests/test_joint_reference.py):
outputs, maps, losses and dQ/dK/dV with L off the block size, text first (FLUX) and last (SD3),
token subsets with duplicates and several token blocks, both map modes and the text-only softmax."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from kernel_cases import LOSS_TOL, assert_close

from dreamblend import ops
from dreamblend.kernels import backend as kernels
from dreamblend.kernels import joint_attention
from dreamblend.ops import cpp, joint_reference

F32, F16 = torch.float32, torch.float16


@dataclass(frozen=True)
class JointCase:
    b: int
    h: int
    n_text: int
    n_image: int
    d: int
    text_first: bool = True  # FLUX: text then image; SD3's JointAttnProcessor2_0: image then text
    tokens: tuple[int, ...] | None = None  # indices within the text block
    head_mean: bool = False
    text_softmax: bool = False
    dtype: torch.dtype = F32
    transposed: bool = False  # (B, L, H, D) memory, as diffusers' processors hold q, k, v
    grads: str = "both"  # "out" or "maps" alone; "sum": stride-0 gradients of out.sum() + aux.sum()
    kv_grad: bool = True

    @property
    def text(self) -> tuple[int, int]:
        return (0, self.n_text) if self.text_first else (self.n_image, self.n_text)

    @property
    def id(self) -> str:
        order = "text_first" if self.text_first else "text_last"
        tok = "all" if self.tokens is None else f"tok{len(self.tokens)}"
        mode = ("mean" if self.head_mean else "heads") + ("-textsoftmax" if self.text_softmax else "")
        dt = str(self.dtype).removeprefix("torch.")
        shape = f"B{self.b}H{self.h}T{self.n_text}I{self.n_image}D{self.d}"
        extra = ("-transposed" if self.transposed else "") + ("" if self.kv_grad else "-q_only")
        return f"{shape}-{order}-{tok}-{mode}-{dt}-{self.grads}{extra}"


def _leaves(case: JointCase, device: torch.device, seed: int) -> list[torch.Tensor]:
    """q, k, v in float64 already rounded to the case dtype, in the case's memory layout."""
    gen = torch.Generator().manual_seed(seed)
    length = case.n_text + case.n_image
    shape = (case.b, length, case.h, case.d) if case.transposed else (case.b, case.h, length, case.d)
    return [
        torch.randn(shape, generator=gen, dtype=torch.float64).to(case.dtype).double().to(device)
        for _ in "qkv"
    ]


def _view(case: JointCase, t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2) if case.transposed else t


def run_case(case: JointCase, device: torch.device, op: str, seed: int = 0) -> None:
    """Compare outputs and every requested input gradient of ``op`` with the fp64 reference."""
    tokens = ops.normalize_tokens(case.tokens, case.n_text, device)  # the backends take indices in range
    scale = 1.0 / math.sqrt(case.d)
    args = (case.text, tokens, case.head_mean, case.text_softmax)
    gen = torch.Generator().manual_seed(seed + 1)
    leaves = _leaves(case, device, seed)
    wants = [True, case.kv_grad, case.kv_grad]
    ref64 = [t.clone().requires_grad_(w) for t, w in zip(leaves, wants, strict=True)]
    mine = [t.to(case.dtype).requires_grad_(w) for t, w in zip(leaves, wants, strict=True)]
    if op == "capture":
        run_ref = lambda q, k, v: joint_reference.joint_capture_attention(q, k, v, scale, *args)
        run_mine = lambda q, k, v: kernels.joint_capture_attention(q, k, v, scale, *args)
    else:
        with torch.no_grad():
            _, true_maps = joint_reference.joint_capture_attention(
                *[_view(case, t) for t in leaves], scale, *args
            )
        # a margin from the true maps: the L1 sign must not flip under the kernel's rounding
        sign = torch.randint(0, 2, true_maps.shape, generator=gen).to(device) * 2 - 1
        target = true_maps + sign * (0.02 + 0.03 * torch.rand(true_maps.shape, generator=gen).to(device))
        run_ref = lambda q, k, v: joint_reference.joint_guided_attention(q, k, v, target, scale, *args)
        run_mine = lambda q, k, v: kernels.joint_guided_attention(q, k, v, target.float(), scale, *args)

    out_ref, aux_ref = run_ref(*[_view(case, t) for t in ref64])
    out, aux = run_mine(*[_view(case, t) for t in mine])
    g_out = torch.randn(out_ref.shape, generator=gen, dtype=torch.float64).to(case.dtype).double().to(device)
    g_aux = torch.randn(aux_ref.shape, generator=gen, dtype=torch.float64).float().double().to(device)
    for o, a in ((out_ref, aux_ref), (out, aux)):
        if case.grads == "sum":
            total = o.sum() + a.sum()
        else:
            total = 0
            if case.grads in ("both", "out"):
                total = total + (o.double() * g_out).sum()
            if case.grads in ("both", "maps"):
                total = total + (a.double() * g_aux).sum()
        total.backward()

    assert out.dtype == case.dtype and out.shape == out_ref.shape
    assert_close(out, out_ref, case.dtype, "out")
    assert aux.dtype == F32 and aux.shape == aux_ref.shape
    if op == "capture":
        assert_close(aux, aux_ref, case.dtype, "maps")
    else:
        rel = ((aux.double() - aux_ref).abs() / aux_ref.abs()).max().item()
        assert rel <= LOSS_TOL[case.dtype], f"loss: relative error {rel:.3e}"
    for name, t_mine, t_ref, wanted in zip("qkv", mine, ref64, wants, strict=True):
        if wanted:
            assert t_mine.grad is not None and t_mine.grad.dtype == case.dtype, name
            assert_close(t_mine.grad, t_ref.grad, case.dtype, f"d{name}")


# L = n_text + n_image is never a multiple of the 64 (D <= 64) or 32 (D > 64) blocks, and the text
# block's edges fall inside key blocks; 77 selected tokens span three token blocks of 32.
COVERING = [
    JointCase(1, 1, 1, 1, 16),
    JointCase(2, 3, 7, 37, 16, True, (1, 3, 3, -1)),
    JointCase(1, 2, 9, 70, 40, False, (0, 8), head_mean=True),
    JointCase(1, 2, 77, 60, 64, True, None, False, True, transposed=True),
    JointCase(2, 2, 12, 53, 80, False, None, True, True, grads="maps", kv_grad=False),
    JointCase(1, 3, 20, 45, 24, True, (19, 0, 7), True, False, F16, grads="sum"),
    JointCase(1, 2, 33, 40, 128, False, (5, 5, 32), False, True, F16, transposed=True),
    JointCase(2, 1, 5, 90, 32, False, None, False, False, grads="out"),
    JointCase(1, 2, 40, 31, 16, True, tuple(range(0, 40, 3)), True, True, grads="sum", kv_grad=False),
]


@pytest.mark.parametrize("op", ["capture", "guided"])
@pytest.mark.parametrize("case", COVERING, ids=lambda c: c.id)
def test_matches_fp64_reference(case: JointCase, op: str, device: torch.device) -> None:
    run_case(case, device, op)


def test_flux_and_sd3_orders_give_the_same_maps(device: torch.device) -> None:
    """The same tokens, text first or last, give the same maps (a rotation of the positions)."""
    gen = torch.Generator().manual_seed(0)
    text, image = ([torch.randn(1, 2, n, 32, generator=gen).to(device) for _ in "qkv"] for n in (9, 50))
    first = [torch.cat([t, i], dim=2) for t, i in zip(text, image, strict=True)]
    last = [torch.cat([i, t], dim=2) for t, i in zip(text, image, strict=True)]
    out_f, maps_f = kernels.joint_capture_attention(*first, 0.2, (0, 9), None, False, False)
    out_l, maps_l = kernels.joint_capture_attention(*last, 0.2, (50, 9), None, False, False)
    assert_close(maps_f, maps_l.double(), F32, "maps")
    assert_close(out_f[:, :, 9:], out_l[:, :, :50].double(), F32, "image rows of out")


@pytest.mark.parametrize("op", ["capture", "guided"])
def test_two_runs_are_bitwise_equal(op: str, device: torch.device) -> None:
    def once() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 2, 75, 32, generator=gen).to(device).requires_grad_() for _ in "qkv")
        tokens = torch.tensor([3, 0, 3], device=device)
        if op == "capture":
            out, aux = kernels.joint_capture_attention(q, k, v, 0.2, (0, 11), tokens, True, False)
        else:
            ref = torch.full((2, 64, 3), 0.01, device=device)
            out, aux = kernels.joint_guided_attention(q, k, v, ref, 0.2, (0, 11), tokens, True, False)
        (out.sum() + aux.sum()).backward()
        return [out, aux, q.grad, k.grad, v.grad]

    for a, b in zip(once(), once(), strict=True):
        assert torch.equal(a, b)


def test_dispatcher_routes_joint_ops(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 30, 16, generator=gen).to(device) for _ in "qkv")
    kw = dict(text=(22, 8), tokens=[7, -1], head_mean=True)
    out, maps = ops.joint_capture_attention(q, k, v, backend="triton", **kw)
    out_ref, maps_ref = ops.joint_capture_attention(q.double(), k.double(), v.double(), backend="torch", **kw)
    assert_close(out, out_ref, F32, "out")
    assert_close(maps, maps_ref, F32, "maps")
    # What "auto" picks: triton on CUDA; on CPU the C++ backend where it is built, else the reference.
    auto = "triton" if device.type == "cuda" else ("cpp" if cpp.AVAILABLE else "torch")
    _, maps_auto = ops.joint_capture_attention(q, k, v, **kw)
    _, maps_expected = ops.joint_capture_attention(q, k, v, backend=auto, **kw)
    assert torch.equal(maps_auto, maps_expected)


@pytest.mark.parametrize(("dtype", "d"), [(torch.float64, 16), (F32, 272)], ids=["float64", "head_dim>256"])
def test_unsupported_problems_fall_back_to_the_reference(dtype, d, device: torch.device) -> None:
    assert not joint_attention.supports_joint(dtype, d)
    q, k, v = (torch.randn(1, 2, 12, d, dtype=dtype, device=device) for _ in "qkv")
    out, maps = kernels.joint_capture_attention(q, k, v, 0.1, (0, 4), None, False, False)
    out_ref, maps_ref = joint_reference.joint_capture_attention(q, k, v, 0.1, (0, 4), None, False, False)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(maps, maps_ref, rtol=0, atol=0)


def test_tiles_shrink_with_the_head() -> None:
    small, large = joint_attention.joint_tiles(64), joint_attention.joint_tiles(128)
    assert (small.block_m, small.d_pad) == (64, 64) and (large.block_m, large.d_pad) == (32, 128)
    assert joint_attention.joint_tiles(1).d_pad == 16  # tl.dot needs every dim >= 16
