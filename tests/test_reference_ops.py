"""The op API on the torch reference backend against fp64 eager autograd, and its input checks."""

from __future__ import annotations

import gc

import pytest
import torch

from dreamblend import ops
from dreamblend.ops import reference


def eager(q, k, v, ref=None, tokens=None, head_mean=False, scale=None):
    """Materialized attention with plain autograd: the ground truth every backend is held to."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    maps = probs if tokens is None else probs[..., tokens]
    maps = maps.mean(1) if head_mean else maps
    out = probs @ v
    if ref is None:
        return out, maps
    diff = (maps - ref).abs()
    loss = diff.sum((1, 2)) if head_mean else diff.sum((2, 3)).mean(1)
    return out, loss


def make_qkv(b, h, m, n, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g, dtype=dtype).requires_grad_() for s in (m, n, n)]


CASES = [
    # B, H, M, N, D, tokens
    (1, 1, 1, 1, 8, None),
    (2, 3, 17, 7, 16, [1, 3, 3]),
    (3, 5, 63, 77, 40, [0, 5, -1]),
    (1, 8, 64, 154, 80, list(range(10))),
]


@pytest.mark.parametrize("head_mean", [False, True])
@pytest.mark.parametrize("b,h,m,n,d,tokens", CASES)
def test_capture_matches_eager_fp64(b, h, m, n, d, tokens, head_mean):
    q, k, v = make_qkv(b, h, m, n, d)
    out, maps = ops.capture_attention(q, k, v, tokens=tokens, head_mean=head_mean, backend="torch")
    out_e, maps_e = eager(q, k, v, tokens=tokens, head_mean=head_mean)
    torch.testing.assert_close(out, out_e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(maps, maps_e, rtol=1e-12, atol=1e-12)
    w_out, w_map = torch.randn_like(out), torch.randn_like(maps)
    grads = torch.autograd.grad((out * w_out).sum() + (maps * w_map).sum(), (q, k, v))
    grads_e = torch.autograd.grad((out_e * w_out).sum() + (maps_e * w_map).sum(), (q, k, v))
    for g, ge in zip(grads, grads_e, strict=True):
        torch.testing.assert_close(g, ge, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head_mean", [False, True])
@pytest.mark.parametrize("b,h,m,n,d,tokens", CASES)
def test_guided_matches_eager_fp64(b, h, m, n, d, tokens, head_mean):
    q, k, v = make_qkv(b, h, m, n, d)
    t = n if tokens is None else len(tokens)
    ref = torch.rand((b, m, t) if head_mean else (b, h, m, t), dtype=torch.float64) / n
    out, loss = ops.guided_attention(q, k, v, ref, tokens=tokens, head_mean=head_mean, backend="torch")
    out_e, loss_e = eager(q, k, v, ref, tokens=tokens, head_mean=head_mean)
    assert loss.shape == (b,)
    torch.testing.assert_close(loss, loss_e, rtol=1e-12, atol=1e-12)
    w_out, w_loss = torch.randn_like(out), torch.rand(b, dtype=torch.float64)
    grads = torch.autograd.grad((out * w_out).sum() + (loss * w_loss).sum(), (q, k, v))
    grads_e = torch.autograd.grad((out_e * w_out).sum() + (loss_e * w_loss).sum(), (q, k, v))
    for g, ge in zip(grads, grads_e, strict=True):
        torch.testing.assert_close(g, ge, rtol=1e-10, atol=1e-12)


def test_loss_only_gradient_and_dq_only():
    """Guidance differentiates the loss alone and needs only dQ (k, v frozen text features)."""
    q, k, v = make_qkv(2, 4, 9, 5, 8)
    k, v = k.detach(), v.detach()
    ref = torch.rand(2, 4, 9, 5, dtype=torch.float64)
    _, loss = ops.guided_attention(q, k, v, ref, backend="torch")
    (dq,) = torch.autograd.grad(loss.sum(), q)
    _, loss_e = eager(q, k, v, ref)
    (dq_e,) = torch.autograd.grad(loss_e.sum(), q)
    torch.testing.assert_close(dq, dq_e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_low_precision_inputs_compute_in_float32(dtype, tol):
    q, k, v = make_qkv(2, 2, 16, 7, 16, dtype=dtype)
    out, maps = ops.capture_attention(q, k, v, backend="torch")
    assert out.dtype == dtype and maps.dtype == torch.float32
    out_e, maps_e = eager(*(t.detach().double() for t in (q, k, v)))
    torch.testing.assert_close(maps.double(), maps_e, rtol=0, atol=tol)
    torch.testing.assert_close(out.double(), out_e, rtol=tol * 10, atol=tol * 10)
    out.float().sum().backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad).all()


def test_backward_keeps_no_probabilities_alive():
    """Only q, k, v (+ref, tokens) are saved: no (B, H, M, N) tensor lives between fwd and bwd."""
    b, h, m, n, d = 2, 4, 512, 64, 8  # probs would be 2*4*512*64 elements; q is 2*4*512*8
    q, k, v = make_qkv(b, h, m, n, d, dtype=torch.float32)
    ref = torch.rand(b, h, m, 2)
    _, loss = ops.guided_attention(q, k, v, ref, tokens=[0, 1], backend="torch")
    gc.collect()
    saved = [t for t in loss.grad_fn.saved_tensors if t is not None]
    assert max(t.numel() for t in saved) < b * h * m * n
    assert {t.data_ptr() for t in saved} >= {q.data_ptr(), k.data_ptr(), v.data_ptr()}


def test_default_scale_and_explicit_scale():
    q, k, v = make_qkv(1, 2, 5, 3, 16)
    _, maps = ops.capture_attention(q, k, v, scale=0.5, backend="torch")
    _, maps_e = eager(q, k, v, scale=0.5)
    torch.testing.assert_close(maps, maps_e)


def test_auto_backend_on_cpu_is_cpp_or_torch():
    module = ops.resolve_backend("auto", torch.device("cpu"))
    assert module.__name__ in {"dreamblend.ops.reference", "dreamblend.ops.cpp"}
    assert "torch" in ops.available_backends()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(tokens=[0, 7]), "token index \\[7\\] out of range.*N=7"),
        (dict(tokens=[-8]), "out of range"),
        (dict(tokens=[]), "tokens is empty"),
        (dict(backend="cuda"), "unknown backend"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, match):
    q, k, v = make_qkv(1, 2, 4, 7, 8)
    with pytest.raises(ValueError, match=match):
        ops.capture_attention(q, k, v, **kwargs)


def test_shape_and_dtype_errors():
    q, k, v = make_qkv(1, 2, 4, 7, 8)
    with pytest.raises(ValueError, match="share B, H and D"):
        ops.capture_attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match=r"expected q \(B, H, M, D\)"):
        ops.capture_attention(q[0], k, v)
    with pytest.raises(TypeError, match="one floating dtype"):
        ops.capture_attention(q.float(), k, v)
    with pytest.raises(ValueError, match="reference map has shape .* expected \\(1, 2, 4, 7\\)"):
        ops.guided_attention(q, k, v, torch.rand(1, 4, 7))


def test_triton_backend_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setattr(ops, "_TRITON_INTERPRET", False)
    q, k, v = make_qkv(1, 1, 4, 4, 16)
    with pytest.raises(RuntimeError, match="backend 'triton'"):
        ops.capture_attention(q, k, v, backend="triton")


def test_reference_probs_are_a_softmax():
    q, k, _ = make_qkv(2, 3, 6, 5, 8)
    probs = reference.attention_probs(q, k, 0.3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 6, dtype=torch.float64))
