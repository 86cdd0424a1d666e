"""The kernels as ``torch.library`` ops, so autograd and torch.compile(fullgraph=True) see them.

Three ops in the ``dreamblend`` namespace: the two forwards and one shared backward. The
backward recomputes the probabilities from q and k, so autograd keeps only the inputs (and
``ref``), never a ``(B, H, M, N)`` tensor. Problems the kernels do not cover (``N > 256``,
``D > 256``, token subsets past ``config.MAX_SELECTION``, float64) run the torch reference instead.
"""

import torch
from dreamblend.kernels.config import supports
from dreamblend.kernels.launch import attention_backward, attention_forward
from torch import Tensor
from torch.library import triton_op


@triton_op("dreamblend::triton_capture_attention", mutates_args=())
def _capture(
    q: Tensor, k: Tensor, v: Tensor, tokens: Tensor | None, scale: float, head_mean: bool
) -> tuple[Tensor, Tensor]:
    out, maps, _ = attention_forward(q, k, v, tokens, None, scale, head_mean, store_out=True, store_maps=True)
    return out, maps


@triton_op("dreamblend::triton_guided_attention", mutates_args=())
def _guided(
    q: Tensor, k: Tensor, v: Tensor, ref: Tensor, tokens: Tensor | None, scale: float, head_mean: bool
) -> tuple[Tensor, Tensor]:
    out, _, loss = attention_forward(q, k, v, tokens, ref, scale, head_mean, store_out=True, store_maps=False)
    return out, loss


@triton_op("dreamblend::triton_attention_backward", mutates_args=())
def _backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tokens: Tensor | None,
    d_out: Tensor | None,
    d_maps: Tensor | None,
    ref: Tensor | None,
    d_loss: Tensor | None,
    scale: float,
    head_mean: bool,
    need_dk: bool,
    need_dv: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV; a gradient that was not asked for comes back empty (ops cannot return None)."""
    dq, dk, dv = attention_backward(
        q, k, v, tokens, d_out, d_maps, ref, d_loss, scale, head_mean, need_dk, need_dv
    )
    return dq, q.new_empty(0) if dk is None else dk, q.new_empty(0) if dv is None else dv


def _input_grads(
    ctx, saved: tuple, d_out: Tensor | None, d_maps: Tensor | None, ref: Tensor | None, d_loss: Tensor | None
):
    # `saved` is ctx.saved_tensors unpacked once by the caller: non-reentrant checkpointing allows one.
    q, k, v, tokens = saved[:4]
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    dq, dk, dv = torch.ops.dreamblend.triton_attention_backward(
        q, k, v, tokens, d_out, d_maps, ref, d_loss, ctx.scale, ctx.head_mean, need_k, need_v
    )
    return (dq if need_q else None), (dk if need_k else None), (dv if need_v else None)


def _save(ctx, q: Tensor, k: Tensor, v: Tensor, tokens: Tensor | None, scale: float, head_mean: bool, *extra):
    ctx.save_for_backward(q, k, v, tokens, *extra)
    ctx.scale, ctx.head_mean = scale, head_mean
    ctx.set_materialize_grads(False)  # an output without a gradient costs no work in the backward


def _capture_setup(ctx, inputs, output) -> None:
    q, k, v, tokens, scale, head_mean = inputs
    _save(ctx, q, k, v, tokens, scale, head_mean)


def _capture_backward(ctx, d_out: Tensor | None, d_maps: Tensor | None):
    return (*_input_grads(ctx, ctx.saved_tensors, d_out, d_maps, None, None), None, None, None)


def _guided_setup(ctx, inputs, output) -> None:
    q, k, v, ref, tokens, scale, head_mean = inputs
    _save(ctx, q, k, v, tokens, scale, head_mean, ref)


def _guided_backward(ctx, d_out: Tensor | None, d_loss: Tensor | None):
    saved = ctx.saved_tensors
    ref = saved[4] if d_loss is not None else None
    return (*_input_grads(ctx, saved, d_out, None, ref, d_loss), None, None, None, None)


_capture.register_autograd(_capture_backward, setup_context=_capture_setup)
_guided.register_autograd(_guided_backward, setup_context=_guided_setup)


def _reference():
    from dreamblend.ops import reference  # only for problems outside the kernels' tiles

    return reference


def capture_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, tokens: Tensor | None, head_mean: bool):
    """``(out, maps)`` of DESIGN §2; the dispatcher's entry point for backend="triton"."""
    if not supports(q.dtype, q.shape[-1], k.shape[2], None if tokens is None else tokens.numel()):
        return _reference().capture_attention(q, k, v, scale, tokens, head_mean)
    return torch.ops.dreamblend.triton_capture_attention(q, k, v, tokens, scale, head_mean)


def guided_attention(
    q: Tensor, k: Tensor, v: Tensor, ref: Tensor, scale: float, tokens: Tensor | None, head_mean: bool
):
    """``(out, loss)`` of DESIGN §2 with the per-sample L1 loss against ``ref``."""
    if not supports(q.dtype, q.shape[-1], k.shape[2], None if tokens is None else tokens.numel()):
        return _reference().guided_attention(q, k, v, ref, scale, tokens, head_mean)
    return torch.ops.dreamblend.triton_guided_attention(q, k, v, ref, tokens, scale, head_mean)
