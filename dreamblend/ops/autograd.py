"""Autograd of the Triton ops (cross and joint attention), whose backward op recomputes P.

Each kernel family defines three ``torch.library`` ops: capture ``(q, k, v, tokens, scale, head_mean,
*options)``, guided ``(q, k, v, ref, tokens, scale, head_mean, *options)`` and a backward. The
trailing non-tensor ``options`` (none for cross-attention; the text block and ``text_softmax`` for
joint attention) are handed to the backward after its need-flags. Registering the gradients here
(rather than wrapping the ops in an ``autograd.Function``) lets torch.compile trace them. Only q, k,
v, tokens (and ``ref``) are saved, never a ``(B, H, M, N)`` tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# backward(q, k, v, tokens, d_out, d_maps, ref, d_loss, scale, head_mean, need_dq, need_dk, need_dv, *options)
BackwardFn = Callable[..., tuple[Tensor, Tensor, Tensor]]


def register_attention_autograd(capture_op: str, guided_op: str, backward: BackwardFn) -> None:
    """Give ``capture_op`` and ``guided_op`` gradients computed by ``backward``."""

    def save(ctx, n_inputs, q, k, v, tokens, scale, head_mean, options, *extra) -> None:
        ctx.save_for_backward(q, k, v, tokens, *extra)
        ctx.scale, ctx.head_mean, ctx.options = scale, head_mean, tuple(options)
        ctx.n_inputs = n_inputs
        ctx.set_materialize_grads(False)  # an output without a gradient costs no work in the backward

    def input_grads(ctx, saved, d_out, d_maps, ref, d_loss):
        # `saved` is ctx.saved_tensors read once: non-reentrant checkpointing allows a single unpack.
        q, k, v, tokens = saved[:4]
        need = ctx.needs_input_grad[:3]
        grads = backward(
            q, k, v, tokens, d_out, d_maps, ref, d_loss, ctx.scale, ctx.head_mean, *need, *ctx.options
        )
        # one None for each non-differentiable input after q, k, v
        return *(g if wanted else None for g, wanted in zip(grads, need, strict=True)), *[None] * (
            ctx.n_inputs - 3
        )

    def capture_setup(ctx, inputs, output) -> None:
        q, k, v, tokens, scale, head_mean, *options = inputs
        save(ctx, len(inputs), q, k, v, tokens, scale, head_mean, options)

    def capture_backward(ctx, d_out: Tensor | None, d_maps: Tensor | None):
        return input_grads(ctx, ctx.saved_tensors, d_out, d_maps, None, None)

    def guided_setup(ctx, inputs, output) -> None:
        q, k, v, ref, tokens, scale, head_mean, *options = inputs
        save(ctx, len(inputs), q, k, v, tokens, scale, head_mean, options, ref)

    def guided_backward(ctx, d_out: Tensor | None, d_loss: Tensor | None):
        saved = ctx.saved_tensors
        ref = saved[4] if d_loss is not None else None
        return input_grads(ctx, saved, d_out, None, ref, d_loss)

    torch.library.register_autograd(capture_op, capture_backward, setup_context=capture_setup)
    torch.library.register_autograd(guided_op, guided_backward, setup_context=guided_setup)
