"""PyTorch reference for joint (MMDiT) attention maps: the contract the Triton kernels must match.

Text and image tokens share one self-attention over ``L`` positions; the text block is
``[start, start + length)`` (first in FLUX, last in diffusers' SD3 ``JointAttnProcessor2_0``). The
map of image query ``m`` and text token ``t`` is ``exp(s[m, t] - LSE_m)`` with the log-sum-exp over
all ``L`` keys, or (``text_softmax``) the softmax of the text scores alone. Queries are processed in
chunks of rows, forward and backward, so memory stays ``O(chunk * L)`` whatever ``L`` is: the
backward re-runs each chunk's forward under autograd and differentiates it (recompute, DESIGN §3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dreamblend.ops.reference import compute_dtype, l1_map_loss, select_maps

CHUNK_ELEMENTS = 1 << 22
"""Score elements (``B * H * rows * L``) per query chunk: 16 MB in fp32, 32 MB in fp64."""


def image_index(position: int, text: tuple[int, int]) -> int:
    """How many image positions come before ``position`` (the image-row index of an image query)."""
    start, length = text
    return position - min(max(position - start, 0), length)


def query_chunk_rows(q: Tensor) -> int:
    """Query rows per chunk: ``CHUNK_ELEMENTS`` scores, at least one row."""
    b, h, length, _ = q.shape
    return max(1, CHUNK_ELEMENTS // (b * h * length))


def _chunks(q: Tensor, text: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """``(r0, r1, i0, i1)``: query rows ``[r0, r1)`` and the image-map rows ``[i0, i1)`` among them."""
    length = q.shape[2]
    rows = query_chunk_rows(q)
    return [
        (r0, min(r0 + rows, length), image_index(r0, text), image_index(min(r0 + rows, length), text))
        for r0 in range(0, length, rows)
    ]


def _image_rows(t: Tensor, r0: int, text: tuple[int, int]) -> Tensor:
    """The rows of ``t`` (query rows ``r0 ...`` along dim 2) that are image queries: plain slices, so
    no device sync."""
    start, n_text = text
    r1 = r0 + t.shape[2]
    spans = [(r0, min(r1, start)), (max(r0, start + n_text), r1)]
    pieces = [t[:, :, a - r0 : b - r0] for a, b in spans if b > a]
    return torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0] if pieces else t[:, :, :0]


def _chunk_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    r0: int,
    scale: float,
    text: tuple[int, int],
    tokens,
    head_mean,
    text_softmax,
) -> tuple[Tensor, Tensor]:
    """Output rows of the chunk ``q`` (rows ``r0 ...`` of the sequence) and the maps of its image rows."""
    dt = compute_dtype(q)
    scores = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.to(dt)).to(q.dtype)
    image = _image_rows(scores if text_softmax else probs, r0, text)[..., text[0] : text[0] + text[1]]
    text_probs = torch.softmax(image, dim=-1) if text_softmax else image
    return out, select_maps(text_probs, tokens, head_mean)


def map_shape(q: Tensor, text: tuple[int, int], n_tokens: int, head_mean: bool) -> tuple[int, ...]:
    """``(B, M_img, T)`` head-mean or ``(B, H, M_img, T)``: image queries x selected text tokens."""
    b, h, length, _ = q.shape
    m_img = length - text[1]
    return (b, m_img, n_tokens) if head_mean else (b, h, m_img, n_tokens)


def _backward(ctx, q, k, v, chunk_grad) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Input gradients, chunk by chunk: ``chunk_grad(out, maps, r0, r1, i0, i1)`` gives the scalar whose
    gradient the chunk contributes (its outputs weighted by their incoming gradients)."""
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    k_leaf, v_leaf = k.detach().requires_grad_(need_k), v.detach().requires_grad_(need_v)
    dq, dk, dv = (
        torch.zeros_like(t) if need else None for t, need in ((q, need_q), (k, need_k), (v, need_v))
    )
    for r0, r1, i0, i1 in _chunks(q, ctx.text):
        q_chunk = q[:, :, r0:r1].detach().requires_grad_(need_q)
        with torch.enable_grad():
            out, maps = _chunk_forward(
                q_chunk, k_leaf, v_leaf, r0, ctx.scale, ctx.text, ctx.tokens, ctx.head_mean, ctx.text_softmax
            )
            target = chunk_grad(out, maps, r0, r1, i0, i1)
        # dq's rows of this chunk are a view: adding into it fills dq
        accumulate = [(q_chunk, None if dq is None else dq[:, :, r0:r1]), (k_leaf, dk), (v_leaf, dv)]
        wanted = [(leaf, acc) for leaf, acc in accumulate if acc is not None]
        grads = torch.autograd.grad(target, [leaf for leaf, _ in wanted], allow_unused=True)
        for (_, acc), grad in zip(wanted, grads, strict=True):
            if grad is not None:
                acc += grad
    return dq, dk, dv


def _weighted(t: Tensor, grad: Tensor | None) -> Tensor | None:
    return None if grad is None else (t * grad.to(t.dtype)).sum()


def _total(*terms: Tensor | None) -> Tensor | None:
    present = [t for t in terms if t is not None]
    return sum(present) if present else None


class JointCaptureAttention(torch.autograd.Function):
    """``(out, maps)`` over chunks of query rows; keeps only q, k, v for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, scale, text, tokens, head_mean, text_softmax):
        n_tokens = text[1] if tokens is None else tokens.numel()
        out = torch.empty_like(q)
        maps = q.new_empty(map_shape(q, text, n_tokens, head_mean), dtype=compute_dtype(q))
        for r0, r1, i0, i1 in _chunks(q, text):
            out[:, :, r0:r1], maps[..., i0:i1, :] = _chunk_forward(
                q[:, :, r0:r1], k, v, r0, scale, text, tokens, head_mean, text_softmax
            )
        ctx.scale, ctx.text, ctx.tokens, ctx.head_mean, ctx.text_softmax = (
            scale,
            text,
            tokens,
            head_mean,
            text_softmax,
        )
        ctx.save_for_backward(q, k, v)
        ctx.set_materialize_grads(False)
        return out, maps

    @staticmethod
    def backward(ctx, d_out, d_maps):
        q, k, v = ctx.saved_tensors

        def chunk_grad(out, maps, r0, r1, i0, i1):
            return _total(
                _weighted(out, None if d_out is None else d_out[:, :, r0:r1]),
                _weighted(maps, None if d_maps is None else d_maps[..., i0:i1, :]),
            )

        return (*_backward(ctx, q, k, v, chunk_grad), None, None, None, None, None)


class JointGuidedAttention(torch.autograd.Function):
    """``(out, loss)``: the per-sample L1 of the maps to ``ref``, summed over chunks of image rows."""

    @staticmethod
    def forward(ctx, q, k, v, ref, scale, text, tokens, head_mean, text_softmax):
        out = torch.empty_like(q)
        loss = q.new_zeros(q.shape[0], dtype=compute_dtype(q))
        for r0, r1, i0, i1 in _chunks(q, text):
            out[:, :, r0:r1], maps = _chunk_forward(
                q[:, :, r0:r1], k, v, r0, scale, text, tokens, head_mean, text_softmax
            )
            loss += l1_map_loss(maps, ref[..., i0:i1, :], head_mean)
        ctx.scale, ctx.text, ctx.tokens, ctx.head_mean, ctx.text_softmax = (
            scale,
            text,
            tokens,
            head_mean,
            text_softmax,
        )
        ctx.save_for_backward(q, k, v, ref)
        ctx.set_materialize_grads(False)
        return out, loss

    @staticmethod
    def backward(ctx, d_out, d_loss):
        q, k, v, ref = ctx.saved_tensors

        def chunk_grad(out, maps, r0, r1, i0, i1):
            loss = None if d_loss is None else l1_map_loss(maps, ref[..., i0:i1, :], ctx.head_mean)
            return _total(
                _weighted(out, None if d_out is None else d_out[:, :, r0:r1]),
                None if loss is None else _weighted(loss, d_loss),
            )

        return (*_backward(ctx, q, k, v, chunk_grad), None, None, None, None, None, None)


def joint_capture_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    text: tuple[int, int],
    tokens: Tensor | None,
    head_mean: bool,
    text_softmax: bool,
) -> tuple[Tensor, Tensor]:
    return JointCaptureAttention.apply(q, k, v, scale, text, tokens, head_mean, text_softmax)


def joint_guided_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ref: Tensor,
    scale: float,
    text: tuple[int, int],
    tokens: Tensor | None,
    head_mean: bool,
    text_softmax: bool,
) -> tuple[Tensor, Tensor]:
    return JointGuidedAttention.apply(q, k, v, ref, scale, text, tokens, head_mean, text_softmax)
