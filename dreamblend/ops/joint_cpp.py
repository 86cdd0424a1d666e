"""Joint (MMDiT) attention on CPU through the C++ cross-attention op (``dreamblend.ops.cpp``).

The default joint map (``text_softmax=False``) of an image query is its row of the softmax over all
``L`` keys, read at the text columns. That is exactly what the C++ cross-attention op computes for
queries ``q_img``, keys and values ``k = v = all L positions`` and tokens = the selected text
positions offset by the text block's start. So each contiguous run of image rows (one for FLUX,
text first, and SD3, text last; two when the text sits inside the sequence) goes through that op as
a strided view of ``q`` (no copy), the text-query rows through plain SDPA, and the output rows are
joined by one concatenation in ``(B, L, H, D)`` memory order, the order the processors reshape to.
Gradients come from the C++ op's registered autograd (P recomputed per row tile) and SDPA's.

``text_softmax=True`` renormalizes over the text keys, which the C++ op cannot express: it runs the
torch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dreamblend.ops import cpp, joint_reference


def _row_runs(length: int, text: tuple[int, int]) -> list[tuple[int, int, bool]]:
    """``(r0, r1, is_image)`` for the non-empty runs of query rows, in sequence order."""
    start, n_text = text
    runs = [(0, start, True), (start, start + n_text, False), (start + n_text, length, True)]
    return [run for run in runs if run[1] > run[0]]


def _columns(text: tuple[int, int], tokens: Tensor | None, device: torch.device) -> Tensor:
    """The selected text tokens as key positions of the joint sequence."""
    start, n_text = text
    if tokens is None:
        return torch.arange(start, start + n_text, device=device)
    return tokens + start


def _join(pieces: list[Tensor]) -> Tensor:
    """Output rows ``(B, H, rows, D)`` joined into one ``(B, H, L, D)`` view of ``(B, L, H, D)`` memory."""
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat([p.transpose(1, 2) for p in pieces], dim=1).transpose(1, 2)


def _text_rows(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    # Text queries' output only (their maps are not captured): plain attention over all L keys.
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def joint_capture_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    text: tuple[int, int],
    tokens: Tensor | None,
    head_mean: bool,
    text_softmax: bool,
) -> tuple[Tensor, Tensor]:
    if text_softmax:
        return joint_reference.joint_capture_attention(q, k, v, scale, text, tokens, head_mean, text_softmax)
    columns = _columns(text, tokens, q.device)
    pieces, maps = [], []
    for r0, r1, is_image in _row_runs(q.shape[2], text):
        rows = q[:, :, r0:r1]
        if is_image:
            out, run_maps = cpp.capture_attention(rows, k, v, scale, columns, head_mean)
            maps.append(run_maps)
        else:
            out = _text_rows(rows, k, v, scale)
        pieces.append(out)
    return _join(pieces), maps[0] if len(maps) == 1 else torch.cat(maps, dim=-2)


def joint_guided_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ref: Tensor,
    scale: float,
    text: tuple[int, int],
    tokens: Tensor | None,
    head_mean: bool,
    text_softmax: bool,
) -> tuple[Tensor, Tensor]:
    if text_softmax:
        return joint_reference.joint_guided_attention(
            q, k, v, ref, scale, text, tokens, head_mean, text_softmax
        )
    columns = _columns(text, tokens, q.device)
    pieces, losses = [], []
    image_row = 0  # first map row of the current image run
    for r0, r1, is_image in _row_runs(q.shape[2], text):
        rows = q[:, :, r0:r1]
        if is_image:
            run_ref = ref[..., image_row : image_row + r1 - r0, :]
            out, loss = cpp.guided_attention(rows, k, v, run_ref, scale, columns, head_mean)
            losses.append(loss)
            image_row += r1 - r0
        else:
            out = _text_rows(rows, k, v, scale)
        pieces.append(out)
    return _join(pieces), losses[0] if len(losses) == 1 else losses[0] + losses[1]
