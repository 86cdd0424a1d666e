"""Triton kernels and launchers for joint (MMDiT) attention maps: text and image tokens in one softmax.

``q, k, v`` are ``(B, H, L, D)``; the text tokens are positions ``[TS, TE)``. Unlike the
cross-attention kernels (all keys in one tile), ``L`` is thousands of keys, so:

1. ``joint_fwd_kernel``: flash-style online softmax over all key blocks: ``out`` and the row
   log-sum-exp (base 2, of ``scale * log2(e) * s``); with ``TEXT_LSE`` also the log-sum-exp over the
   text keys alone (one more pass over the text blocks) for ``text_softmax`` maps.
2. ``joint_maps_kernel``: a cheap second pass from the final LSE. Grid (image-query block, token
   block, group); it gathers the selected text keys ``K[TS + tokens]`` and writes
   ``exp2(s - lse)`` (maps, head-mean in registers), or the per-block L1 partials against ``ref``, or
   ``D_map = rowsum(R_sel * G)`` partials for the backward.
3. ``joint_bwd_dq_kernel`` / ``joint_bwd_dkdv_kernel``: recompute ``P`` block by block. The map
   gradient ``G`` (``(.., M_img, T)``) enters on the text columns, only in key blocks that overlap
   the text: as ``G`` itself when every text token is mapped, else as ``E = G S^T`` with the 0/1
   matrix ``S[t, n] = (TS + tokens[t] == n)`` (exact IEEE products; duplicates sum). With maps
   over all keys ``dS = P * (dO V^T + E - Delta)``, ``Delta = rowsum(dO * O) + D_map``; with the
   text-only softmax ``Pt`` the map term is ``Pt * (E - D_map)`` on the text columns. dK/dV: one
   program per key block walks every query block (no atomics, deterministic).

``P`` is never stored: the forward keeps ``(B, H, L)`` LSEs, the backward recomputes them with one
forward launch and holds ``G`` and the maps it needs (map-sized, ``M_img x T`` per head).
"""

import math
from dataclasses import dataclass
from enum import IntEnum

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from dreamblend.kernels.config import ieee_dots, next_pow2
from dreamblend.kernels.launch import INTERPRETED, _as_f32, _check_device, _placeholder, _strides, _unit_last

MAX_HEAD_DIM = 256
"""Widest head the kernels hold in one tile (FLUX and SD3.5 use 128 and 64)."""


class MapsMode(IntEnum):
    """What ``joint_maps_kernel`` writes."""

    MAPS = 0
    L1 = 1
    DMAP = 2


MODE_MAPS = tl.constexpr(int(MapsMode.MAPS))
MODE_L1 = tl.constexpr(int(MapsMode.L1))
MODE_DMAP = tl.constexpr(int(MapsMode.DMAP))


@triton.jit
def _rows_tile(base, rows, row_stride, row_ok, D, D_PAD: tl.constexpr):
    """``rows x D_PAD`` tile of a row-major matrix with unit column stride; zeros outside."""
    dims = tl.arange(0, D_PAD)
    mask = row_ok[:, None] & (dims < D)[None, :]
    return tl.load(base + rows[:, None] * row_stride + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` in fp32; IEEE products for fp32 inputs (no silent TF32)."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _image_index(rows, TS, TE):
    """Image-map row of each query position (meaningful for positions outside ``[TS, TE)``)."""
    return tl.where(rows < TS, rows, rows - (TE - TS))


@triton.jit
def joint_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    lse_text_ptr,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    H,
    L,
    D,
    TS,
    TE,
    scale_log2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
    TEXT_LSE: tl.constexpr,
    IEEE_DOTS: tl.constexpr,
):
    """One query block of one head; grid ``(cdiv(L, BLOCK_M), B * H)``. LSEs are fp32 ``(B*H, L)``."""
    bh = tl.program_id(1).to(tl.int64)
    batch = bh // H
    head = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    q = _rows_tile(q_ptr + batch * stride_qb + head * stride_qh, rows, stride_qm, row_ok, D, D_PAD)
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh

    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for n0 in range(0, L, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < L
        k = _rows_tile(k_base, keys, stride_kn, key_ok, D, D_PAD)
        s = _dot(q, tl.trans(k), None, IEEE_DOTS) * scale_log2
        s = tl.where(key_ok[None, :], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        alpha = tl.exp2(row_max - new_max)
        p = tl.exp2(s - new_max[:, None])
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        v = _rows_tile(v_base, keys, stride_vn, key_ok, D, D_PAD)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE_DOTS)
        row_max = new_max

    dims = tl.arange(0, D_PAD)
    out_offs = batch * stride_ob + head * stride_oh + rows[:, None] * stride_om + dims[None, :]
    out = acc / row_sum[:, None]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dims < D)[None, :])
    tl.store(lse_ptr + bh * L + rows, row_max + tl.log2(row_sum), mask=row_ok)

    if TEXT_LSE:
        text_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        text_sum = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(TS, TE, BLOCK_N):
            keys = n0 + tl.arange(0, BLOCK_N)
            key_ok = keys < TE
            k = _rows_tile(k_base, keys, stride_kn, key_ok, D, D_PAD)
            s = _dot(q, tl.trans(k), None, IEEE_DOTS) * scale_log2
            s = tl.where(key_ok[None, :], s, float("-inf"))
            new_max = tl.maximum(text_max, tl.max(s, axis=1))
            text_sum = text_sum * tl.exp2(text_max - new_max) + tl.sum(tl.exp2(s - new_max[:, None]), axis=1)
            text_max = new_max
        tl.store(lse_text_ptr + bh * L + rows, text_max + tl.log2(text_sum), mask=row_ok)


@triton.jit
def joint_maps_kernel(
    q_ptr,
    k_ptr,
    tok_ptr,
    lse_ptr,
    ref_ptr,
    gmap_ptr,
    maps_ptr,
    part_ptr,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    H,
    L,
    M_IMG,
    T,
    D,
    TS,
    TE,
    scale_log2,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    D_PAD: tl.constexpr,
    MODE: tl.constexpr,
    HEAD_MEAN: tl.constexpr,
    SELECT: tl.constexpr,
    IEEE_DOTS: tl.constexpr,
):
    """Maps ``R = exp2(s - lse)`` of image queries x selected text keys; grid ``(cdiv(M_IMG, BLOCK_M),
    cdiv(T, BLOCK_T), groups)``. ``lse`` is the all-key or text-only LSE (``(B*H, L)``).

    ``MODE_MAPS``: store fp32 maps ``(B, H, M_IMG, T)``, or ``(B, M_IMG, T)`` with ``HEAD_MEAN`` (groups
    ``B``: the program averages the heads in registers). ``MODE_L1``: one ``sum |A - ref|`` per program
    into ``part[group, block_m, block_t]``. ``MODE_DMAP`` (groups ``B * H``): ``rowsum(R * G)`` of one
    head into ``part[bh, m, block_t]``, ``G`` read from ``gmap`` (head-mean ``G`` divided by ``H``).
    """
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    group = tl.program_id(2).to(tl.int64)
    if HEAD_MEAN and MODE != MODE_DMAP:
        batch = group
        first_head = 0
        n_heads = H
    else:
        batch = group // H
        first_head = group % H
        n_heads = 1
    img = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    img_ok = img < M_IMG
    rows = tl.where(img < TS, img, img + (TE - TS))
    slots = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    slot_ok = slots < T
    if SELECT:
        tokens = tl.load(tok_ptr + slots, mask=slot_ok, other=0)
    else:
        tokens = slots
    keys = TS + tokens
    map_ok = img_ok[:, None] & slot_ok[None, :]
    if HEAD_MEAN:
        map_offs = batch * M_IMG * T + img[:, None] * T + slots[None, :]
    else:
        map_offs = group * M_IMG * T + img[:, None] * T + slots[None, :]

    maps = tl.zeros((BLOCK_M, BLOCK_T), tl.float32)
    for i in range(n_heads):
        bh = batch * H + first_head + i
        q = _rows_tile(
            q_ptr + batch * stride_qb + (first_head + i) * stride_qh, rows, stride_qm, img_ok, D, D_PAD
        )
        k = _rows_tile(
            k_ptr + batch * stride_kb + (first_head + i) * stride_kh, keys, stride_kn, slot_ok, D, D_PAD
        )
        lse = tl.load(lse_ptr + bh * L + rows, mask=img_ok, other=0.0)
        s = _dot(q, tl.trans(k), None, IEEE_DOTS) * scale_log2
        maps += tl.where(map_ok, tl.exp2(s - lse[:, None]), 0.0)
    if MODE == MODE_DMAP:
        grad = tl.load(gmap_ptr + map_offs, mask=map_ok, other=0.0)
        if HEAD_MEAN:
            grad = grad / H
        part_offs = (group * M_IMG + img) * tl.num_programs(1) + pid_t
        tl.store(part_ptr + part_offs, tl.sum(maps * grad, axis=1), mask=img_ok)
    else:
        if HEAD_MEAN:
            maps = maps / H
        if MODE == MODE_MAPS:
            tl.store(maps_ptr + map_offs, maps, mask=map_ok)
        else:
            err = tl.where(map_ok, tl.abs(maps - tl.load(ref_ptr + map_offs, mask=map_ok, other=0.0)), 0.0)
            part_offs = (group * tl.num_programs(0) + pid_m) * tl.num_programs(1) + pid_t
            tl.store(part_ptr + part_offs, tl.sum(tl.sum(err, axis=1), axis=0))


@triton.jit
def _scatter_tokens(scattered, gmap_base, tok_ptr, img_idx, img_ok, keys, T, TS, BLOCK_T: tl.constexpr):
    """``scattered + G S^T`` over token blocks: each selected token's gradient column lands on its key
    column (IEEE products of a 0/1 matrix: exact; duplicate tokens sum)."""
    for t0 in range(0, T, BLOCK_T):
        slots = t0 + tl.arange(0, BLOCK_T)
        slot_ok = slots < T
        tokens = tl.load(tok_ptr + slots, mask=slot_ok, other=0)
        g_offs = img_idx[:, None] * T + slots[None, :]
        grad = tl.load(gmap_base + g_offs, mask=img_ok[:, None] & slot_ok[None, :], other=0.0)
        sel = (((TS + tokens)[:, None] == keys[None, :]) & slot_ok[:, None]).to(tl.float32)
        scattered = _dot(grad, sel, scattered, True)
    return scattered


@triton.jit
def _score_grads(
    q,
    k,
    v,
    d_out,
    lse,
    delta,
    dmap,
    lse_text,
    img_idx,
    img_ok,
    row_ok,
    keys,
    key_ok,
    n0,
    tok_ptr,
    gmap_base,
    H,
    T,
    TS,
    TE,
    scale_log2,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_DOUT: tl.constexpr,
    MAP_GRAD: tl.constexpr,
    HEAD_MEAN: tl.constexpr,
    SELECT: tl.constexpr,
    TEXT_SOFTMAX: tl.constexpr,
    IEEE_DOTS: tl.constexpr,
):
    """``(P, dS)`` of one query block x key block, ``dS`` including the map gradient's term."""
    s = _dot(q, tl.trans(k), None, IEEE_DOTS) * scale_log2
    valid = row_ok[:, None] & key_ok[None, :]
    p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
    d_p = tl.zeros(p.shape, tl.float32)
    if HAS_DOUT:
        d_p = _dot(d_out, tl.trans(v), d_p, IEEE_DOTS)
    if MAP_GRAD:
        scattered = tl.zeros(p.shape, tl.float32)
        if (n0 < TE) & (n0 + BLOCK_N > TS):  # E = G S^T is zero outside the text block
            if SELECT:
                scattered = _scatter_tokens(
                    scattered, gmap_base, tok_ptr, img_idx, img_ok, keys, T, TS, BLOCK_T
                )
            else:  # every text token, in order: E is G on the text columns
                text_col = (keys >= TS) & (keys < TE)
                g_offs = img_idx[:, None] * T + (keys - TS)[None, :]
                scattered = tl.load(gmap_base + g_offs, mask=img_ok[:, None] & text_col[None, :], other=0.0)
            if HEAD_MEAN:
                scattered = scattered / H
        if TEXT_SOFTMAX:
            text_col = (keys >= TS) & (keys < TE)
            p_text = tl.where(valid & text_col[None, :], tl.exp2(s - lse_text[:, None]), 0.0)
            d_s = p * (d_p - delta[:, None]) + p_text * (scattered - dmap[:, None])
        else:
            d_s = p * (d_p + scattered - (delta + dmap)[:, None])
    else:
        d_s = p * (d_p - delta[:, None])
    return p, d_s


@triton.jit
def _row_stats(
    lse_ptr,
    lse_text_ptr,
    delta_ptr,
    dmap_ptr,
    bh,
    L,
    M_IMG,
    rows,
    row_ok,
    img_idx,
    img_ok,
    HAS_DOUT: tl.constexpr,
    MAP_GRAD: tl.constexpr,
    TEXT_SOFTMAX: tl.constexpr,
):
    """Per-row LSE, ``rowsum(dO * O)``, ``D_map`` (zero on text rows) and text-only LSE."""
    lse = tl.load(lse_ptr + bh * L + rows, mask=row_ok, other=0.0)
    delta = tl.zeros(lse.shape, tl.float32)
    if HAS_DOUT:
        delta = tl.load(delta_ptr + bh * L + rows, mask=row_ok, other=0.0)
    dmap = tl.zeros(lse.shape, tl.float32)
    lse_text = tl.zeros(lse.shape, tl.float32)
    if MAP_GRAD:
        dmap = tl.load(dmap_ptr + bh * M_IMG + img_idx, mask=img_ok, other=0.0)
        if TEXT_SOFTMAX:
            lse_text = tl.load(lse_text_ptr + bh * L + rows, mask=row_ok, other=0.0)
    return lse, delta, dmap, lse_text


@triton.jit
def joint_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    tok_ptr,
    lse_ptr,
    lse_text_ptr,
    delta_ptr,
    dmap_ptr,
    gmap_ptr,
    dq_ptr,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    H,
    L,
    M_IMG,
    T,
    D,
    TS,
    TE,
    scale_log2,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_DOUT: tl.constexpr,
    MAP_GRAD: tl.constexpr,
    HEAD_MEAN: tl.constexpr,
    SELECT: tl.constexpr,
    TEXT_SOFTMAX: tl.constexpr,
    IEEE_DOTS: tl.constexpr,
):
    """dQ of one query block of one head over all key blocks; grid ``(cdiv(L, BLOCK_M), B * H)``.
    ``gmap`` is the map gradient, fp32 ``(B, H, M_IMG, T)`` or head-mean ``(B, M_IMG, T)``."""
    bh = tl.program_id(1).to(tl.int64)
    batch = bh // H
    head = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    img_idx = _image_index(rows, TS, TE)
    img_ok = row_ok & ((rows < TS) | (rows >= TE))
    q = _rows_tile(q_ptr + batch * stride_qb + head * stride_qh, rows, stride_qm, row_ok, D, D_PAD)
    d_out = _rows_tile(do_ptr + batch * stride_dob + head * stride_doh, rows, stride_dom, row_ok, D, D_PAD)
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    if HEAD_MEAN:
        gmap_base = gmap_ptr + batch * M_IMG * T
    else:
        gmap_base = gmap_ptr + bh * M_IMG * T
    lse, delta, dmap, lse_text = _row_stats(
        lse_ptr,
        lse_text_ptr,
        delta_ptr,
        dmap_ptr,
        bh,
        L,
        M_IMG,
        rows,
        row_ok,
        img_idx,
        img_ok,
        HAS_DOUT,
        MAP_GRAD,
        TEXT_SOFTMAX,
    )

    d_q = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for n0 in range(0, L, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < L
        k = _rows_tile(k_base, keys, stride_kn, key_ok, D, D_PAD)
        v = _rows_tile(v_base, keys, stride_vn, key_ok, D, D_PAD)
        _, d_s = _score_grads(
            q,
            k,
            v,
            d_out,
            lse,
            delta,
            dmap,
            lse_text,
            img_idx,
            img_ok,
            row_ok,
            keys,
            key_ok,
            n0,
            tok_ptr,
            gmap_base,
            H,
            T,
            TS,
            TE,
            scale_log2,
            BLOCK_N,
            BLOCK_T,
            HAS_DOUT,
            MAP_GRAD,
            HEAD_MEAN,
            SELECT,
            TEXT_SOFTMAX,
            IEEE_DOTS,
        )
        d_q = _dot(d_s.to(k.dtype), k, d_q, IEEE_DOTS)
    dims = tl.arange(0, D_PAD)
    offs = batch * stride_dqb + head * stride_dqh + rows[:, None] * stride_dqm + dims[None, :]
    tl.store(
        dq_ptr + offs, (d_q * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & (dims < D)[None, :]
    )


@triton.jit
def joint_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    tok_ptr,
    lse_ptr,
    lse_text_ptr,
    delta_ptr,
    dmap_ptr,
    gmap_ptr,
    dk_ptr,
    dv_ptr,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    H,
    L,
    M_IMG,
    T,
    D,
    TS,
    TE,
    scale_log2,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_DOUT: tl.constexpr,
    MAP_GRAD: tl.constexpr,
    HEAD_MEAN: tl.constexpr,
    SELECT: tl.constexpr,
    TEXT_SOFTMAX: tl.constexpr,
    IEEE_DOTS: tl.constexpr,
):
    """dK and (with ``HAS_DOUT``) dV of one key block of one head over all query blocks; grid
    ``(cdiv(L, BLOCK_N), B * H)``; dk, dv are contiguous ``(B, H, L, D)`` in the input dtype."""
    bh = tl.program_id(1).to(tl.int64)
    batch = bh // H
    head = bh % H
    n0 = tl.program_id(0) * BLOCK_N
    keys = n0 + tl.arange(0, BLOCK_N)
    key_ok = keys < L
    k = _rows_tile(k_ptr + batch * stride_kb + head * stride_kh, keys, stride_kn, key_ok, D, D_PAD)
    v = _rows_tile(v_ptr + batch * stride_vb + head * stride_vh, keys, stride_vn, key_ok, D, D_PAD)
    q_base = q_ptr + batch * stride_qb + head * stride_qh
    do_base = do_ptr + batch * stride_dob + head * stride_doh
    if HEAD_MEAN:
        gmap_base = gmap_ptr + batch * M_IMG * T
    else:
        gmap_base = gmap_ptr + bh * M_IMG * T

    d_k = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    d_v = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    for m0 in range(0, L, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < L
        img_idx = _image_index(rows, TS, TE)
        img_ok = row_ok & ((rows < TS) | (rows >= TE))
        q = _rows_tile(q_base, rows, stride_qm, row_ok, D, D_PAD)
        d_out = _rows_tile(do_base, rows, stride_dom, row_ok, D, D_PAD)
        lse, delta, dmap, lse_text = _row_stats(
            lse_ptr,
            lse_text_ptr,
            delta_ptr,
            dmap_ptr,
            bh,
            L,
            M_IMG,
            rows,
            row_ok,
            img_idx,
            img_ok,
            HAS_DOUT,
            MAP_GRAD,
            TEXT_SOFTMAX,
        )
        p, d_s = _score_grads(
            q,
            k,
            v,
            d_out,
            lse,
            delta,
            dmap,
            lse_text,
            img_idx,
            img_ok,
            row_ok,
            keys,
            key_ok,
            n0,
            tok_ptr,
            gmap_base,
            H,
            T,
            TS,
            TE,
            scale_log2,
            BLOCK_N,
            BLOCK_T,
            HAS_DOUT,
            MAP_GRAD,
            HEAD_MEAN,
            SELECT,
            TEXT_SOFTMAX,
            IEEE_DOTS,
        )
        d_k = _dot(tl.trans(d_s.to(q.dtype)), q, d_k, IEEE_DOTS)
        if HAS_DOUT:
            d_v = _dot(tl.trans(p.to(d_out.dtype)), d_out, d_v, IEEE_DOTS)
    dims = tl.arange(0, D_PAD)
    offs = bh * L * D + keys[:, None] * D + dims[None, :]
    mask = key_ok[:, None] & (dims < D)[None, :]
    tl.store(dk_ptr + offs, (d_k * scale).to(dk_ptr.dtype.element_ty), mask=mask)
    if HAS_DOUT:
        tl.store(dv_ptr + offs, d_v.to(dv_ptr.dtype.element_ty), mask=mask)


# ---- launch configuration (pure functions of dtype, shape and mode, enumerated by the AOT tests) ----


@dataclass(frozen=True)
class JointTiles:
    """Tile shape and launch options of one joint-attention launch."""

    block_m: int
    block_n: int
    block_t: int
    d_pad: int
    num_warps: int
    num_stages: int


def joint_tiles(head_dim: int) -> JointTiles:
    """One tile set for every joint kernel. The head is held whole (``D_PAD``), so tiles shrink as it
    grows: ``64 x 64`` score tiles up to ``D = 64`` (SD3.5), ``32 x 32`` beyond (FLUX's 128, up to 256),
    which keeps the fp32 backward (q, dO, k, v tiles and two ``D_PAD`` accumulators) within sm_80's
    shared memory. ``BLOCK_T`` (32) is the token block of the maps pass and of the map-gradient
    scatter. Not tuned on a GPU yet; ``num_stages`` 1 keeps shared memory bounded."""
    d_pad = next_pow2(head_dim)
    block = 64 if d_pad <= 64 else 32
    return JointTiles(block, block, 32, d_pad, 4 if d_pad <= 64 else 8, num_stages=1)


def supports_joint(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the joint kernels cover this problem (else the torch reference runs)."""
    return dtype in (torch.float32, torch.float16, torch.bfloat16) and head_dim <= MAX_HEAD_DIM


@dataclass(frozen=True)
class JointBackwardFlags:
    """What one backward launch reads and computes; build it with :meth:`make`."""

    has_dout: bool
    map_grad: bool
    head_mean: bool
    select: bool
    text_softmax: bool

    @classmethod
    def make(
        cls, has_dout: bool, map_grad: bool, head_mean: bool, select: bool, text_softmax: bool
    ) -> "JointBackwardFlags":
        """Map flags cannot matter without a map gradient: equivalent launches share one kernel."""
        if not map_grad:
            head_mean = select = text_softmax = False
        return cls(has_dout, map_grad, head_mean, select, text_softmax)


def forward_constexprs(tiles: JointTiles, dtype: torch.dtype, text_lse: bool) -> dict[str, object]:
    return dict(
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        D_PAD=tiles.d_pad,
        TEXT_LSE=text_lse,
        IEEE_DOTS=ieee_dots(dtype),
    )


def maps_constexprs(
    tiles: JointTiles, dtype: torch.dtype, mode: MapsMode, head_mean: bool, select: bool
) -> dict[str, object]:
    return dict(
        BLOCK_M=tiles.block_m,
        BLOCK_T=tiles.block_t,
        D_PAD=tiles.d_pad,
        MODE=int(mode),
        HEAD_MEAN=head_mean,
        SELECT=select,
        IEEE_DOTS=ieee_dots(dtype),
    )


def backward_constexprs(
    tiles: JointTiles, dtype: torch.dtype, flags: JointBackwardFlags
) -> dict[str, object]:
    return dict(
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_T=tiles.block_t,
        D_PAD=tiles.d_pad,
        HAS_DOUT=flags.has_dout,
        MAP_GRAD=flags.map_grad,
        HEAD_MEAN=flags.head_mean,
        SELECT=flags.select,
        TEXT_SOFTMAX=flags.text_softmax,
        IEEE_DOTS=ieee_dots(dtype),
    )


# ---- host launchers ----


def _launcher(kernel):
    # wrap_triton lets torch.compile trace the launch; torch 2.11 rejects interpreted kernels there.
    return kernel if INTERPRETED else wrap_triton(kernel)


def _prepare(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    _check_device(q)
    return _unit_last(q), _unit_last(k), _unit_last(v)


def joint_forward(
    q: Tensor, k: Tensor, v: Tensor, text: tuple[int, int], scale: float, text_lse: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(out, lse, lse_text)``: output, base-2 LSE over all keys and (``text_lse``) over text keys,
    both fp32 ``(B*H, L)`` of ``scale * log2(e) * q k^T``."""
    b, h, length, d = q.shape
    tiles = joint_tiles(d)
    out = torch.empty_like(q)
    lse = q.new_empty((b * h, length), dtype=torch.float32)
    lse_text = (
        q.new_empty((b * h, length), dtype=torch.float32) if text_lse else _placeholder(q, torch.float32)
    )
    start, n_text = text
    _launcher(joint_fwd_kernel)[(triton.cdiv(length, tiles.block_m), b * h)](
        q,
        k,
        v,
        out,
        lse,
        lse_text,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        h,
        length,
        d,
        start,
        start + n_text,
        scale * math.log2(math.e),
        **forward_constexprs(tiles, q.dtype, text_lse),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out, lse, (lse_text if text_lse else None)


def joint_maps(
    q: Tensor,
    k: Tensor,
    tokens: Tensor | None,
    lse: Tensor,
    text: tuple[int, int],
    scale: float,
    head_mean: bool,
    mode: MapsMode,
    aux: Tensor | None = None,
) -> Tensor:
    """The maps pass: maps (``MAPS``), per-sample L1 to ``aux = ref`` (``L1``), or ``D_map``
    ``(B*H, M_img)`` against the map gradient ``aux = G`` (``DMAP``)."""
    b, h, length, d = q.shape
    start, n_text = text
    m_img = length - n_text
    t = n_text if tokens is None else tokens.numel()
    tiles = joint_tiles(d)
    grid_m, grid_t = triton.cdiv(m_img, tiles.block_m), triton.cdiv(t, tiles.block_t)
    groups = b if head_mean and mode != MapsMode.DMAP else b * h
    placeholder = _placeholder(q, torch.float32)
    maps = placeholder
    if mode == MapsMode.MAPS:
        maps = q.new_empty((b, m_img, t) if head_mean else (b, h, m_img, t), dtype=torch.float32)
        part = placeholder
    elif mode == MapsMode.L1:
        part = q.new_empty((groups, grid_m, grid_t), dtype=torch.float32)
    else:
        part = q.new_empty((groups, m_img, grid_t), dtype=torch.float32)
    aux_arg = placeholder if aux is None else _as_f32(aux)
    _launcher(joint_maps_kernel)[(grid_m, grid_t, groups)](
        q,
        k,
        _placeholder(q, torch.int64) if tokens is None else tokens.contiguous(),
        lse,
        aux_arg if mode == MapsMode.L1 else placeholder,
        aux_arg if mode == MapsMode.DMAP else placeholder,
        maps,
        part,
        *_strides(q),
        *_strides(k),
        h,
        length,
        m_img,
        t,
        d,
        start,
        start + n_text,
        scale * math.log2(math.e),
        **maps_constexprs(tiles, q.dtype, mode, head_mean, tokens is not None),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    if mode == MapsMode.MAPS:
        return maps
    if mode == MapsMode.DMAP:
        return part.sum(dim=-1)
    per_group = part.view(groups, -1).sum(dim=1)
    return per_group if head_mean else per_group.view(b, h).mean(dim=1)  # per head: mean of head sums


def joint_capture(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tokens: Tensor | None,
    text: tuple[int, int],
    scale: float,
    head_mean: bool,
    text_softmax: bool,
) -> tuple[Tensor, Tensor]:
    """``(out, maps)``: the forward pass, then the maps pass from its LSE."""
    q, k, v = _prepare(q, k, v)
    out, lse, lse_text = joint_forward(q, k, v, text, scale, text_softmax)
    maps = joint_maps(q, k, tokens, lse_text if text_softmax else lse, text, scale, head_mean, MapsMode.MAPS)
    return out, maps


def joint_guided(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ref: Tensor,
    tokens: Tensor | None,
    text: tuple[int, int],
    scale: float,
    head_mean: bool,
    text_softmax: bool,
) -> tuple[Tensor, Tensor]:
    """``(out, loss)``: the forward pass, then the maps pass scoring against ``ref``."""
    q, k, v = _prepare(q, k, v)
    out, lse, lse_text = joint_forward(q, k, v, text, scale, text_softmax)
    loss = joint_maps(
        q, k, tokens, lse_text if text_softmax else lse, text, scale, head_mean, MapsMode.L1, ref
    )
    return out, loss


def joint_backward(
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
    text: tuple[int, int],
    text_softmax: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(dQ, dK, dV)`` from a gradient on ``out`` plus one on the maps (``d_maps``) or on the L1 loss
    (``ref`` with ``d_loss``). Recomputes the forward's LSEs (one forward launch); for the L1 loss it
    recomputes the maps to form ``G = sign(A - ref) * d_loss`` (map-sized, never ``L x L``)."""
    q, k, v = _prepare(q, k, v)
    b, h, length, d = q.shape
    start, n_text = text
    has_dout = d_out is not None
    out, lse, lse_text = joint_forward(q, k, v, text, scale, text_softmax)
    map_lse = lse_text if text_softmax else lse
    placeholder = _placeholder(q, torch.float32)
    delta = placeholder
    if has_dout:
        d_out = _unit_last(d_out)
        delta = (d_out.float() * out.float()).sum(dim=-1).reshape(b * h, length).contiguous()
    grad = None
    if d_maps is not None:
        grad = _as_f32(d_maps)
    elif d_loss is not None:
        maps = joint_maps(q, k, tokens, map_lse, text, scale, head_mean, MapsMode.MAPS)
        weight = d_loss.float() if head_mean else d_loss.float() / h  # head mean's 1/H is applied in-kernel
        grad = torch.sign(maps - ref.float()) * weight.view(-1, *([1] * (maps.dim() - 1)))
    flags = JointBackwardFlags.make(has_dout, grad is not None, head_mean, tokens is not None, text_softmax)
    dmap = placeholder
    if flags.map_grad:
        dmap = joint_maps(q, k, tokens, map_lse, text, scale, head_mean, MapsMode.DMAP, grad)
    t = n_text if tokens is None else tokens.numel()
    tiles = joint_tiles(d)
    common = (
        _placeholder(q, torch.int64) if tokens is None else tokens.contiguous(),
        lse,
        placeholder if lse_text is None else lse_text,
        delta,
        dmap,
        placeholder if grad is None else grad.contiguous(),
    )
    d_out_arg = d_out if has_dout else q
    sizes = (h, length, length - n_text, t, d, start, start + n_text, scale * math.log2(math.e), scale)
    options = dict(
        **backward_constexprs(tiles, q.dtype, flags), num_warps=tiles.num_warps, num_stages=tiles.num_stages
    )
    dq = torch.empty_like(q)
    _launcher(joint_bwd_dq_kernel)[(triton.cdiv(length, tiles.block_m), b * h)](
        q,
        k,
        v,
        d_out_arg,
        *common,
        dq,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(d_out_arg),
        *_strides(dq),
        *sizes,
        **options,
    )
    dk = dv = None
    if need_dk or (need_dv and has_dout):
        dk = q.new_empty((b, h, length, d), dtype=k.dtype)
        dv = q.new_empty((b, h, length, d), dtype=v.dtype) if has_dout else placeholder
        _launcher(joint_bwd_dkdv_kernel)[(triton.cdiv(length, tiles.block_n), b * h)](
            q,
            k,
            v,
            d_out_arg,
            *common,
            dk,
            dv,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(d_out_arg),
            *sizes,
            **options,
        )
        dk = dk if need_dk else None
        dv = dv if need_dv and has_dout else None
    if need_dv and dv is None:  # no gradient on out: V does not affect the maps
        dv = torch.zeros_like(v)
    return dq, dk, dv
