"""Host launchers: allocate outputs, pick tiles, launch the kernels, reduce per-block partials.

The same launchers drive compiled kernels on CUDA tensors and Triton's interpreter on CPU
tensors. Which one is fixed per process: ``triton.jit`` (on these kernels and on triton's own
standard library) reads TRITON_INTERPRET when a function is defined, i.e. at first import.
Every reduction across programs (loss, dK, dV) goes through per-program partials summed by
torch afterwards, so results are bitwise reproducible.
"""

import math

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

from dreamblend.kernels.config import (
    BackwardFlags,
    ForwardFlags,
    MapGrad,
    backward_programs,
    kernel_constexprs,
    select_config,
)
from dreamblend.kernels.cross_attention import attention_bwd_kernel, attention_fwd_kernel

INTERPRETED = not isinstance(attention_fwd_kernel, JITFunction)
"""True when this process runs the kernels in Triton's interpreter (TRITON_INTERPRET=1 at import)."""


def _check_device(t: Tensor) -> None:
    if not (t.is_cuda or INTERPRETED):
        raise RuntimeError(
            "the Triton kernels got CPU tensors but run compiled: set TRITON_INTERPRET=1 before triton "
            "is first imported to run them in Triton's interpreter, or pass CUDA tensors"
        )
    if INTERPRETED and t.dtype == torch.bfloat16:
        raise RuntimeError(
            "Triton's interpreter computes bfloat16 tl.dot wrongly; run bfloat16 on a GPU with "
            "compiled kernels, or use float32/float16 under TRITON_INTERPRET=1"
        )


def _unit_last(t: Tensor) -> Tensor:
    """Kernels take row strides but read columns contiguously; copy only when the last dim is strided
    (e.g. a stride-0 gradient from autograd)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _placeholder(like: Tensor, dtype: torch.dtype) -> Tensor:
    """A one-element buffer for a pointer argument that the chosen constexpr flags never touch."""
    return torch.empty(1, dtype=dtype, device=like.device)


def _as_f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tokens: Tensor | None,
    ref: Tensor | None,
    scale: float,
    head_mean: bool,
    *,
    store_out: bool,
    store_maps: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(out, maps, loss)``, each None unless asked for (``loss`` when ``ref`` is given)."""
    _check_device(q)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, h, m, d = q.shape
    n = k.shape[2]
    t = n if tokens is None else tokens.numel()
    cfg = select_config("forward", d, n, None if tokens is None else t)
    flags = ForwardFlags(head_mean, tokens is not None, store_out, store_maps, ref is not None)
    groups = b if head_mean else b * h
    m_blocks = triton.cdiv(m, cfg.block_m)

    f32_placeholder = _placeholder(q, torch.float32)
    # empty_like keeps q's layout (e.g. the (B, M, H, D) memory of a diffusers processor).
    out = torch.empty_like(q) if store_out else _placeholder(q, q.dtype)
    out_strides = _strides(out) if store_out else (0, 0, 0)
    map_shape = (b, m, t) if head_mean else (b, h, m, t)
    maps = q.new_empty(map_shape, dtype=torch.float32) if store_maps else f32_placeholder
    loss_part = q.new_empty((groups, m_blocks), dtype=torch.float32) if flags.l1_loss else f32_placeholder
    ref_arg = _as_f32(ref) if flags.l1_loss else f32_placeholder
    tok_arg = _placeholder(q, torch.int64) if tokens is None else tokens.contiguous()

    # wrap_triton lets torch.compile trace the launch; torch 2.11 rejects interpreted kernels there.
    launch = attention_fwd_kernel if INTERPRETED else wrap_triton(attention_fwd_kernel)
    launch[(m_blocks, groups)](
        q,
        k,
        v,
        tok_arg,
        ref_arg,
        out,
        maps,
        loss_part,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *out_strides,
        h,
        m,
        n,
        t,
        d,
        scale * math.log2(math.e),
        **kernel_constexprs(cfg, q.dtype, flags),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    loss = None
    if flags.l1_loss:  # per-head mode: mean over heads of each head's sum
        loss = loss_part.sum(dim=1) if head_mean else loss_part.view(b, h * m_blocks).sum(dim=1) / h
    return (out if store_out else None), (maps if store_maps else None), loss


def attention_backward(
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
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(dQ, dK, dV)`` from a gradient on ``out`` plus one on the maps (``d_maps``) or on the L1
    loss (``ref`` with ``d_loss``); dK and dV are None unless asked for."""
    _check_device(q)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, h, m, d = q.shape
    n = k.shape[2]
    f32_placeholder = _placeholder(q, torch.float32)

    gmap = ref_arg = loss_weight = f32_placeholder
    if d_maps is not None:
        map_grad = MapGrad.GIVEN
        gmap = _as_f32(d_maps)
    elif d_loss is not None:
        map_grad = MapGrad.L1
        ref_arg, loss_weight = _as_f32(ref), _as_f32(d_loss)
        if head_mean:  # the sign needs the head-mean map: recompute it, (B, M, T), only for this launch
            gmap = attention_forward(q, k, v, tokens, None, scale, True, store_out=False, store_maps=True)[1]
    else:
        map_grad, tokens = MapGrad.NONE, None
    t = n if tokens is None else tokens.numel()
    cfg = select_config("backward", d, n, None if tokens is None else t)
    flags = BackwardFlags.make(d_out is not None, map_grad, head_mean, tokens is not None, need_dk, need_dv)
    programs = backward_programs(m, cfg.block_m, b * h, flags.need_dk or flags.need_dv)

    d_out = q if d_out is None else _unit_last(d_out)
    dq = torch.empty_like(q)
    partial_shape = (b * h, programs, n, d)
    dk_part = q.new_zeros(partial_shape, dtype=torch.float32) if flags.need_dk else f32_placeholder
    dv_part = q.new_zeros(partial_shape, dtype=torch.float32) if flags.need_dv else f32_placeholder
    tok_arg = _placeholder(q, torch.int64) if tokens is None else tokens.contiguous()

    launch = attention_bwd_kernel if INTERPRETED else wrap_triton(attention_bwd_kernel)
    launch[(programs, b * h)](
        q,
        k,
        v,
        d_out,
        tok_arg,
        gmap,
        ref_arg,
        loss_weight,
        dq,
        dk_part,
        dv_part,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(d_out),
        *_strides(dq),
        h,
        m,
        n,
        t,
        d,
        scale * math.log2(math.e),
        scale,
        **kernel_constexprs(cfg, q.dtype, flags),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    dk = dk_part.sum(dim=1).view(b, h, n, d).to(k.dtype) if flags.need_dk else None
    dv = None
    if flags.need_dv:
        dv = dv_part.sum(dim=1).view(b, h, n, d).to(v.dtype)
    elif need_dv:  # no gradient on out: V does not affect the maps
        dv = torch.zeros_like(v)
    return dq, dk, dv
