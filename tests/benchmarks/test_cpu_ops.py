"""The CPU op benchmark compares like with like: every implementation computes the same output, maps
and gradient on the processor's (B, H, L, D) views."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_cpu_ops
from dreamblend.ops import available_backends

pytestmark = pytest.mark.skipif("cpp" not in available_backends(), reason="the C++ extension is not built")
UNCOMPILED = [name for name in bench_cpu_ops.IMPLS if name not in ("compiled", "gemms")]


def test_implementations_agree() -> None:
    q, k, v, ref, d_out = bench_cpu_ops.make_problem(96, 3, 16, batch=2, dtype=torch.float64)
    scale = 16**-0.5
    capture = bench_cpu_ops.implementations("capture", scale)
    guided = bench_cpu_ops.implementations("guided", scale)
    out, maps = capture["torch"](q, k, v, ref, d_out)
    dq = guided["torch"](q, k, v, ref, d_out)
    for name in UNCOMPILED:
        got_out, got_maps = capture[name](q, k, v, ref, d_out)
        torch.testing.assert_close(got_out, out, msg=name)
        if got_maps is not None:
            torch.testing.assert_close(got_maps, maps, msg=name)
    for name in ("cpp", "eager", "sdpa_recompute"):  # sdpa alone has no map loss
        torch.testing.assert_close(guided[name](q, k, v, ref, d_out), dq, msg=name)


def test_train_pass_gradients_agree() -> None:
    """dQ, dK and dV of the out and map gradients, every implementation with maps against the torch
    reference (float64); sdpa, which has no maps, matches the reference's gradient of out alone."""
    q, k, v, ref, d_out = bench_cpu_ops.make_problem(96, 3, 16, batch=2, dtype=torch.float64)
    train = bench_cpu_ops.implementations("train", 16**-0.5)
    want = train["torch"](q, k, v, ref, d_out)
    for name in ("cpp", "eager", "sdpa_recompute"):
        for got, expected, grad in zip(train[name](q, k, v, ref, d_out), want, "qkv", strict=True):
            torch.testing.assert_close(got, expected, msg=f"{name} d{grad}")
    q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q, k, v))
    out, _ = bench_cpu_ops.implementations("capture", 16**-0.5)["torch"](q_, k_, v_, ref, d_out)
    out_only = torch.autograd.grad(out, (q_, k_, v_), d_out)
    for got, expected in zip(train["sdpa"](q, k, v, ref, d_out), out_only, strict=True):
        torch.testing.assert_close(got, expected)


def test_gemm_bound_returns_what_the_pass_returns() -> None:
    """``gemms`` is no attention (it is not compared above) but hands back tensors of the pass's shapes."""
    q, k, v, ref, d_out = bench_cpu_ops.make_problem(96, 3, 16, batch=2, dtype=torch.float32)
    out, maps = bench_cpu_ops.implementations("capture", 0.25)["gemms"](q, k, v, ref, d_out)
    assert out.shape == q.shape and maps is None
    assert bench_cpu_ops.implementations("guided", 0.25)["gemms"](q, k, v, ref, d_out).shape == q.shape
    dq, dk, dv = bench_cpu_ops.implementations("train", 0.25)["gemms"](q, k, v, ref, d_out)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_peak_bytes_measures_a_call() -> None:
    peak = bench_cpu_ops.peak_bytes(lambda: torch.ones(64, 2**20).sum(), ())
    assert peak is None or peak >= 0


def test_pass_flops_count_the_reference_products() -> None:
    """Capture: q k^T and P V; guided adds dO V^T and dS K, train also dS^T Q and P^T dO; 2 B H M N D
    FLOPs each (N = 77 tokens)."""
    one = 2 * 2 * 3 * 96 * 77 * 16
    assert bench_cpu_ops.pass_flops("capture", 96, 3, 16, batch=2) == 2 * one
    assert bench_cpu_ops.pass_flops("guided", 96, 3, 16, batch=2) == 4 * one
    assert bench_cpu_ops.pass_flops("train", 96, 3, 16, batch=2) == 6 * one


def test_matmul_peak_is_the_best_timed_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLOPs of the timed calls over the fastest timing: a clock that advances 1 s per reading except
    for one 0.5 s timing gives exactly twice the rate of the others."""
    m, k, n = 64, 32, 48
    monkeypatch.setattr(bench_cpu_ops, "PEAK_SHAPES", ((m, k, n),))
    readings = iter([0.0, 1.0, 10.0, 10.5, 20.0, 21.0])  # start, stop of three timings
    monkeypatch.setattr(bench_cpu_ops.time, "perf_counter", lambda: next(readings))
    calls = int(2e9 / (2 * m * k * n))
    peak = bench_cpu_ops.matmul_peak_gflops(torch.float32, repeats=3)
    assert peak == pytest.approx(2 * m * k * n * calls / 0.5 / 1e9)
