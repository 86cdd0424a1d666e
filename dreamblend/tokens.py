"""Learned token embeddings (textual inversion, AttnDreamBooth [V]) that differ between G and E.

G and E share one text encoder, but two checkpoints of one run can hold different vectors for the
same new token (an AttnDreamBooth stage-1 checkpoint against a later one). The text encoder keeps
one vector per token; :func:`token_embeddings` substitutes others at its input for the duration of
one prompt encoding, through a forward hook, so no weight is ever written or restored.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def substitute(input_ids: Tensor, output: Tensor, vectors: Mapping[int, Tensor]) -> Tensor:
    """``output`` (the input-embedding lookup of ``input_ids``) with each id's row replaced by its vector."""
    for token_id, vector in vectors.items():
        mask = (input_ids == token_id).unsqueeze(-1)
        output = torch.where(mask, vector.to(output.device, output.dtype), output)
    return output


def token_ids(tokenizer, embeddings: Mapping[str, Tensor], width: int) -> dict[int, Tensor]:
    """``{token id: vector}`` for ``{token: vector}``, checked against the tokenizer and the encoder width."""
    vectors = {}
    for token, vector in embeddings.items():
        ids = tokenizer(token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(
                f"token {token!r} is not one token of the tokenizer (it splits into {len(ids)}); load its "
                "embedding into the pipeline first (pipe.load_textual_inversion) so the token exists"
            )
        if vector.dim() == 2 and vector.shape[0] == 1:
            vector = vector[0]
        if vector.shape != (width,) or not vector.is_floating_point():
            raise ValueError(
                f"the embedding of {token!r} has shape {tuple(vector.shape)} ({vector.dtype}); this text "
                f"encoder takes one floating-point vector of width {width} per token"
            )
        if not torch.isfinite(vector).all():
            raise ValueError(f"the embedding of {token!r} has non-finite values")
        vectors[ids[0]] = vector
    return vectors


@contextmanager
def token_embeddings(
    tokenizer, text_encoder: nn.Module, embeddings: Mapping[str, Tensor] | None
) -> Iterator[None]:
    """Encode prompts with ``embeddings`` (``{token: vector}``) in place of the text encoder's rows."""
    if not embeddings:
        yield
        return
    table = text_encoder.get_input_embeddings()
    vectors = token_ids(tokenizer, embeddings, table.embedding_dim)
    handle = table.register_forward_hook(lambda _, inputs, output: substitute(inputs[0], output, vectors))
    try:
        yield
    finally:
        handle.remove()
