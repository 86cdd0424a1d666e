"""PyTorch reference backend: the semantic contract every other backend must match.

Both ops are custom autograd Functions that keep only q, k, v (and ``ref``) for the backward
and recompute the attention probabilities there (DESIGN §3), so a guided forward never leaves a
``(B, H, M, N)`` tensor alive for autograd. Math runs in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half inputs, float64 kept (so gradchecks are exact)."""
    return torch.promote_types(t.dtype, torch.float32)


def attention_probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Row-softmax of ``scale * q k^T`` in float32 (float64 for float64), shape ``(B, H, M, N)``."""
    dt = compute_dtype(q)
    return torch.softmax(torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale, dim=-1)


def select_maps(probs: Tensor, tokens: Tensor | None, head_mean: bool) -> Tensor:
    """The captured map: the token columns of ``probs``, optionally averaged over heads."""
    maps = probs if tokens is None else probs.index_select(-1, tokens)
    return maps.mean(dim=1) if head_mean else maps


def l1_map_loss(maps: Tensor, ref: Tensor, head_mean: bool) -> Tensor:
    """Per-sample L1 of DESIGN §2: ``mean_h sum_{m,t} |A - ref|`` (no head mean in head-mean mode)."""
    diff = (maps - ref).abs()
    if head_mean:
        return diff.sum(dim=(1, 2))
    return diff.sum(dim=(2, 3)).mean(dim=1)


def _scatter_map_grad(d_maps: Tensor, tokens: Tensor | None, shape: torch.Size, head_mean: bool) -> Tensor:
    """``E`` of DESIGN §3: the map gradient placed into the token columns of a ``(B,H,M,N)`` grad."""
    b, h, m, n = shape
    if head_mean:
        d_maps = (d_maps / h).unsqueeze(1).expand(b, h, m, d_maps.shape[-1])
    if tokens is None:
        return d_maps.contiguous()
    grad = d_maps.new_zeros(b, h, m, n)
    return grad.index_add_(-1, tokens, d_maps.contiguous())


def _attention_backward(
    ctx, q: Tensor, k: Tensor, v: Tensor, probs: Tensor, d_out: Tensor | None, d_probs: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """dQ, dK, dV given the gradient on ``out`` and an extra gradient on the probabilities."""
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    d_p = torch.zeros_like(probs) if d_probs is None else d_probs
    if d_out is not None:
        d_out = d_out.to(probs.dtype)
        d_p = d_p + torch.matmul(d_out, v.to(probs.dtype).transpose(-1, -2))
    # Delta = rowsum(P * dP): the shortcut rowsum(dO * O) is wrong once the maps carry a gradient.
    d_s = probs * (d_p - (probs * d_p).sum(dim=-1, keepdim=True))
    d_q = torch.matmul(d_s, k.to(probs.dtype)).mul_(ctx.scale).to(q.dtype) if need_q else None
    d_k = (
        torch.matmul(d_s.transpose(-1, -2), q.to(probs.dtype)).mul_(ctx.scale).to(k.dtype) if need_k else None
    )
    d_v = None
    if need_v:
        d_v = (
            torch.zeros_like(v) if d_out is None else torch.matmul(probs.transpose(-1, -2), d_out).to(v.dtype)
        )
    return d_q, d_k, d_v


class CaptureAttention(torch.autograd.Function):
    """``(out, maps)``; differentiable in q, k, v through both outputs."""

    @staticmethod
    def forward(ctx, q, k, v, scale, tokens, head_mean):
        probs = attention_probs(q, k, scale)
        out = torch.matmul(probs, v.to(probs.dtype)).to(q.dtype)
        maps = select_maps(probs, tokens, head_mean)
        ctx.scale, ctx.head_mean = scale, head_mean
        ctx.save_for_backward(q, k, v, tokens)
        ctx.set_materialize_grads(False)
        return out, maps

    @staticmethod
    def backward(ctx, d_out, d_maps):
        q, k, v, tokens = ctx.saved_tensors
        probs = attention_probs(q, k, ctx.scale)
        d_probs = None
        if d_maps is not None:
            d_probs = _scatter_map_grad(d_maps.to(probs.dtype), tokens, probs.shape, ctx.head_mean)
        return (*_attention_backward(ctx, q, k, v, probs, d_out, d_probs), None, None, None)


class GuidedAttention(torch.autograd.Function):
    """``(out, loss)``; the L1 map gradient is formed from ``ref`` in the backward, maps never kept."""

    @staticmethod
    def forward(ctx, q, k, v, ref, scale, tokens, head_mean):
        probs = attention_probs(q, k, scale)
        out = torch.matmul(probs, v.to(probs.dtype)).to(q.dtype)
        loss = l1_map_loss(select_maps(probs, tokens, head_mean), ref, head_mean)
        ctx.scale, ctx.head_mean = scale, head_mean
        ctx.save_for_backward(q, k, v, ref, tokens)
        ctx.set_materialize_grads(False)
        return out, loss

    @staticmethod
    def backward(ctx, d_out, d_loss):
        q, k, v, ref, tokens = ctx.saved_tensors
        probs = attention_probs(q, k, ctx.scale)
        d_probs = None
        if d_loss is not None:
            maps = select_maps(probs, tokens, ctx.head_mean)
            weight = d_loss.to(probs.dtype) if ctx.head_mean else d_loss.to(probs.dtype) / probs.shape[1]
            d_maps = torch.sign(maps - ref) * weight.view(-1, *([1] * (maps.dim() - 1)))
            # per-head mode already carries its 1/H above; head-mean mode gets it from the scatter.
            d_probs = _scatter_map_grad(d_maps, tokens, probs.shape, ctx.head_mean)
        return (*_attention_backward(ctx, q, k, v, probs, d_out, d_probs), None, None, None, None)


def capture_attention(q, k, v, scale: float, tokens: Tensor | None, head_mean: bool):
    return CaptureAttention.apply(q, k, v, scale, tokens, head_mean)


def guided_attention(q, k, v, ref, scale: float, tokens: Tensor | None, head_mean: bool):
    return GuidedAttention.apply(q, k, v, ref, scale, tokens, head_mean)
