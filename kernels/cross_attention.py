"""Triton kernels for cross-attention with map capture, L1 map guidance and a fused backward.

All ``N <= 256`` keys of a row fit in one tile, so each program computes exact softmax rows
(padded keys score ``-inf``) for ``BLOCK_M`` queries. The head dimension is walked in chunks of
``BLOCK_D`` (masked past ``D``) by a runtime loop: shared memory stays bounded for ``D`` up to
256, and the compiler cannot hoist every chunk's loads at once (an unrolled loop spills at D=160).
Token selection is a product with a 0/1 matrix ``S[n, t] = (tokens[t] == n)``: the maps are
``A = P S`` and a map gradient enters the scores as ``E = G S^T``, which also sums duplicate
tokens. These products run in IEEE fp32, so selecting a column is exact.

The forward kernel serves capture (out + maps), guidance (out + per-block L1 partials) and
maps-only recompute; the backward kernel serves both ops' gradients. Constexpr flags pick the
parts; the launchers in ``launch.py`` choose them.
"""

import triton
import triton.language as tl

from dreamblend.kernels.config import MapGrad

GRAD_NONE = tl.constexpr(int(MapGrad.NONE))
GRAD_GIVEN = tl.constexpr(int(MapGrad.GIVEN))
GRAD_L1 = tl.constexpr(int(MapGrad.L1))


@triton.jit
def _load_tile(base, rows, row_stride, cols, row_ok, col_ok):
    """A ``rows x cols`` tile of a row-major matrix with unit column stride; zeros outside."""
    offs = rows[:, None] * row_stride + cols[None, :]
    return tl.load(base + offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _store_tile(base, rows, row_stride, cols, row_ok, col_ok, value):
    offs = rows[:, None] * row_stride + cols[None, :]
    tl.store(base + offs, value.to(base.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _add_to_tile(base, rows, row_stride, cols, row_ok, col_ok, value):
    """``tile += value`` on an fp32 tile that only this program touches."""
    offs = rows[:, None] * row_stride + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(base + offs, tl.load(base + offs, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` accumulated in fp32; IEEE products for fp32 inputs (no silent TF32)."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _attention_probs(
    q_base,
    stride_qm,
    k_base,
    stride_kn,
    rows,
    row_ok,
    keys,
    key_ok,
    D,
    scale_log2,
    BLOCK_M: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE_DOTS: tl.constexpr,
):
    """Softmax rows ``P = softmax(scale * q k^T)`` in fp32, ``(BLOCK_M, N_PAD)``, zero on padded keys."""
    scores = tl.zeros((BLOCK_M, N_PAD), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        q = _load_tile(q_base, rows, stride_qm, dims, row_ok, dim_ok)
        k = _load_tile(k_base, keys, stride_kn, dims, key_ok, dim_ok)
        scores = _dot(q, tl.trans(k), scores, IEEE_DOTS)
    scores = tl.where(key_ok[None, :], scores * scale_log2, float("-inf"))
    probs = tl.exp2(scores - tl.max(scores, axis=1)[:, None])
    return probs / tl.sum(probs, axis=1)[:, None]


@triton.jit
def _selection(tok_ptr, T, N_PAD: tl.constexpr, T_PAD: tl.constexpr):
    """The 0/1 matrix ``S (N_PAD, T_PAD)`` with ``S[n, t] = (tokens[t] == n)``; padded slots are empty."""
    slots = tl.arange(0, T_PAD)
    tokens = tl.load(tok_ptr + slots, mask=slots < T, other=-1)
    return (tl.arange(0, N_PAD)[:, None] == tokens[None, :]).to(tl.float32)


@triton.jit
def _token_columns(probs, sel, SELECT: tl.constexpr):
    """Map columns ``A = P[:, tokens]`` (``P`` itself when every token is captured)."""
    if SELECT:
        maps = _dot(probs, sel, None, True)
    else:
        maps = probs
    return maps


@triton.jit
def _scatter_columns(grad, sel, SELECT: tl.constexpr):
    """``E = G S^T``: a map gradient placed on its key columns, duplicate tokens summed."""
    if SELECT:
        scattered = _dot(grad, tl.trans(sel), None, True)
    else:
        scattered = grad
    return scattered


@triton.jit
def attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tok_ptr,
    ref_ptr,
    out_ptr,
    maps_ptr,
    loss_part_ptr,
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
    M,
    N,
    T,
    D,
    scale_log2,
    N_PAD: tl.constexpr,
    T_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_MEAN: tl.constexpr,
    SELECT: tl.constexpr,
    STORE_OUT: tl.constexpr,
    STORE_MAPS: tl.constexpr,
    L1_LOSS: tl.constexpr,
    IEEE_DOTS: tl.constexpr,
):
    """One query block of one head, or of every head of a sample in head-mean mode.

    Grid ``(cdiv(M, BLOCK_M), B * H)``, or ``(cdiv(M, BLOCK_M), B)`` with ``HEAD_MEAN``, where
    the program loops over heads and averages their maps in registers (deterministic). Maps and
    ``ref`` are contiguous fp32 ``(B, H, M, T)`` or ``(B, M, T)``; ``loss_part`` gets one
    ``sum |A - ref|`` per program, indexed ``[group, m_block]``.
    """
    pid_m = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    if HEAD_MEAN:
        batch = group
        first_head = 0
        n_heads = H
    else:
        batch = group // H
        first_head = group % H
        n_heads = 1
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    keys = tl.arange(0, N_PAD)
    key_ok = keys < N
    slots = tl.arange(0, T_PAD)
    slot_ok = slots < T
    if SELECT:
        sel = _selection(tok_ptr, T, N_PAD, T_PAD)
    else:
        sel = 0.0

    maps = tl.zeros((BLOCK_M, T_PAD), tl.float32)
    for i in range(n_heads):
        head = first_head + i
        probs = _attention_probs(
            q_ptr + batch * stride_qb + head * stride_qh,
            stride_qm,
            k_ptr + batch * stride_kb + head * stride_kh,
            stride_kn,
            rows,
            row_ok,
            keys,
            key_ok,
            D,
            scale_log2,
            BLOCK_M,
            N_PAD,
            BLOCK_D,
            IEEE_DOTS,
        )
        if STORE_OUT:
            v_base = v_ptr + batch * stride_vb + head * stride_vh
            out_base = out_ptr + batch * stride_ob + head * stride_oh
            p_in = probs.to(v_ptr.dtype.element_ty)
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                dim_ok = dims < D
                v = _load_tile(v_base, keys, stride_vn, dims, key_ok, dim_ok)
                out = _dot(p_in, v, None, IEEE_DOTS)
                _store_tile(out_base, rows, stride_om, dims, row_ok, dim_ok, out)
        if STORE_MAPS or L1_LOSS:
            maps += _token_columns(probs, sel, SELECT)

    if HEAD_MEAN:
        maps = maps / H
    map_offs = group * M * T + rows[:, None] * T + slots[None, :]
    map_ok = row_ok[:, None] & slot_ok[None, :]
    if STORE_MAPS:
        tl.store(maps_ptr + map_offs, maps, mask=map_ok)
    if L1_LOSS:
        ref = tl.load(ref_ptr + map_offs, mask=map_ok, other=0.0)
        err = tl.where(map_ok, tl.abs(maps - ref), 0.0)
        tl.store(loss_part_ptr + group * tl.num_programs(0) + pid_m, tl.sum(tl.sum(err, axis=1), axis=0))


@triton.jit
def attention_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    tok_ptr,
    gmap_ptr,
    ref_ptr,
    dloss_ptr,
    dq_ptr,
    dk_part_ptr,
    dv_part_ptr,
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
    M,
    N,
    T,
    D,
    scale_log2,
    scale,
    N_PAD: tl.constexpr,
    T_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_DOUT: tl.constexpr,
    MAP_GRAD: tl.constexpr,
    HEAD_MEAN: tl.constexpr,
    SELECT: tl.constexpr,
    NEED_DK: tl.constexpr,
    NEED_DV: tl.constexpr,
    IEEE_DOTS: tl.constexpr,
):
    """dQ, and dK/dV partials, of one head; grid ``(programs, B * H)``.

    Program ``i`` handles query blocks ``i, i + programs, ...`` (one block each when only dQ is
    needed). It recomputes ``P``; ``dP = dO V^T + G S^T`` with ``G`` read from ``gmap``
    (``GRAD_GIVEN``) or formed from ``ref`` and ``d_loss`` (``GRAD_L1``; in head-mean mode
    ``gmap`` holds the recomputed head-mean map the sign needs). ``Delta = rowsum(P * dP)``
    includes the map gradient. Each program adds its blocks' dK/dV into its own zeroed fp32
    partial ``[b * H + h, program]`` of ``(B*H, programs, N, D)``, in a fixed order; the launcher
    sums the partials, so the result is deterministic.
    """
    bh = tl.program_id(1).to(tl.int64)
    batch = bh // H
    head = bh % H
    keys = tl.arange(0, N_PAD)
    key_ok = keys < N
    slots = tl.arange(0, T_PAD)
    q_base = q_ptr + batch * stride_qb + head * stride_qh
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    do_base = do_ptr + batch * stride_dob + head * stride_doh
    dq_base = dq_ptr + batch * stride_dqb + head * stride_dqh
    part_rows = (bh * tl.num_programs(0) + tl.program_id(0)) * N + keys
    if HEAD_MEAN:
        map_base = batch * M * T
    else:
        map_base = bh * M * T
    if SELECT:
        sel = _selection(tok_ptr, T, N_PAD, T_PAD)
    else:
        sel = 0.0

    for block in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        probs = _attention_probs(
            q_base,
            stride_qm,
            k_base,
            stride_kn,
            rows,
            row_ok,
            keys,
            key_ok,
            D,
            scale_log2,
            BLOCK_M,
            N_PAD,
            BLOCK_D,
            IEEE_DOTS,
        )
        d_probs = tl.zeros((BLOCK_M, N_PAD), tl.float32)
        if HAS_DOUT:
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                dim_ok = dims < D
                d_out = _load_tile(do_base, rows, stride_dom, dims, row_ok, dim_ok)
                v = _load_tile(v_base, keys, stride_vn, dims, key_ok, dim_ok)
                d_probs = _dot(d_out, tl.trans(v), d_probs, IEEE_DOTS)
        if MAP_GRAD != GRAD_NONE:
            map_ok = row_ok[:, None] & (slots < T)[None, :]
            map_offs = map_base + rows[:, None] * T + slots[None, :]
            if MAP_GRAD == GRAD_GIVEN:
                grad = tl.load(gmap_ptr + map_offs, mask=map_ok, other=0.0)
                if HEAD_MEAN:
                    grad = grad / H
            else:
                if HEAD_MEAN:
                    maps = tl.load(gmap_ptr + map_offs, mask=map_ok, other=0.0)
                else:
                    maps = _token_columns(probs, sel, SELECT)
                diff = maps - tl.load(ref_ptr + map_offs, mask=map_ok, other=0.0)
                weight = tl.load(dloss_ptr + batch) / H
                grad = tl.where(diff > 0, weight, tl.where(diff < 0, -weight, 0.0))
            grad = tl.where(map_ok, grad, 0.0)
            d_probs += _scatter_columns(grad, sel, SELECT)

        # Delta = rowsum(P * dP), not rowsum(dO * O): the map gradient is part of dP.
        delta = tl.sum(probs * d_probs, axis=1)
        ds_in = (probs * (d_probs - delta[:, None])).to(q_ptr.dtype.element_ty)
        p_in = probs.to(q_ptr.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_ok = dims < D
            k = _load_tile(k_base, keys, stride_kn, dims, key_ok, dim_ok)
            d_q = _dot(ds_in, k, None, IEEE_DOTS) * scale
            _store_tile(dq_base, rows, stride_dqm, dims, row_ok, dim_ok, d_q)
            if NEED_DK:
                q = _load_tile(q_base, rows, stride_qm, dims, row_ok, dim_ok)
                d_k = _dot(tl.trans(ds_in), q, None, IEEE_DOTS) * scale
                _add_to_tile(dk_part_ptr, part_rows, D, dims, key_ok, dim_ok, d_k)
            if NEED_DV:
                d_out = _load_tile(do_base, rows, stride_dom, dims, row_ok, dim_ok)
                d_v = _dot(tl.trans(p_in), d_out, None, IEEE_DOTS)
                _add_to_tile(dv_part_ptr, part_rows, D, dims, key_ok, dim_ok, d_v)
