"""Joint (MMDiT) attention on the C++ backend against the torch reference (itself checked against fp64
eager autograd in test_joint_reference.py): outputs, maps, losses and q/k/v gradients in both text
orders, token subsets, both map modes, processor-layout inputs, dispatch and the text-softmax fallback.

The extension is built once for the module (a cached build is a no-op); a failing build fails the
tests, only a machine without a C++ compiler skips them.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from dreamblend import ops
from dreamblend.ops import cpp, joint_cpp


@pytest.fixture(scope="module", autouse=True)
def extension():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler (c++ or $CXX) to build the extension with")
    try:
        return cpp.build()
    except Exception as exc:  # noqa: BLE001 - reported as a failure with the compiler's message
        pytest.fail(f"building the C++ extension failed: {exc}")


def joint_qkv(b, h, n_text, n_image, d, where, dtype=torch.float64, seed=0):
    """q, k, v ``(B, H, L, D)`` as views of ``(B, L, H, D)`` memory (the processors' layout), and the
    text block: first (FLUX), last (SD3) or inside the sequence."""
    g = torch.Generator().manual_seed(seed)
    length = n_text + n_image
    qkv = [
        torch.randn(b, length, h, d, generator=g, dtype=torch.float64)
        .to(dtype)
        .transpose(1, 2)
        .requires_grad_()
        for _ in "qkv"
    ]
    start = {"first": 0, "last": n_image, "inside": n_image // 3}[where]
    return qkv, (start, n_text)


def run(backend, q, k, v, text, tokens, head_mean, guided, seed=1):
    """The op's outputs and the q, k, v gradients of a random weighting of them (both outputs)."""
    g = torch.Generator().manual_seed(seed)
    if guided:
        shape = ops.joint.joint_map_shape(q, text, tokens, head_mean)
        ref = torch.rand(shape, generator=g, dtype=torch.float64) / text[1]
        out, second = ops.joint_guided_attention(
            q, k, v, ref, text=text, tokens=tokens, head_mean=head_mean, backend=backend
        )
    else:
        out, second = ops.joint_capture_attention(
            q, k, v, text=text, tokens=tokens, head_mean=head_mean, backend=backend
        )
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in (out, second)]
    objective = sum((t * w).sum() for t, w in zip((out, second), weights, strict=True))
    return (out, second, *torch.autograd.grad(objective, (q, k, v)))


CASES = [
    # B, H, text, image, D, text place; 300 image rows span two of the op's 256-row tiles
    (1, 1, 1, 1, 8, "first"),
    (2, 3, 7, 17, 16, "first"),
    (1, 2, 9, 30, 8, "last"),
    (2, 2, 12, 21, 16, "inside"),
    (1, 2, 5, 300, 8, "last"),
]


@pytest.mark.parametrize("guided", [False, True], ids=["capture", "guided"])
@pytest.mark.parametrize("head_mean", [False, True], ids=["per_head", "head_mean"])
@pytest.mark.parametrize("tokens", [None, [1, 0, 0, -1]], ids=["all_tokens", "subset"])
@pytest.mark.parametrize("b,h,n_text,n_image,d,where", CASES)
def test_matches_reference_in_fp64(b, h, n_text, n_image, d, where, tokens, head_mean, guided):
    if tokens is not None and n_text < 2:
        tokens = [0, 0, -1]  # repeats and a negative index still mean something with one text token
    qkv, text = joint_qkv(b, h, n_text, n_image, d, where)
    expected = run("torch", *qkv, text, tokens, head_mean, guided)
    got = run("cpp", *qkv, text, tokens, head_mean, guided)
    names = ("out", "loss" if guided else "maps", "dq", "dk", "dv")
    for name, e, g in zip(names, expected, got, strict=True):
        # fp64 on both sides: only the summation order differs
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_matches_fp64_reference(dtype):
    qkv, text = joint_qkv(2, 3, 7, 40, 16, "last", dtype=dtype)
    exact = run("torch", *[t.detach().double().requires_grad_() for t in qkv], text, None, False, True)
    got = run("cpp", *qkv, text, None, False, True)
    # Math runs in float32 for both dtypes; bf16 inputs and outputs carry 8 mantissa bits, so out and
    # the gradients are off by a few bf16 ulps of their O(1) values; the loss is summed in float32.
    out_tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    for name, e, g in zip(("out", "loss", "dq", "dk", "dv"), exact, got, strict=True):
        tol = 1e-5 if name == "loss" else out_tol
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


def test_output_rows_land_in_processor_memory_order():
    (q, k, v), text = joint_qkv(1, 3, 5, 20, 8, "first")
    out, _ = ops.joint_capture_attention(q, k, v, text=text, backend="cpp")
    # (B, H, L, D) view of (B, L, H, D) memory: the processors' transpose + reshape is then a view
    assert out.transpose(1, 2).is_contiguous()


def test_auto_picks_cpp_on_cpu(monkeypatch):
    calls = []
    original = cpp.capture_attention
    monkeypatch.setattr(cpp, "capture_attention", lambda *a: calls.append(1) or original(*a))
    (q, k, v), text = joint_qkv(1, 2, 4, 9, 8, "last")
    ops.joint_capture_attention(q, k, v, text=text)
    assert calls and ops.resolved_backend_name("auto", q) == "cpp"


@pytest.mark.parametrize("guided", [False, True], ids=["capture", "guided"])
def test_text_softmax_runs_the_reference(guided, monkeypatch):
    """The C++ op cannot renormalize over the text keys: text_softmax=True gives the reference's result
    without calling it."""
    monkeypatch.setattr(cpp, "capture_attention", None)
    monkeypatch.setattr(cpp, "guided_attention", None)
    (q, k, v), text = joint_qkv(1, 2, 4, 9, 8, "first")
    if guided:
        ref = torch.rand(1, 2, 9, 4, dtype=torch.float64)
        results = [
            joint_cpp.joint_guided_attention(q, k, v, ref, 0.3, text, None, False, True),
            ops.joint_guided_attention(
                q, k, v, ref, text=text, scale=0.3, text_softmax=True, backend="torch"
            ),
        ]
    else:
        results = [
            joint_cpp.joint_capture_attention(q, k, v, 0.3, text, None, False, True),
            ops.joint_capture_attention(q, k, v, text=text, scale=0.3, text_softmax=True, backend="torch"),
        ]
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
