"""Joint (MMDiT) attention that captures image-to-text maps, or scores them against a reference.

FLUX.1 and SD3.x run one self-attention over text and image tokens together: ``q, k, v`` are
``(B, H, L, D)`` with the text tokens in one block ``text = (start, length)`` of the ``L`` positions
(FLUX puts them first, ``(0, 512)``; diffusers' SD3 ``JointAttnProcessor2_0`` last,
``(L - 333, 333)`` for CLIP 77 + T5 256). The "cross-attention map" is the image-query x text-key
block of that softmax:

- ``text_softmax=False`` (default): ``A[m, t] = exp(s[m, t] - LSE_m)``, the log-sum-exp over **all**
  ``L`` keys, i.e. exactly the attention weight the layer gives text token ``t``. A row sums to the
  share of attention that goes to text (less than 1), so a word's map also drops when the image
  attends more to itself.
- ``text_softmax=True``: the softmax of image query ``m``'s scores over the text keys alone, which
  is the map some FLUX attention-map tools draw; each row sums to 1 over the text. It equals the
  default map divided by its row's text share ``sum_t A[m, t]``, and costs one more text-only
  log-sum-exp per row.

Maps cover every image query (every position outside the text block, in order) and the selected
text tokens (``tokens`` index the text block, default all of it): float32 ``(B, H, M_img, T)`` or
head-mean ``(B, M_img, T)``. The guidance loss is the per-sample L1 of DESIGN §2, as
``guided_attention``: ``mean_h sum_{m,t} |A - ref|`` per head, ``sum_{m,t}`` in head-mean mode.

Backends: ``"triton"`` (flash-style kernels, never a ``(B, H, L, L)`` tensor), ``"cpp"`` (CPU: the
C++ cross-attention op on the image rows, ``dreamblend.ops.joint_cpp``; ``text_softmax=True`` runs the
reference there), ``"torch"`` (the reference, chunked over queries) and ``"auto"`` (triton on CUDA,
cpp on CPU when built, else torch).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor

from dreamblend.ops import (
    TokenSpec,
    check_qkv,
    joint_reference,
    normalize_tokens,
    reference,
    resolve_backend,
    resolved_backend_name,
)

__all__ = ["joint_capture_attention", "joint_guided_attention", "joint_map_shape", "resolve_joint_backend"]


def _check_text(text: tuple[int, int], length: int) -> tuple[int, int]:
    try:
        start, n_text = (int(x) for x in text)
    except (TypeError, ValueError):
        raise TypeError(f"text must be a (start, length) pair of ints; got {text!r}") from None
    if n_text < 1 or start < 0 or start + n_text > length:
        raise ValueError(
            f"text block (start={start}, length={n_text}) does not fit the L={length} positions of q, k, v; "
            f"pass the text tokens' place in the concatenation, e.g. (0, N_text) when text comes first "
            f"(FLUX) or (L - N_text, N_text) when it comes last (SD3)"
        )
    if n_text == length:
        raise ValueError(f"text block covers all L={length} positions: there are no image queries to map")
    return start, n_text


def resolve_joint_backend(backend: str, q: Tensor) -> ModuleType:
    """The joint module for ``backend``; the cross-attention dispatcher's rules and errors decide which
    backend ``"auto"`` means and whether a named one runs on ``q``'s device.

    Its ``joint_capture_attention(q, k, v, scale, text, tokens, head_mean, text_softmax)`` and
    ``joint_guided_attention(q, k, v, ref, ...)`` skip this module's checks: for callers that already
    hold checked int64 token indices on q's device and a reference in the compute dtype (the MMDiT
    processors, through the store), where re-checking the indices would sync with the GPU per layer."""
    name = resolved_backend_name(backend, q)
    if name == "cpp":
        from dreamblend.ops import joint_cpp  # only where the C++ module loaded (it imports it)

        return joint_cpp
    return joint_reference if name == "torch" else resolve_backend(name, q)


def _prepare(q: Tensor, k: Tensor, v: Tensor, text, tokens: TokenSpec, scale: float | None):
    check_qkv(q, k, v)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"joint attention is self-attention over the text+image concatenation: q has L={q.shape[2]} "
            f"positions, k and v {k.shape[2]}; concatenate text and image tokens for q, k and v alike"
        )
    text = _check_text(text, q.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return text, normalize_tokens(tokens, text[1], q.device), scale


def joint_map_shape(q: Tensor, text: tuple[int, int], tokens: TokenSpec = None, head_mean: bool = False):
    """Shape of the maps (and of ``ref``) for these inputs: ``(B, M_img, T)`` or ``(B, H, M_img, T)``."""
    n_tokens = text[1] if tokens is None else torch.as_tensor(tokens).numel()
    return joint_reference.map_shape(q, text, n_tokens, head_mean)


def joint_capture_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    text: tuple[int, int],
    tokens: TokenSpec = None,
    scale: float | None = None,
    head_mean: bool = False,
    text_softmax: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Output ``(B, H, L, D)`` over all L queries (dtype of q) and float32 maps of the image queries x
    selected text keys, ``(B, M_img, T)`` head-mean or ``(B, H, M_img, T)``; differentiable in q, k, v."""
    text, idx, scale = _prepare(q, k, v, text, tokens, scale)
    module = resolve_joint_backend(backend, q)
    return module.joint_capture_attention(q, k, v, scale, text, idx, head_mean, text_softmax)


def joint_guided_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ref: Tensor,
    *,
    text: tuple[int, int],
    tokens: TokenSpec = None,
    scale: float | None = None,
    head_mean: bool = False,
    text_softmax: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Output and the float32 per-sample L1 distance ``(B,)`` of the maps to ``ref`` (shape of the maps)."""
    text, idx, scale = _prepare(q, k, v, text, tokens, scale)
    expected = joint_map_shape(q, text, idx, head_mean)
    if tuple(ref.shape) != expected:
        raise ValueError(
            f"reference map has shape {tuple(ref.shape)}, expected {expected} "
            f"({'head-mean' if head_mean else 'per-head'} maps of {expected[-2]} image queries x "
            f"{expected[-1]} text tokens); record it with the same text block, tokens, head_mean and batch"
        )
    ref = ref.to(device=q.device, dtype=reference.compute_dtype(q))
    module = resolve_joint_backend(backend, q)
    return module.joint_guided_attention(q, k, v, ref, scale, text, idx, head_mean, text_softmax)
