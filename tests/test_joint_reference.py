"""Joint (MMDiT) attention maps on the torch reference against fp64 eager autograd over an explicit
softmax of the concatenated keys, in FLUX's order (text first) and SD3's (text last), and the checks."""

from __future__ import annotations

import pytest
import torch

from dreamblend import ops
from dreamblend.ops import joint_reference


def eager(q, k, v, text, tokens=None, head_mean=False, text_softmax=False, ref=None):
    """Materialized joint attention with plain autograd: the ground truth."""
    start, n_text = text
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores, dim=-1)
    image = [i for i in range(q.shape[2]) if not start <= i < start + n_text]
    block = scores if text_softmax else probs
    maps = block[:, :, image, start : start + n_text]
    maps = torch.softmax(maps, dim=-1) if text_softmax else maps
    maps = maps if tokens is None else maps[..., tokens]
    maps = maps.mean(1) if head_mean else maps
    out = probs @ v
    if ref is None:
        return out, maps
    diff = (maps - ref).abs()
    return out, diff.sum((1, 2)) if head_mean else diff.sum((2, 3)).mean(1)


def joint_qkv(b, h, n_text, n_image, d, text_first, seed=0):
    """q, k, v as an MMDiT layer builds them: text and image projections concatenated along L."""
    g = torch.Generator().manual_seed(seed)
    parts = [
        [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for n in (n_text, n_image)] for _ in "qkv"
    ]
    qkv = [torch.cat(p if text_first else p[::-1], dim=2).requires_grad_() for p in parts]
    return qkv, ((0, n_text) if text_first else (n_image, n_text))


CASES = [
    # B, H, text, image, D, text first (FLUX) or last (SD3), tokens within the text block
    (1, 1, 1, 1, 8, True, None),
    (2, 3, 7, 17, 16, True, [1, 3, 3]),
    (1, 2, 9, 30, 8, False, [0, -1, 4]),
    (2, 4, 12, 21, 16, False, None),
]


@pytest.fixture(params=[None, 3], ids=["one_chunk", "chunk_rows_3"])
def chunk_rows(request, monkeypatch):
    """Small chunks split the queries into many pieces, some straddling the text block's edges."""
    if request.param is not None:
        monkeypatch.setattr(joint_reference, "query_chunk_rows", lambda q: request.param)
    return request.param


@pytest.mark.parametrize("text_softmax", [False, True])
@pytest.mark.parametrize("head_mean", [False, True])
@pytest.mark.parametrize("b,h,n_text,n_image,d,text_first,tokens", CASES)
def test_capture_matches_eager_fp64(
    b, h, n_text, n_image, d, text_first, tokens, head_mean, text_softmax, chunk_rows
):
    (q, k, v), text = joint_qkv(b, h, n_text, n_image, d, text_first)
    kw = dict(text=text, tokens=tokens, head_mean=head_mean, text_softmax=text_softmax)
    out, maps = ops.joint_capture_attention(q, k, v, backend="torch", **kw)
    out_e, maps_e = eager(q, k, v, text, tokens, head_mean, text_softmax)
    assert maps.shape == ops.joint.joint_map_shape(q, text, tokens, head_mean)
    torch.testing.assert_close(out, out_e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(maps, maps_e, rtol=1e-12, atol=1e-12)
    w_out, w_map = torch.randn_like(out), torch.randn_like(maps)
    grads = torch.autograd.grad((out * w_out).sum() + (maps * w_map).sum(), (q, k, v))
    grads_e = torch.autograd.grad((out_e * w_out).sum() + (maps_e * w_map).sum(), (q, k, v))
    for g, ge in zip(grads, grads_e, strict=True):
        torch.testing.assert_close(g, ge, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("text_softmax", [False, True])
@pytest.mark.parametrize("head_mean", [False, True])
@pytest.mark.parametrize("b,h,n_text,n_image,d,text_first,tokens", CASES)
def test_guided_matches_eager_fp64(
    b, h, n_text, n_image, d, text_first, tokens, head_mean, text_softmax, chunk_rows
):
    (q, k, v), text = joint_qkv(b, h, n_text, n_image, d, text_first)
    kw = dict(text=text, tokens=tokens, head_mean=head_mean, text_softmax=text_softmax)
    ref = torch.rand(ops.joint.joint_map_shape(q, text, tokens, head_mean), dtype=torch.float64) * 0.2
    out, loss = ops.joint_guided_attention(q, k, v, ref, backend="torch", **kw)
    out_e, loss_e = eager(q, k, v, text, tokens, head_mean, text_softmax, ref)
    torch.testing.assert_close(out, out_e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, loss_e, rtol=1e-12, atol=1e-12)
    w_out, w_loss = torch.randn_like(out), torch.randn_like(loss)
    grads = torch.autograd.grad((out * w_out).sum() + (loss * w_loss).sum(), (q, k, v))
    grads_e = torch.autograd.grad((out_e * w_out).sum() + (loss_e * w_loss).sum(), (q, k, v))
    for g, ge in zip(grads, grads_e, strict=True):
        torch.testing.assert_close(g, ge, rtol=1e-10, atol=1e-12)


def test_loss_reduction_matches_cross_attention_guidance():
    """Same L1 as guided_attention: with an all-text softmax the joint maps are cross-attention maps."""
    (q, k, v), text = joint_qkv(2, 3, 5, 11, 8, text_first=True)
    ref = torch.rand(2, 3, 11, 2, dtype=torch.float64)
    _, loss = ops.joint_guided_attention(
        q, k, v, ref, text=text, tokens=[4, 0], text_softmax=True, backend="torch"
    )
    image = slice(5, None)
    _, cross = ops.guided_attention(
        q[:, :, image], k[:, :, :5], v[:, :, :5], ref, tokens=[4, 0], backend="torch"
    )
    torch.testing.assert_close(loss, cross, rtol=1e-12, atol=1e-12)


def test_text_softmax_is_the_joint_map_renormalized_over_text():
    (q, k, v), text = joint_qkv(1, 2, 6, 10, 8, text_first=False)
    _, joint = ops.joint_capture_attention(q, k, v, text=text, backend="torch")
    _, text_only = ops.joint_capture_attention(q, k, v, text=text, text_softmax=True, backend="torch")
    torch.testing.assert_close(text_only, joint / joint.sum(-1, keepdim=True), rtol=1e-12, atol=1e-12)


def test_auto_on_cpu_without_the_cpp_extension_is_the_reference(monkeypatch):
    monkeypatch.setitem(ops._BACKENDS, "cpp", ImportError("not built"))
    (q, k, v), text = joint_qkv(1, 2, 3, 5, 8, text_first=True)
    out, maps = ops.joint_capture_attention(q, k, v, text=text)
    out_r, maps_r = ops.joint_capture_attention(q, k, v, text=text, backend="torch")
    assert torch.equal(out, out_r) and torch.equal(maps, maps_r)


def test_float32_maps_for_half_inputs():
    (q, k, v), text = joint_qkv(1, 2, 3, 5, 8, text_first=True)
    out, maps = ops.joint_capture_attention(
        *(t.detach().half() for t in (q, k, v)), text=text, backend="torch"
    )
    assert out.dtype == torch.float16 and maps.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(text=(6, 3)), ValueError, "does not fit"),
        (dict(text=(-1, 3)), ValueError, "does not fit"),
        (dict(text=(0, 0)), ValueError, "does not fit"),
        (dict(text=(0, 8)), ValueError, "no image queries"),
        (dict(text=3), TypeError, "start, length"),
        (dict(text=(0, 3), tokens=[3]), ValueError, "out of range"),
        (dict(text=(0, 3), backend="nope"), ValueError, "unknown backend"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    with pytest.raises(error, match=match):
        ops.joint_capture_attention(q, k, v, **kwargs)


def test_key_length_must_equal_query_length():
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="concatenation"):
        ops.joint_capture_attention(q, k, k, text=(0, 3))


def test_reference_map_shape_is_checked():
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    with pytest.raises(ValueError, match=r"expected \(1, 5, 2\)"):
        ops.joint_guided_attention(
            q, k, v, torch.zeros(1, 2, 5, 2), text=(3, 3), tokens=[0, 1], head_mean=True
        )


def test_text_block_inside_one_chunk(monkeypatch):
    """A text block in the middle of a chunk leaves image rows on both sides of it in that chunk."""
    monkeypatch.setattr(joint_reference, "query_chunk_rows", lambda q: 8)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 20, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in "qkv")
    for text_softmax in (False, True):
        kw = dict(text=(10, 3), tokens=[2, 0], head_mean=True, text_softmax=text_softmax)
        out, maps = ops.joint_capture_attention(q, k, v, backend="torch", **kw)
        out_e, maps_e = eager(q, k, v, (10, 3), [2, 0], True, text_softmax)
        torch.testing.assert_close(maps, maps_e, rtol=1e-12, atol=1e-12)
        w = torch.randn_like(maps)
        grads = torch.autograd.grad((maps * w).sum() + out.sum(), (q, k, v))
        grads_e = torch.autograd.grad((maps_e * w).sum() + out_e.sum(), (q, k, v))
        for g_, ge in zip(grads, grads_e, strict=True):
            torch.testing.assert_close(g_, ge, rtol=1e-10, atol=1e-12)
