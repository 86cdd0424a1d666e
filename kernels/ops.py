"""The kernels as ``torch.library`` ops, so autograd and torch.compile(fullgraph=True) see them.

Three ops in the ``dreamblend`` namespace: the two forwards and one shared backward. The
backward recomputes the probabilities from q and k, so autograd keeps only the inputs (and
``ref``), never a ``(B, H, M, N)`` tensor. Problems the kernels do not cover (``N > 256``,
``D > 256``, token subsets past ``config.MAX_SELECTION``, float64) run the torch reference instead.
"""

import torch
from torch import Tensor
from torch.library import triton_op

from dreamblend.kernels.config import supports
from dreamblend.kernels.joint_attention import joint_backward, joint_capture, joint_guided, supports_joint
from dreamblend.kernels.launch import attention_backward, attention_forward
from dreamblend.ops.autograd import register_attention_autograd


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


def _backward_dq_dk_dv(q, k, v, tokens, d_out, d_maps, ref, d_loss, scale, head_mean, need_q, need_k, need_v):
    # dQ is always computed (guidance needs it): the op takes only the dK/dV flags.
    return torch.ops.dreamblend.triton_attention_backward(
        q, k, v, tokens, d_out, d_maps, ref, d_loss, scale, head_mean, need_k, need_v
    )


register_attention_autograd(
    "dreamblend::triton_capture_attention", "dreamblend::triton_guided_attention", _backward_dq_dk_dv
)


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


# Joint (MMDiT) attention: the same three-op pattern, with the text block and text_softmax as options.


@triton_op("dreamblend::triton_joint_capture_attention", mutates_args=())
def _joint_capture(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tokens: Tensor | None,
    scale: float,
    head_mean: bool,
    text_start: int,
    text_length: int,
    text_softmax: bool,
) -> tuple[Tensor, Tensor]:
    return joint_capture(q, k, v, tokens, (text_start, text_length), scale, head_mean, text_softmax)


@triton_op("dreamblend::triton_joint_guided_attention", mutates_args=())
def _joint_guided(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ref: Tensor,
    tokens: Tensor | None,
    scale: float,
    head_mean: bool,
    text_start: int,
    text_length: int,
    text_softmax: bool,
) -> tuple[Tensor, Tensor]:
    return joint_guided(q, k, v, ref, tokens, (text_start, text_length), scale, head_mean, text_softmax)


@triton_op("dreamblend::triton_joint_attention_backward", mutates_args=())
def _joint_backward(
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
    text_start: int,
    text_length: int,
    text_softmax: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV; a gradient that was not asked for comes back empty (ops cannot return None)."""
    text = (text_start, text_length)
    dq, dk, dv = joint_backward(
        q, k, v, tokens, d_out, d_maps, ref, d_loss, scale, head_mean, need_dk, need_dv, text, text_softmax
    )
    return dq, q.new_empty(0) if dk is None else dk, q.new_empty(0) if dv is None else dv


def _joint_backward_dq_dk_dv(
    q, k, v, tokens, d_out, d_maps, ref, d_loss, scale, head_mean, need_q, need_k, need_v, *options
):
    return torch.ops.dreamblend.triton_joint_attention_backward(
        q, k, v, tokens, d_out, d_maps, ref, d_loss, scale, head_mean, need_k, need_v, *options
    )


register_attention_autograd(
    "dreamblend::triton_joint_capture_attention",
    "dreamblend::triton_joint_guided_attention",
    _joint_backward_dq_dk_dv,
)


def _joint_reference():
    from dreamblend.ops import joint_reference  # only for problems outside the kernels' tiles

    return joint_reference


def joint_capture_attention(q, k, v, scale: float, text: tuple[int, int], tokens, head_mean, text_softmax):
    """``(out, maps)`` of joint attention (``dreamblend.ops.joint``); entry point for backend="triton"."""
    if not supports_joint(q.dtype, q.shape[-1]):
        return _joint_reference().joint_capture_attention(
            q, k, v, scale, text, tokens, head_mean, text_softmax
        )
    return torch.ops.dreamblend.triton_joint_capture_attention(
        q, k, v, tokens, scale, head_mean, *text, text_softmax
    )


def joint_guided_attention(
    q, k, v, ref, scale: float, text: tuple[int, int], tokens, head_mean, text_softmax
):
    """``(out, loss)`` of joint attention with the per-sample L1 loss against ``ref``."""
    if not supports_joint(q.dtype, q.shape[-1]):
        return _joint_reference().joint_guided_attention(
            q, k, v, ref, scale, text, tokens, head_mean, text_softmax
        )
    return torch.ops.dreamblend.triton_joint_guided_attention(
        q, k, v, ref, tokens, scale, head_mean, *text, text_softmax
    )
