"""The C++ CPU backend against the torch reference: outputs, maps, loss, gradients, determinism, dispatch.

The extension is built once for the module (a cached build makes that a no-op). A failing build fails
these tests instead of skipping them; only a machine without a C++ compiler skips them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dreamblend import ops
from dreamblend.ops import cpp
from dreamblend.ops.reference import compute_dtype


@pytest.fixture(scope="module", autouse=True)
def extension():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler (c++ or $CXX) to build the extension with")
    start = time.perf_counter()
    try:
        directory = cpp.build()
    except Exception as exc:  # noqa: BLE001 - reported as a failure with the compiler's message
        pytest.fail(f"building the C++ extension failed: {exc}")
    print(f"C++ extension ready in {time.perf_counter() - start:.1f} s: {directory}")
    return directory


SHAPES = [
    # B, H, M, N, D: M in {1, 63, 300} (300: a full and a partial row tile), N in {1, 77}, D in {40, 64}
    (1, 1, 1, 1, 40),
    (3, 5, 63, 77, 64),
    (1, 5, 300, 77, 40),
    (3, 1, 300, 1, 64),
    (3, 5, 1, 77, 40),
    (1, 1, 63, 77, 64),
]
# Tolerances against the reference: both compute in float32 (float64 for float64), so they differ
# only in summation order, plus one rounding of the half-precision outputs.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
MAP_TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-4, atol=1e-5),
}


def make_qkv(b, h, m, n, d, dtype=torch.float64, seed=0, kv_grad=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g).to(dtype) for s in (m, n, n))
    return q.requires_grad_(), k.requires_grad_(kv_grad), v.requires_grad_(kv_grad)


def token_subset(n: int) -> list[int]:
    """A subset with a repeated token and a negative index (the last token)."""
    return [0, n // 2, n // 2, -1]


def reference_map_with_margin(q, k, v, tokens, head_mean, seed=1):
    """Maps a few percent off the true ones, so no sign of ``A - ref`` depends on rounding."""
    with torch.no_grad():
        _, maps = ops.capture_attention(q, k, v, tokens=tokens, head_mean=head_mean, backend="torch")
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, maps.shape, generator=g).to(maps.dtype) * 2 - 1
    return maps + sign * (0.01 + 0.04 * torch.rand(maps.shape, generator=g).to(maps.dtype))


def run_op(op, backend, q, k, v, ref, tokens, head_mean, use):
    """The op's outputs and dQ, dK, dV of a weighted sum of the outputs named in ``use``."""
    if op == "capture":
        out, second = ops.capture_attention(q, k, v, tokens=tokens, head_mean=head_mean, backend=backend)
    else:
        out, second = ops.guided_attention(q, k, v, ref, tokens=tokens, head_mean=head_mean, backend=backend)
    g = torch.Generator().manual_seed(2)
    objective = 0
    if use in ("both", "out"):
        objective = (
            objective + (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
        )
    if use in ("both", "second"):
        weight = torch.rand(second.shape, generator=g, dtype=torch.float64) + 0.5
        objective = objective + (second.double() * weight).sum()
    wrt = [t for t in (q, k, v) if t.requires_grad]
    grads = torch.autograd.grad(objective, wrt)
    return out.detach(), second.detach(), grads


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("use", ["both", "out", "second"])
@pytest.mark.parametrize("head_mean", [False, True], ids=["per_head", "head_mean"])
@pytest.mark.parametrize("op", ["capture", "guided"])
@pytest.mark.parametrize("b,h,m,n,d", SHAPES)
def test_matches_reference(b, h, m, n, d, op, head_mean, use, dtype):
    q, k, v = make_qkv(b, h, m, n, d, dtype=dtype)
    tokens = token_subset(n) if (b + m) % 2 == 0 else None
    ref = reference_map_with_margin(q, k, v, tokens, head_mean) if op == "guided" else None
    out, second, grads = run_op(op, "cpp", q, k, v, ref, tokens, head_mean, use)
    out_r, second_r, grads_r = run_op(op, "torch", q, k, v, ref, tokens, head_mean, use)
    assert out.dtype == dtype and second.dtype == second_r.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(out, out_r, **TOLERANCES[dtype])
    torch.testing.assert_close(second, second_r, **MAP_TOLERANCES[dtype])
    for grad, grad_r in zip(grads, grads_r, strict=True):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad, grad_r, **TOLERANCES[dtype])


@pytest.mark.parametrize("tokens", [None, [0, 38, 38, 76]], ids=["all_tokens", "subset"])
@pytest.mark.parametrize("head_mean", [False, True], ids=["per_head", "head_mean"])
@pytest.mark.parametrize("rows", [(1, 2), (0, 1), (1, 3), (0, 3)])
def test_capture_rows_keeps_maps_of_those_rows_and_every_output(rows, head_mean, tokens):
    """One call over the batch equals the reference over all rows, with maps of rows [start, stop)."""
    start, stop = rows
    q, k, v = make_qkv(3, 2, 300, 77, 40)  # 300 queries: a full and a partial row tile
    idx = None if tokens is None else torch.tensor(tokens)
    out, maps = cpp.capture_rows(q, k, v, 0.3, idx, head_mean, start, stop)
    out_r, maps_r = ops.capture_attention(
        q, k, v, scale=0.3, tokens=tokens, head_mean=head_mean, backend="torch"
    )
    assert maps.shape == maps_r[start:stop].shape
    torch.testing.assert_close(out, out_r, **TOLERANCES[torch.float64])
    torch.testing.assert_close(maps, maps_r[start:stop], **MAP_TOLERANCES[torch.float64])

    g = torch.Generator().manual_seed(3)
    d_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    d_maps = torch.randn(maps.shape, generator=g, dtype=maps.dtype)
    grads = torch.autograd.grad((out, maps), (q, k, v), (d_out, d_maps))
    grads_r = torch.autograd.grad((out_r, maps_r[start:stop]), (q, k, v), (d_out, d_maps))
    for grad, grad_r in zip(grads, grads_r, strict=True):
        torch.testing.assert_close(grad, grad_r, **TOLERANCES[torch.float64])


def test_capture_rows_refuses_an_empty_or_outside_range():
    q, k, v = make_qkv(2, 1, 4, 3, 8)
    for start, stop in ((1, 1), (0, 3), (-1, 1)):
        with pytest.raises(
            RuntimeError, match=r"map rows .* must be a non-empty range of the batch's 2 rows"
        ):
            cpp.capture_rows(q, k, v, 0.3, None, False, start, stop)


@pytest.mark.parametrize("head_mean", [False, True], ids=["per_head", "head_mean"])
def test_guidance_needs_dq_only(head_mean):
    """Frozen text features: k and v get no gradient, and the loss alone drives dQ."""
    q, k, v = make_qkv(2, 3, 130, 77, 40, kv_grad=False)
    ref = reference_map_with_margin(q, k, v, [5, 6], head_mean)
    _, loss = ops.guided_attention(q, k, v, ref, tokens=[5, 6], head_mean=head_mean, backend="cpp")
    loss.sum().backward()
    _, loss_r = ops.guided_attention(q, k, v, ref, tokens=[5, 6], head_mean=head_mean, backend="torch")
    (dq_r,) = torch.autograd.grad(loss_r.sum(), q)
    assert k.grad is None and v.grad is None
    torch.testing.assert_close(q.grad, dq_r, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("head_mean", [False, True], ids=["per_head", "head_mean"])
def test_capture_gradcheck(head_mean):
    q, k, v = make_qkv(1, 2, 5, 3, 4)
    tokens = torch.tensor([2, 0, 2])
    assert torch.autograd.gradcheck(
        lambda q, k, v: cpp.capture_attention(q, k, v, 0.7, tokens, head_mean), (q, k, v)
    )


def test_double_backward_is_refused():
    q, k, v = make_qkv(1, 2, 5, 3, 4)
    _, maps = cpp.capture_attention(q, k, v, 0.7, None, False)
    (dq,) = torch.autograd.grad(maps.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dq.sum().backward()


def test_bitwise_deterministic_across_runs_and_close_across_thread_counts():
    """Tiles and their partial sums have a fixed order, so a rerun is identical to the bit. The tile
    products differ with the thread count (ATen's GEMMs on one thread, oneDNN's brgemm on several),
    so 1 and 2 threads agree within float32 rounding only. Each thread count is warmed up once before
    its reruns are compared (MKL's first GEMM in a new OpenMP worker differed from later ones by 5e-7
    when MKL_NUM_THREADS=1)."""
    q, k, v = make_qkv(2, 4, 300, 77, 40, dtype=torch.float32)
    ref = reference_map_with_margin(q, k, v, None, False)

    def run():
        out, loss = ops.guided_attention(q, k, v, ref, backend="cpp")
        _, maps = ops.capture_attention(q, k, v, head_mean=True, backend="cpp")
        grads = torch.autograd.grad(loss.sum() + out.sum() + maps.sum(), (q, k, v))
        return out, loss, maps, *grads

    threads = torch.get_num_threads()
    results = {}
    try:
        for count in (2, 1):
            torch.set_num_threads(count)
            run()
            first, second = run(), run()
            for a, b in zip(first, second, strict=True):
                assert torch.equal(a, b), f"{count} threads: a rerun differs"
            results[count] = first
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[2], results[1], strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])


@pytest.fixture(params=["portable", "avx2", "avx512"])
def simd(request):
    """Each instruction set of the float row kernels that this CPU runs; the others are skipped, as a
    CPU without them would never pick them (every x86-64 CPU runs the portable one)."""
    if request.param not in cpp.simd_levels():
        pytest.skip(f"this CPU lacks {request.param}")
    previous = cpp.simd_level(request.param)
    yield request.param
    cpp.simd_level(previous)


# float32 against float64: the rows sum at most 300 float32 terms of size <= 1 (error <= 300 * 2^-24
# relative, ~2e-5, in the worst ordering; random signs keep it far smaller) and the polynomial exp is
# within 2 ulp; the gradients add one more such sum.
F32_VS_F64 = dict(rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [None, [0, 38, 38, 76]], ids=["all_tokens", "subset"])
@pytest.mark.parametrize("op", ["capture", "guided"])
def test_every_simd_level_matches_float64(simd, op, tokens, threads):
    """The softmax, L1, softmax-backward and transpose row kernels of each instruction set, through both
    ops and both map paths (all tokens: fused into the probability rows; a subset: a separate map tile),
    with M = 300 and N = 77 so that rows end in a partial vector and the transposes (k and v as (77, 40),
    P and dS as (300 - 256, 77) and (256, 77)) have partial blocks. Two threads take oneDNN's float32
    products, which transpose their operands, on any CPU; one thread takes them off Intel CPUs only."""
    q, k, v = make_qkv(2, 3, 300, 77, 40)
    ref = reference_map_with_margin(q, k, v, tokens, False) if op == "guided" else None
    out64, second64, grads64 = run_op(op, "torch", q, k, v, ref, tokens, False, "both")
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref32 = None if ref is None else ref.float()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, second, grads = run_op(op, "cpp", q32, k32, v32, ref32, tokens, False, "both")
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(out.double(), out64, **F32_VS_F64)
    torch.testing.assert_close(second.double(), second64, **F32_VS_F64)
    for grad, grad64 in zip(grads, grads64, strict=True):
        torch.testing.assert_close(grad.double(), grad64, **F32_VS_F64)


@pytest.mark.parametrize("head_mean", [False, True], ids=["per_head", "head_mean"])
@pytest.mark.parametrize("op", ["capture", "guided"])
@pytest.mark.parametrize("b,h,m,n,d", SHAPES)
def test_float32_on_several_threads_matches_float64(b, h, m, n, d, op, head_mean):
    """On several threads the float32 products are oneDNN's batch-reduce micro-kernel (on one thread,
    ATen's GEMMs, which the other tests run): outputs, maps or loss and dQ, dK, dV against float64."""
    q, k, v = make_qkv(b, h, m, n, d)
    tokens = token_subset(n) if (b + m) % 2 == 0 else None
    ref = reference_map_with_margin(q, k, v, tokens, head_mean) if op == "guided" else None
    out64, second64, grads64 = run_op(op, "torch", q, k, v, ref, tokens, head_mean, "both")
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref32 = None if ref is None else ref.float()
        out, second, grads = run_op(op, "cpp", q32, k32, v32, ref32, tokens, head_mean, "both")
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out.double(), out64, **F32_VS_F64)
    torch.testing.assert_close(second.double(), second64, **F32_VS_F64)
    for grad, grad64 in zip(grads, grads64, strict=True):
        torch.testing.assert_close(grad.double(), grad64, **F32_VS_F64)


@pytest.fixture(params=["bf16", "float32"])
def products(request):
    """The matrix products bfloat16 inputs take: bf16 ones where the CPU has AVX512-BF16 (skipped elsewhere,
    where they are never picked), and the float32 ones that every other CPU runs."""
    if request.param == "bf16" and not cpp.bf16_products_available():
        pytest.skip("this CPU (or torch build) has no bfloat16 products")
    previous = cpp.use_bf16_products(request.param == "bf16")
    yield request.param
    cpp.use_bf16_products(previous)


# bfloat16 inputs against float64 on the same (bf16-valued) inputs. Every output and gradient element
# carries at most two roundings to bfloat16 (unit roundoff u = 2^-8): its own, and on the bf16 path that of
# one operand (P or scale * dS); q k^T and dO V^T are exact products summed in float32. So the error is
# within 2u of the result's scale, norm-wise and at the largest element. Maps and loss stay float32.
BF16_U = 2.0**-8


@pytest.mark.parametrize("d", [40, 80])
@pytest.mark.parametrize("tokens", [None, [0, 38, 38, 76]], ids=["all_tokens", "subset"])
@pytest.mark.parametrize("op", ["capture", "guided"])
def test_bfloat16_products_match_float64_within_rounding(products, op, tokens, d):
    """M = 301 (a full tile and an odd partial one: the padded row of dK's and dV's operands), N = 77 (odd:
    the padded column of P and dS; 64 + 13 packed columns), D = 40 or 80 (one packed block, or 64 + 16)."""
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in make_qkv(2, 3, 301, 77, d))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_map_with_margin(q64, k64, v64, tokens, False) if op == "guided" else None
    out64, second64, grads64 = run_op(op, "torch", q64, k64, v64, ref, tokens, False, "both")
    ref32 = None if ref is None else ref.float()
    out, second, grads = run_op(op, "cpp", q, k, v, ref32, tokens, False, "both")
    torch.testing.assert_close(second.double(), second64, **F32_VS_F64)
    for name, got, want in zip(["out", "dq", "dk", "dv"], [out, *grads], [out64, *grads64], strict=True):
        assert got.dtype == torch.bfloat16
        error = got.double() - want
        assert error.norm() <= 2 * BF16_U * want.norm(), name
        assert error.abs().max() <= 2 * BF16_U * want.abs().max(), name


@pytest.mark.parametrize("layout", ["odd_row_stride", "off_word_boundary"])
@pytest.mark.parametrize("op", ["capture", "guided"])
def test_bf16_packing_of_unaligned_keys_and_values_is_exact(op, layout):
    """k^T and v^T are packed as transposed 32-bit words where k and v rows lie on word boundaries, element
    by element otherwise; either way the packed operands hold the same bits, so the results are identical."""
    if not cpp.bf16_products_available():
        pytest.skip("this CPU (or torch build) has no bfloat16 products")
    b, h, m, n, d = 2, 3, 70, 77, 40
    q, k, v = (t.detach().bfloat16() for t in make_qkv(b, h, m, n, d))
    pad = 1 if layout == "odd_row_stride" else 2  # rows d + 1 elements apart, or from element 1 on
    views = []
    for t in (k, v):
        storage = torch.zeros(b, h, n, d + pad, dtype=torch.bfloat16)
        view = storage[..., pad - 1 : pad - 1 + d] if layout == "off_word_boundary" else storage[..., :d]
        view.copy_(t)
        views.append(view)
    assert views[0].stride(2) % 2 == 1 or views[0].storage_offset() % 2 == 1
    ref = None
    if op == "guided":
        ref = reference_map_with_margin(*(t.double() for t in (q, k, v)), None, False).float()
    want = run_op(op, "cpp", q.clone().requires_grad_(), k, v, ref, None, False, "both")
    got = run_op(op, "cpp", q.clone().requires_grad_(), *views, ref, None, False, "both")
    for x, y in zip(got[:2], want[:2], strict=True):
        assert torch.equal(x, y)
    assert torch.equal(got[2][0], want[2][0])


def test_bfloat16_with_an_odd_head_dim_stays_within_rounding(products):
    """The bf16 products read q k^T's K = D in pairs, so an odd D goes to the float32 ones under either
    setting."""
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in make_qkv(1, 2, 37, 77, 33))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, maps64, grads64 = run_op("capture", "torch", q64, k64, v64, None, None, False, "both")
    out, maps, grads = run_op("capture", "cpp", q, k, v, None, None, False, "both")
    torch.testing.assert_close(maps.double(), maps64, **F32_VS_F64)
    for got, want in zip([out, *grads], [out64, *grads64], strict=True):
        assert (got.double() - want).norm() <= 2 * BF16_U * want.norm()


def test_bf16_products_are_bitwise_identical_across_thread_counts():
    """Each tile's micro-kernel calls and partial sums are the same whatever thread runs them, so bf16
    results on that path are identical to the bit at 1 and 2 threads (ATen's GEMMs are not)."""
    if not cpp.bf16_products_available():
        pytest.skip("this CPU (or torch build) has no bfloat16 products")
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in make_qkv(2, 4, 300, 77, 40))
    ref = reference_map_with_margin(q, k, v, None, False).float()

    def run():
        out, loss = ops.guided_attention(q, k, v, ref, backend="cpp")
        _, maps = ops.capture_attention(q, k, v, head_mean=True, backend="cpp")
        grads = torch.autograd.grad(loss.sum() + out.float().sum() + maps.sum(), (q, k, v))
        return out, loss, maps, *grads

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = run()
        torch.set_num_threads(1)
        one = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(two, one, strict=True):
        assert torch.equal(a, b)


def _cpu_has_avx512_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "avx512_bf16" in cpuinfo.read_text().split()


def test_bf16_products_are_not_taken_while_onednn_is_off_and_the_setting_survives():
    """With torch's oneDNN off (as on a CPU without AVX512-BF16) the bf16 products are reported off and
    bf16 inputs take the float32 ones. The setting itself is kept: a caller that switches them off and
    restores the value it got back finds them on again once oneDNN is. Only a CPU without AVX512-BF16
    refuses them."""
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in make_qkv(1, 2, 37, 77, 40))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, maps64, grads64 = run_op("capture", "torch", q64, k64, v64, None, None, False, "both")
    has_bf16 = _cpu_has_avx512_bf16()
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        assert not cpp.bf16_products_available()
        assert cpp.use_bf16_products() is False
        out, maps, grads = run_op("capture", "cpp", q, k, v, None, None, False, "both")
        previous = cpp.use_bf16_products(False)
        assert previous is has_bf16  # the setting starts on exactly where the CPU has the products
        if has_bf16:
            assert cpp.use_bf16_products(previous) is False
            assert cpp.use_bf16_products() is False  # on, and still not in use while oneDNN is off
        else:
            with pytest.raises(RuntimeError, match="no AVX512-BF16"):
                cpp.use_bf16_products(True)
    finally:
        torch.backends.mkldnn.enabled = enabled
    assert cpp.use_bf16_products() is has_bf16
    torch.testing.assert_close(maps.double(), maps64, **F32_VS_F64)
    for got, want in zip([out, *grads], [out64, *grads64], strict=True):
        # Each element rounded once to bf16 (at most u of it) from a float32 result (1e-6 off, relatively).
        assert (got.double() - want).norm() <= 1.001 * BF16_U * want.norm()


def test_softmax_rows_underflow_to_zero_and_stay_normalized(simd):
    """Scores 1e4 apart: exp of the low ones is below float32's normal range and must come out 0
    (not garbage from the 2^n bit trick), while every row still sums to 1."""
    q, k, v = make_qkv(1, 2, 37, 77, 16, dtype=torch.float32)
    with torch.no_grad():
        _, maps = ops.capture_attention(q * 300, k, v, backend="cpp")
        _, expected = ops.capture_attention(q.double() * 300, k.double(), v.double(), backend="torch")
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    torch.testing.assert_close(maps.sum(-1), torch.ones_like(maps.sum(-1)), rtol=0, atol=1e-6)
    # Scores of a few hundred carry float32 rounding of ~|score| 2^-24 ~ 3e-5, which exp turns
    # into that relative error in P.
    torch.testing.assert_close(maps.double(), expected, rtol=2e-4, atol=1e-6)
    assert (expected < 1e-38).any() and (maps[expected < 1e-38] == 0).all()


def test_simd_level_refuses_unknown_and_unsupported_levels():
    with pytest.raises(ValueError, match="unknown SIMD level"):
        cpp.simd_level("sse9")
    if "avx512" not in cpp.simd_levels():
        with pytest.raises(RuntimeError, match="runs SIMD levels up to"):
            cpp.simd_level("avx512")


def test_backward_keeps_no_probabilities_alive():
    b, h, m, n, d = 2, 4, 512, 64, 8
    q, k, v = make_qkv(b, h, m, n, d, dtype=torch.float32)
    ref = torch.rand(b, h, m, 2)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    # The hooks see every tensor any autograd node saves, the C++ ones included.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = ops.guided_attention(q, k, v, ref, tokens=[0, 1], backend="cpp")
    assert loss.grad_fn is not None and len(saved) >= 3  # q, k, v (and ref, tokens) were saved
    assert max(t.numel() for t in saved) < b * h * m * n
    # What it keeps of P instead: two numbers per row, which the backward rebuilds P from.
    assert any(t.shape == (b, h, m, 2) for t in saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [None, [0, 38, 38, 76]], ids=["all_tokens", "subset"])
@pytest.mark.parametrize("head_mean", [False, True], ids=["per_head", "head_mean"])
def test_backward_rebuilds_the_forwards_probabilities_bitwise(simd, head_mean, tokens, dtype):
    """P rebuilt from the guided forward's row statistics is the P a full softmax recomputes, to the bit:
    every gradient is identical with and without them. M = 301: a full and a partial row tile."""
    q, k, v = (t.detach().to(dtype) for t in make_qkv(2, 3, 301, 77, 40))
    idx = None if tokens is None else torch.tensor(tokens)
    ref = reference_map_with_margin(*(t.double() for t in (q, k, v)), tokens, head_mean).to(compute_dtype(q))
    _, loss, stats = torch.ops.dreamblend_cpp.guided_attention(q, k, v, ref, idx, 0.3, head_mean)
    assert stats.shape == (2, 3, 301, 2) and stats.dtype == loss.dtype
    g = torch.Generator().manual_seed(3)
    d_out = torch.randn(q.shape, generator=g).to(dtype)
    d_loss = torch.rand(2, generator=g).to(loss.dtype) + 0.5
    args = (q, k, v, idx, d_out, None, ref, d_loss, 0.3, head_mean, True, True, True, 0, -1)
    rebuilt = torch.ops.dreamblend_cpp.attention_backward(*args, stats)
    recomputed = torch.ops.dreamblend_cpp.attention_backward(*args)
    for name, a, b in zip(["dq", "dk", "dv"], rebuilt, recomputed, strict=True):
        assert torch.equal(a, b), name


def test_backward_refuses_row_statistics_of_another_shape_or_dtype():
    q, k, v = (t.detach().float() for t in make_qkv(1, 2, 4, 7, 8))
    ref = torch.rand(1, 2, 4, 7)
    _, _, stats = torch.ops.dreamblend_cpp.guided_attention(q, k, v, ref, None, 0.3, False)
    args = (q, k, v, None, None, None, ref, torch.ones(1), 0.3, False, True, False, False, 0, -1)
    for bad in (stats[:, :1], stats.double()):
        with pytest.raises(RuntimeError, match=r"stats must be the \(B, H, M, 2\) Float row statistics"):
            torch.ops.dreamblend_cpp.attention_backward(*args, bad)


def test_ops_pass_torch_library_checks():
    """Schemas, fake kernels and autograd registration, as torch.compile relies on them."""
    q, k, v = make_qkv(2, 2, 9, 5, 8, dtype=torch.float32)
    tokens = torch.tensor([1, 1, 4])
    ref = torch.rand(2, 2, 9, 3)
    torch.library.opcheck(torch.ops.dreamblend_cpp.capture_attention, (q, k, v, tokens, 0.3, False))
    torch.library.opcheck(torch.ops.dreamblend_cpp.capture_attention, (q, k, v, tokens, 0.3, True, 1, 2))
    torch.library.opcheck(torch.ops.dreamblend_cpp.guided_attention, (q, k, v, ref, tokens, 0.3, False))
    # The backward op runs inside a backward pass, on inputs that carry no graph.
    q, k, v = (t.detach() for t in (q, k, v))
    d_out, d_maps = torch.randn(2, 2, 9, 8), torch.randn(2, 9, 3)
    torch.library.opcheck(
        torch.ops.dreamblend_cpp.attention_backward,
        (q, k, v, tokens, d_out, d_maps, None, None, 0.3, True, True, False, True),
    )


def test_op_checks_its_arguments():
    q, k, v = make_qkv(1, 2, 4, 7, 8)
    with pytest.raises(RuntimeError, match=r"ref has shape \[1, 4, 7\], expected \[1, 2, 4, 7\]"):
        torch.ops.dreamblend_cpp.guided_attention(
            q, k, v, torch.rand(1, 4, 7, dtype=q.dtype), None, 0.3, False
        )
    with pytest.raises(RuntimeError, match=r"token indices must lie in \[0, 7\)"):
        torch.ops.dreamblend_cpp.capture_attention(q, k, v, torch.tensor([7]), 0.3, False)


def test_dispatch_picks_cpp_on_cpu():
    assert "cpp" in ops.available_backends()
    assert ops.resolve_backend("auto", torch.device("cpu")) is cpp
    q, k, v = make_qkv(1, 2, 4, 7, 8)
    out, maps = ops.capture_attention(q, k, v, tokens=[1, -1], head_mean=True)
    out_r, maps_r = ops.capture_attention(q, k, v, tokens=[1, -1], head_mean=True, backend="torch")
    torch.testing.assert_close(out, out_r, **TOLERANCES[torch.float64])
    torch.testing.assert_close(maps, maps_r, **TOLERANCES[torch.float64])


def test_new_process_loads_the_cached_build_without_compiling():
    code = (
        "import sys, torch; from dreamblend import ops; from dreamblend.ops import cpp; "
        "assert 'torch.utils.cpp_extension' not in sys.modules; "
        "print(ops.resolve_backend('auto', torch.device('cpu')).__name__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "DREAMBLEND_BUILD_CPP"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "dreamblend.ops.cpp"


@pytest.mark.parametrize("op", ["capture", "guided"])
@pytest.mark.parametrize("tokens", [None, [0, 3, 3, -1]], ids=["all", "subset"])
def test_processor_layout_views_are_read_in_place(op, tokens):
    """q, k, v as diffusers hands them over: (B, H, M, D) views of (B, M, H * D) projections; out and
    dQ come back in (B, M, H, D) memory order, so the processor's reshape needs no copy."""
    b, h, m, n, d = 2, 3, 300, 9, 16
    g = torch.Generator().manual_seed(5)

    def heads(s):
        return torch.randn(b, s, h * d, generator=g, dtype=torch.float64).view(b, s, h, d).transpose(1, 2)

    q, k, v = heads(m).requires_grad_(), heads(n), heads(n)
    ref = reference_map_with_margin(q, k, v, tokens, False) if op == "guided" else None
    out, second, grads = run_op(op, "cpp", q, k, v, ref, tokens, False, "both")
    q_c, k_c, v_c = q.detach().contiguous().requires_grad_(), k.contiguous(), v.contiguous()
    out_r, second_r, grads_r = run_op(op, "torch", q_c, k_c, v_c, ref, tokens, False, "both")
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, out_r, **TOLERANCES[torch.float64])
    torch.testing.assert_close(second, second_r, **MAP_TOLERANCES[torch.float64])
    torch.testing.assert_close(grads[0], grads_r[0], **TOLERANCES[torch.float64])
