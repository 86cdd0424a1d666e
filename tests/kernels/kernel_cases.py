"""Problem builder and checks shared by the kernel tests: the kernels against the fp64 reference.

Inputs are drawn in float64, rounded to the test dtype, and the reference runs on the rounded
values in float64 (``dreamblend.ops.reference``, itself checked against eager autograd), so a
mismatch measures the kernel's arithmetic only. Guidance references are placed a margin away
from the true maps, so the L1 sign cannot flip under rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dreamblend.kernels import backend as kernels
from dreamblend.ops import reference

# max |kernel - reference| <= TOL * max(|reference|, 1): fp32 runs IEEE dots (exact in the
# interpreter); half inputs round P and dS to the input dtype for the tensor-core products.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
LOSS_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative, per sample


@dataclass(frozen=True)
class Case:
    """One problem; ``layout`` and ``grads`` pick the input strides and which outputs get gradients."""

    b: int
    h: int
    m: int
    n: int
    d: int
    tokens: tuple[int, ...] | None = None
    head_mean: bool = False
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"  # "transposed": (B, L, H, D) memory; "broadcast": k, v stride 0 over B
    grads: str = "both"  # "out" or "maps" alone; "sum": stride-0 gradients of out.sum() + maps.sum()
    kv_grad: bool = True

    @property
    def id(self) -> str:
        tok = "all" if self.tokens is None else f"tok{len(self.tokens)}"
        mode = "mean" if self.head_mean else "heads"
        dt = str(self.dtype).removeprefix("torch.")
        kv = "" if self.kv_grad else "-q_only"
        shape = f"B{self.b}H{self.h}M{self.m}N{self.n}D{self.d}"
        return f"{shape}-{tok}-{mode}-{dt}-{self.layout}-{self.grads}{kv}"


def _layout(base: Tensor, layout: str, is_kv: bool, batch: int) -> Tensor:
    if layout == "transposed":
        return base.transpose(1, 2)
    if layout == "broadcast" and is_kv:
        return base.expand(batch, *base.shape[1:])
    return base


def _leaves(case: Case, device: torch.device, seed: int) -> list[Tensor]:
    """q, k, v storage in float64 (already rounded to the case dtype), in the layout's memory shape."""
    gen = torch.Generator().manual_seed(seed)
    shapes = []
    for length, is_kv in ((case.m, False), (case.n, True), (case.n, True)):
        batch = 1 if case.layout == "broadcast" and is_kv else case.b
        if case.layout == "transposed":
            shapes.append((batch, length, case.h, case.d))
        else:
            shapes.append((batch, case.h, length, case.d))
    draws = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    return [t.to(case.dtype).double().to(device) for t in draws]


def _views(case: Case, leaves: list[Tensor]) -> list[Tensor]:
    return [_layout(t, case.layout, i > 0, case.b) for i, t in enumerate(leaves)]


def _token_tensor(case: Case, device: torch.device) -> Tensor | None:
    return None if case.tokens is None else torch.tensor(case.tokens, dtype=torch.long, device=device)


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual.double() - expected).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3e} > {TOL[dtype]:.1e} * {scale:.3g}"


def _run(case: Case, device: torch.device, op: str, seed: int) -> dict[str, Tensor]:
    """Outputs and input gradients of one op, for the kernels and for the fp64 reference."""
    tokens = _token_tensor(case, device)
    scale = 1.0 / math.sqrt(case.d)
    gen = torch.Generator().manual_seed(seed + 1)
    leaves64 = _leaves(case, device, seed)
    wants = [True, case.kv_grad, case.kv_grad]
    ref64 = [t.clone().requires_grad_(w) for t, w in zip(leaves64, wants, strict=True)]
    mine = [t.to(case.dtype).requires_grad_(w) for t, w in zip(leaves64, wants, strict=True)]

    probs = reference.attention_probs(*[t.detach() for t in _views(case, ref64)[:2]], scale)
    true_maps = reference.select_maps(probs, tokens, case.head_mean)
    if op == "capture":
        run_ref = lambda q, k, v: reference.capture_attention(q, k, v, scale, tokens, case.head_mean)
        run_mine = lambda q, k, v: kernels.capture_attention(q, k, v, scale, tokens, case.head_mean)
    else:
        sign = torch.randint(0, 2, true_maps.shape, generator=gen).to(device) * 2 - 1
        margin = 0.02 + 0.03 * torch.rand(true_maps.shape, generator=gen, dtype=torch.float64).to(device)
        target = true_maps + sign * margin
        run_ref = lambda q, k, v: reference.guided_attention(q, k, v, target, scale, tokens, case.head_mean)
        run_mine = lambda q, k, v: kernels.guided_attention(
            q, k, v, target.float(), scale, tokens, case.head_mean
        )

    out_ref, aux_ref = run_ref(*_views(case, ref64))
    out, aux = run_mine(*_views(case, mine))
    g_out = torch.randn(out_ref.shape, generator=gen, dtype=torch.float64).to(case.dtype).double().to(device)
    g_aux = torch.randn(aux_ref.shape, generator=gen, dtype=torch.float64).float().double().to(device)
    for o, a in ((out_ref, aux_ref), (out, aux)):
        if case.grads == "sum":
            loss = o.sum() + a.sum()
        else:
            terms = []
            if case.grads in ("both", "out"):
                terms.append((o.double() * g_out).sum())
            if case.grads in ("both", "maps"):
                terms.append((a.double() * g_aux).sum())
            loss = sum(terms)
        loss.backward()
    result = {"out": (out, out_ref), "aux": (aux, aux_ref)}
    for name, t_mine, t_ref, w in zip("qkv", mine, ref64, wants, strict=True):
        if w:
            result[f"d{name}"] = (t_mine.grad, t_ref.grad)
    return result


def check_case(case: Case, device: torch.device, op: str, seed: int = 0) -> None:
    """Compare outputs and every requested input gradient of ``op`` with the fp64 reference."""
    result = _run(case, device, op, seed)
    out, out_ref = result.pop("out")
    assert out.dtype == case.dtype and out.shape == out_ref.shape
    assert_close(out, out_ref, case.dtype, "out")
    aux, aux_ref = result.pop("aux")
    assert aux.dtype == torch.float32 and aux.shape == aux_ref.shape
    if op == "capture":
        assert_close(aux, aux_ref, case.dtype, "maps")
    else:
        rel = ((aux.double() - aux_ref).abs() / aux_ref.abs()).max().item()
        assert rel <= LOSS_TOL[case.dtype], f"loss: relative error {rel:.3e}"
    for name, (grad, grad_ref) in result.items():
        assert grad is not None and grad.dtype == case.dtype, name
        assert_close(grad, grad_ref, case.dtype, name)
