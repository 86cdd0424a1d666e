"""Prompt tokens: words to map positions, and learned token embeddings that differ between G and E.

Users name the words whose attention they want ("sks", "dog"); maps are indexed by token position.
:func:`resolve_tokens` turns words into positions where the tokenizer and the prompt are both known
(the pipeline call), so word and index selections give the same maps.

G and E share one text encoder, but two checkpoints of one run can hold different vectors for the
same new token (an AttnDreamBooth stage-1 checkpoint against a later one). The text encoder keeps
one vector per token; :func:`token_embeddings` substitutes others at its input for the duration of
one prompt encoding, through a forward hook, so no weight is ever written or restored.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

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


# ---------------------------------------------------------------------------------------------- words

END_OF_WORD = "</w>"  # CLIP's BPE ends a word's last piece with it
TokenSelection = Sequence[int | str]


@dataclass(frozen=True)
class PromptWord:
    """One word of a tokenized prompt: its text, token ids and positions (the start token is 0)."""

    text: str
    ids: tuple[int, ...]
    positions: tuple[int, ...]


def prompt_words(tokenizer, prompt: str) -> list[PromptWord]:
    """The words of ``prompt`` as the text encoder sees it (cut at the tokenizer's maximum length).

    A word ends at a CLIP piece ending in ``</w>``; an added token (a learned ``<new1>``) is a word of
    its own. Special tokens (start, end, padding) belong to no word.
    """
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.get_added_vocab().values()) - special
    words: list[PromptWord] = []
    current: list[int] = []

    def close() -> None:
        if current:
            word_ids = tuple(ids[p] for p in current)
            words.append(PromptWord(tokenizer.decode(list(word_ids)).strip(), word_ids, tuple(current)))
            current.clear()

    for position, (token_id, piece) in enumerate(zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True)):
        if token_id in special or token_id in added:
            close()
        if token_id in special:
            continue
        current.append(position)
        if token_id in added or piece.endswith(END_OF_WORD):
            close()
    close()
    return words


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Token positions of every occurrence of ``word`` (one word or a phrase) in ``prompt``.

    A word split into several pieces selects all of them. Words match whole words only ("cat" is not
    in "cats", "stone" not in "cobblestone"), after the tokenizer's normalization (case).
    """
    query = tuple(tokenizer(word, add_special_tokens=False).input_ids)
    if not query:
        raise ValueError(f"word {word!r} has no tokens; name a word of the prompt")
    words = prompt_words(tokenizer, prompt)
    positions: list[int] = []
    for start in range(len(words)):
        ids: tuple[int, ...] = ()
        span: tuple[int, ...] = ()
        for w in words[start:]:
            ids, span = ids + w.ids, span + w.positions
            if len(ids) >= len(query):
                break
        if ids == query:
            positions.extend(span)
    if not positions:
        limit = tokenizer.model_max_length
        cut = bool(words) and words[-1].positions[-1] >= limit - 2  # the end token fell off, or nearly
        raise ValueError(
            f"word {word!r} is not in the prompt {prompt!r}; its words are {[w.text for w in words]}"
            + (f" (the text encoder reads only its first {limit} tokens)" if cut else "")
            + ". Words match whole words; integers select token positions (0 is the start token)"
        )
    return positions


def has_words(tokens: object) -> bool:
    """Whether a token selection names words (strings) that need a prompt to become positions."""
    if isinstance(tokens, str):
        return True
    return isinstance(tokens, Sequence) and any(isinstance(t, str) for t in tokens)


def selection_items(tokens: str | TokenSelection) -> tuple[int | str, ...]:
    """A selection of words and indices as a checked tuple (a lone string is one word)."""
    items = (tokens,) if isinstance(tokens, str) else tuple(tokens)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, numbers.Integral)):
            raise TypeError(f"tokens entries must be words (str) or token indices (int); got {item!r}")
    return items


def resolve_tokens(tokenizer, prompts: str | Sequence[str], tokens: str | TokenSelection) -> list[int]:
    """Positions for a selection of words and indices, in the order given (integers pass unchanged).

    One selection serves a whole batch, so every prompt must put the words at the same positions.
    """
    items = selection_items(tokens)
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("no prompt to find the token words in")
    resolved: list[int] | None = None
    for prompt in dict.fromkeys(prompt_list):
        positions = [
            p
            for item in items
            for p in (word_positions(tokenizer, prompt, item) if isinstance(item, str) else [int(item)])
        ]
        if resolved is not None and positions != resolved:
            raise ValueError(
                f"tokens {items} sit at positions {resolved} in {prompt_list[0]!r} but {positions} in "
                f"{prompt!r}; one selection serves the whole batch: generate these prompts in separate "
                "calls, or pass token indices"
            )
        resolved = positions
    return resolved
