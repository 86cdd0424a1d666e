"""The public op API: cross-attention that captures maps, or scores them against a reference.

Shapes follow DESIGN §2: ``q (B, H, M, D)``, ``k, v (B, H, N, D)``. Maps are float32
``(B, H, M, T)`` or head-mean ``(B, M, T)`` for ``T`` selected tokens (all ``N`` by default).
Three backends implement the same contract and are chosen per call:

- ``"triton"``: fused kernels (``dreamblend.kernels.backend``); CUDA tensors, or CPU under TRITON_INTERPRET=1;
- ``"cpp"``: the C++ CPU extension, when it was built;
- ``"torch"``: the reference, always available.

``"auto"`` takes triton on CUDA, cpp on CPU when built, else torch. A backend may also offer
``capture_rows(q, k, v, scale, tokens, head_mean, start, stop)``: every row's output with maps of the
batch rows ``[start, stop)`` only (the C++ one does); the processor uses it for classifier-free-guidance
batches and otherwise joins a capture of those rows with plain attention on the rest.

Joint (MMDiT) attention, text and image tokens in one softmax, has its own pair of ops:
``joint_capture_attention`` and ``joint_guided_attention`` (``dreamblend.ops.joint``).
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from dreamblend.ops import reference

__all__ = [
    "BACKENDS",
    "available_backends",
    "capture_attention",
    "guided_attention",
    "joint_capture_attention",
    "joint_guided_attention",
    "register_backend",
    "resolve_backend",
    "resolved_backend_name",
]

BACKENDS = ("auto", "triton", "cpp", "torch")
TokenSpec = Sequence[int] | Tensor | None


def _import_backend(module_name: str) -> ModuleType | Exception:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - reported to whoever asks for this backend
        return exc
    if not getattr(module, "AVAILABLE", True):
        return ImportError(getattr(module, "UNAVAILABLE_REASON", f"{module_name} is not available"))
    return module


# Imported once, up front: resolving a backend inside a traced (torch.compile) region must be
# plain lookups, and TRITON_INTERPRET is read by triton at import time anyway.
_BACKENDS: dict[str, ModuleType | Exception] = {
    "torch": reference,
    "triton": _import_backend("dreamblend.kernels.backend"),
    "cpp": _import_backend("dreamblend.ops.cpp"),
}
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def register_backend(name: str, module: ModuleType) -> None:
    """Make ``module`` serve backend ``name`` (e.g. once the C++ extension has been built)."""
    if name not in BACKENDS or name in ("auto", "torch"):
        raise ValueError(f"cannot register backend {name!r}; registrable: 'triton', 'cpp'")
    _BACKENDS[name] = module


def available_backends() -> list[str]:
    """Backends that loaded here (triton runs on CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    return [name for name, module in _BACKENDS.items() if not isinstance(module, Exception)]


def resolve_backend(backend: str, device: torch.device | Tensor) -> ModuleType:
    """The module that implements ``backend`` for tensors on ``device``; clear errors otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    is_cuda = device.is_cuda if isinstance(device, Tensor) else torch.device(device).type == "cuda"
    if backend == "auto":
        preferred = _BACKENDS["triton" if is_cuda else "cpp"]
        return reference if isinstance(preferred, Exception) else preferred
    module = _BACKENDS[backend]
    if isinstance(module, Exception):
        raise RuntimeError(f"backend {backend!r} is unavailable: {module}. Use backend='torch' or 'auto'.")
    if backend == "triton" and not (is_cuda or _TRITON_INTERPRET):
        raise RuntimeError(
            "backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU debugging); "
            "use backend='auto' to pick the best backend for the device"
        )
    if backend == "cpp" and is_cuda:
        raise RuntimeError("backend 'cpp' runs on CPU tensors only; use backend='auto' or 'triton' on CUDA")
    return module


def resolved_backend_name(backend: str, device: torch.device | Tensor) -> str:
    """The name ("triton", "cpp" or "torch") of the backend ``backend`` resolves to on ``device``."""
    module = resolve_backend(backend, device)
    return next(name for name, loaded in _BACKENDS.items() if loaded is module)


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Shapes and dtypes the backends accept (host-side checks only)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"expected q (B, H, M, D) and k, v (B, H, N, D); got q{tuple(q.shape)}, "
            f"k{tuple(k.shape)}, v{tuple(v.shape)}"
        )
    b, h, _, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[-1] != d:
        raise ValueError(
            f"q{tuple(q.shape)}, k{tuple(k.shape)} and v{tuple(v.shape)} must share B, H and D, "
            "and k and v must have the same shape"
        )
    if k.shape[2] == 0 or q.shape[2] == 0:
        raise ValueError("attention needs at least one query and one key position")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def normalize_tokens(tokens: TokenSpec, n: int, device: torch.device) -> Tensor | None:
    """Token indices as an int64 tensor on ``device`` (negatives wrap), or None for all ``n``."""
    if tokens is None:
        return None
    idx = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if idx.numel() == 0:
        raise ValueError("tokens is empty; pass None to capture every token")
    bad = idx[(idx >= n) | (idx < -n)]
    if bad.numel():
        raise ValueError(
            f"token index {bad.tolist()} out of range for a text sequence of N={n} tokens; "
            f"pick indices in [0, {n}) (e.g. from the tokenizer's ids for the prompt)"
        )
    return torch.where(idx < 0, idx + n, idx).to(device)


def map_shape(q: Tensor, n_tokens: int, head_mean: bool) -> tuple[int, ...]:
    b, h, m, _ = q.shape
    return (b, m, n_tokens) if head_mean else (b, h, m, n_tokens)


def _prepare(q, k, v, scale, tokens):
    check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return scale, normalize_tokens(tokens, k.shape[2], q.device)


def capture_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    tokens: TokenSpec = None,
    head_mean: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Attention output (dtype of ``q``) and float32 maps; differentiable w.r.t. q, k, v."""
    scale, idx = _prepare(q, k, v, scale, tokens)
    return resolve_backend(backend, q).capture_attention(q, k, v, scale, idx, head_mean)


def guided_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ref: Tensor,
    *,
    scale: float | None = None,
    tokens: TokenSpec = None,
    head_mean: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Attention output and the float32 per-sample L1 distance ``(B,)`` of its maps to ``ref``."""
    scale, idx = _prepare(q, k, v, scale, tokens)
    expected = map_shape(q, k.shape[2] if idx is None else idx.numel(), head_mean)
    if tuple(ref.shape) != expected:
        raise ValueError(
            f"reference map has shape {tuple(ref.shape)}, expected {expected} "
            f"({'head-mean' if head_mean else 'per-head'} maps for {expected[-1]} tokens); "
            "record it with the same tokens, head_mean and batch"
        )
    ref = ref.to(device=q.device, dtype=reference.compute_dtype(q))
    return resolve_backend(backend, q).guided_attention(q, k, v, ref, scale, idx, head_mean)


# Re-exported last: joint.py builds on the helpers above.
from dreamblend.ops.joint import joint_capture_attention, joint_guided_attention  # noqa: E402
