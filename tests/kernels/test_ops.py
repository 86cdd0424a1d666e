"""The registered ops around the kernels: dispatcher routing, determinism, layouts, autograd
plumbing (stride-0 and missing gradients), the multi-block dK/dV reduction, and launch configs."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import Case, assert_close, check_case

import dreamblend.ops as ops
from dreamblend.kernels import backend as kernels
from dreamblend.kernels import config, launch
from dreamblend.ops import reference


def _qkv(device, b=2, h=3, m=70, n=20, d=40, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(b, h, m, d), (b, h, n, d), (b, h, n, d)]
    return [torch.randn(s, generator=gen).to(dtype).to(device).requires_grad_() for s in shapes]


def _outputs_and_grads(device, op: str, head_mean: bool) -> list[torch.Tensor]:
    q, k, v = _qkv(device, m=70, n=77)  # several query blocks in the forward and the backward
    tokens = torch.tensor([4, 76, 4], device=device)
    if op == "capture":
        out, aux = kernels.capture_attention(q, k, v, 0.15, tokens, head_mean)
    else:
        shape = (2, 70, 3) if head_mean else (2, 3, 70, 3)
        ref = torch.rand(shape, generator=torch.Generator().manual_seed(1)).to(device) * 0.05
        out, aux = kernels.guided_attention(q, k, v, ref, 0.15, tokens, head_mean)
    g = torch.Generator().manual_seed(2)
    ((out * torch.randn(out.shape, generator=g).to(device)).sum() + (aux * aux.detach()).sum()).backward()
    return [out, aux, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("head_mean", [False, True], ids=["heads", "mean"])
@pytest.mark.parametrize("op", ["capture", "guided"])
def test_two_runs_are_bitwise_equal(op: str, head_mean: bool, device: torch.device) -> None:
    first = _outputs_and_grads(device, op, head_mean)
    second = _outputs_and_grads(device, op, head_mean)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_dispatcher_runs_the_kernels(device: torch.device) -> None:
    assert ops.resolve_backend("triton", device) is kernels
    q, k, v = _qkv(device)
    out, maps = ops.capture_attention(q, k, v, tokens=[3, -1, 3], head_mean=True, backend="triton")
    out_ref, maps_ref = ops.capture_attention(q, k, v, tokens=[3, -1, 3], head_mean=True, backend="torch")
    assert_close(out, out_ref.double(), torch.float32, "out")
    assert_close(maps, maps_ref.double(), torch.float32, "maps")
    ref = maps_ref.detach() + 0.01
    _, loss = ops.guided_attention(q, k, v, ref, tokens=[3, -1, 3], head_mean=True, backend="triton")
    (grad,) = torch.autograd.grad(loss.sum(), q)
    _, loss_ref = ops.guided_attention(q, k, v, ref, tokens=[3, -1, 3], head_mean=True, backend="torch")
    (grad_ref,) = torch.autograd.grad(loss_ref.sum(), q)
    assert_close(loss, loss_ref.double(), torch.float32, "loss")
    assert_close(grad, grad_ref.double(), torch.float32, "dq")


def test_dkv_partials_accumulate_across_query_blocks(monkeypatch: pytest.MonkeyPatch, device) -> None:
    """With fewer programs than query blocks, each program adds several blocks into its partial."""
    monkeypatch.setattr(launch, "backward_programs", lambda m, bm, bh, need: min(-(-m // bm), 2))
    case = Case(2, 2, 150, 77, 40, (5, 0, 5), False, torch.float32)
    check_case(case, device, "capture")
    check_case(Case(1, 3, 100, 20, 64, None, True, torch.float16, "transposed"), device, "guided")


def test_output_keeps_the_query_layout(device: torch.device) -> None:
    """A (B, M, H, D) query (diffusers' layout) gets an out in the same memory order, no copy back."""
    q = torch.randn(2, 50, 4, 32, device=device).transpose(1, 2)
    k, v = (torch.randn(2, 4, 10, 32, device=device) for _ in range(2))
    out, _ = kernels.capture_attention(q, k, v, 0.2, None, False)
    assert out.stride() == q.stride()
    out_ref, _ = reference.capture_attention(q, k, v, 0.2, None, False)
    assert_close(out, out_ref.double(), torch.float32, "out")


def test_no_grad_and_partial_requires_grad(device: torch.device) -> None:
    q, k, v = (t.detach() for t in _qkv(device))
    with torch.no_grad():
        out, maps = kernels.capture_attention(q, k, v, 0.2, None, False)
    assert not out.requires_grad and maps.shape == (2, 3, 70, 20)
    v.requires_grad_()  # only v: the maps do not depend on it
    out, maps = kernels.capture_attention(q, k, v, 0.2, None, False)
    (grad,) = torch.autograd.grad(maps.sum() + out.sum(), v)
    out_ref, maps_ref = reference.capture_attention(q, k, v, 0.2, None, False)
    (grad_ref,) = torch.autograd.grad(maps_ref.sum() + out_ref.sum(), v)
    assert_close(grad, grad_ref.double(), torch.float32, "dv")


def test_maps_gradient_alone_leaves_dv_zero(device: torch.device) -> None:
    q, k, v = _qkv(device)
    _, maps = kernels.capture_attention(q, k, v, 0.2, None, False)
    maps.sum().backward()
    assert torch.count_nonzero(v.grad) == 0 and q.grad is not None


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "INTERPRETED", False)
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        launch.attention_forward(q, q, q, None, None, 0.1, False, store_out=True, store_maps=True)


@pytest.mark.skipif(not launch.INTERPRETED, reason="only the interpreter mishandles bfloat16")
def test_interpreter_refuses_bfloat16() -> None:
    q = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels.capture_attention(q, q, q, 0.1, None, False)


def test_ops_are_registered() -> None:
    for name in ("triton_capture_attention", "triton_guided_attention", "triton_attention_backward"):
        assert hasattr(torch.ops.dreamblend, name)
    assert kernels.AVAILABLE and kernels.UNAVAILABLE_REASON == ""


def test_select_config_is_a_pure_function_of_shape() -> None:
    cfg = config.select_config("forward", 40, 77, None)
    assert (cfg.n_pad, cfg.t_pad, cfg.block_d) == (128, 128, 64)
    assert config.select_config("backward", 160, 154, 3).t_pad == 16
    assert config.select_config("forward", 160, 77, 5) == config.select_config("forward", 160, 77, 5)
    assert not config.supports(torch.float16, 64, 257, None)
    assert not config.supports(torch.float16, 64, 256, 64)  # selection matrix over the budget
    assert config.supports(torch.bfloat16, 256, 256, 32)
    assert config.backward_programs(4096, 32, 16, need_dkv=False) == 128
    assert config.backward_programs(4096, 32, 16, need_dkv=True) == 32
