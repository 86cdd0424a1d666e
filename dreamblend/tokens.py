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
from typing import Any

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
WORD_START = "\u2581"  # sentencepiece (T5) starts a word's first piece with "▁"
TokenSelection = Sequence[int | str]


@dataclass(frozen=True)
class PromptWord:
    """One word of a tokenized prompt: its text, token ids and positions (CLIP's start token is 0)."""

    text: str
    ids: tuple[int, ...]
    positions: tuple[int, ...]


def _is_punctuation(piece: str) -> bool:
    """A piece of punctuation only: a word of its own, as CLIP's pre-tokenizer makes it (T5 glues
    "dog." into one whitespace word, whose pieces are "▁dog" and ".")."""
    core = piece.removeprefix(WORD_START).removesuffix(END_OF_WORD)
    return bool(core) and not any(ch.isalnum() for ch in core)


def prompt_words(tokenizer, prompt: str, max_length: int | None = None) -> list[PromptWord]:
    """The words of ``prompt`` as the text encoder sees it (cut at ``max_length`` tokens, by default the
    tokenizer's maximum).

    Word boundaries: CLIP's BPE ends a word's last piece with ``</w>``; sentencepiece (T5) starts a
    word's first piece with ``▁``; a fast tokenizer's pre-tokenizer words; punctuation pieces stand
    alone. An added token (a learned ``<new1>``) is a word of its own. Tokens the tokenizer adds
    (start, end) belong to no word.
    """
    limit = tokenizer.model_max_length if max_length is None else max_length
    encoding = tokenizer(prompt, truncation=True, max_length=limit, return_special_tokens_mask=True)
    ids, special = encoding.input_ids, encoding.special_tokens_mask
    pre_words = encoding.word_ids() if tokenizer.is_fast else [None] * len(ids)
    added = set(tokenizer.get_added_vocab().values()) - set(tokenizer.all_special_ids)
    words: list[PromptWord] = []
    current: list[int] = []

    def close() -> None:
        if current:
            word_ids = tuple(ids[p] for p in current)
            words.append(PromptWord(tokenizer.decode(list(word_ids)).strip(), word_ids, tuple(current)))
            current.clear()

    pieces = tokenizer.convert_ids_to_tokens(ids)
    for position, (token_id, piece) in enumerate(zip(ids, pieces, strict=True)):
        if special[position]:
            close()
            continue
        alone = token_id in added or _is_punctuation(piece)
        new_pre_word = bool(current) and pre_words[position] != pre_words[current[-1]]
        # T5 may put a bare "▁" before a piece it has no "▁" form of: it starts that piece's word.
        bare = bool(current) and all(pieces[p] == WORD_START for p in current)
        if (alone or piece.startswith(WORD_START) or new_pre_word) and not bare:
            close()
        current.append(position)
        if alone or piece.endswith(END_OF_WORD):
            close()
    close()
    return words


def _match(tokenizer, prompt: str, word: str, max_length: int | None) -> tuple[list[int], list[PromptWord]]:
    """Positions of every whole-word occurrence of ``word`` in ``prompt``, and the prompt's words."""
    query = tuple(tokenizer(word, add_special_tokens=False).input_ids)
    if not query:
        raise ValueError(f"word {word!r} has no tokens; name a word of the prompt")
    words = prompt_words(tokenizer, prompt, max_length)
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
    return positions, words


def _not_found(
    tokenizer, prompt: str, word: str, words: list[PromptWord], max_length: int | None
) -> ValueError:
    limit = tokenizer.model_max_length if max_length is None else max_length
    cut = bool(words) and words[-1].positions[-1] >= limit - 2  # the end token fell off, or nearly
    starts = bool(words) and words[0].positions[0] > 0  # a start token comes first (CLIP), or not (T5)
    return ValueError(
        f"word {word!r} is not in the prompt {prompt!r}; its words are {[w.text for w in words]}"
        + (f" (the text encoder reads only its first {limit} tokens)" if cut else "")
        + ". Words match whole words; integers select token positions"
        + (" (0 is the start token)" if starts else " (0 is the first word)")
    )


def word_positions(tokenizer, prompt: str, word: str, max_length: int | None = None) -> list[int]:
    """Token positions of every occurrence of ``word`` (one word or a phrase) in ``prompt``.

    A word split into several pieces selects all of them. Words match whole words only ("cat" is not
    in "cats", "stone" not in "cobblestone"), after the tokenizer's normalization (CLIP lower-cases,
    T5 keeps case). ``max_length``: the tokens the text encoder reads (default: the tokenizer's).
    """
    positions, words = _match(tokenizer, prompt, word, max_length)
    if not positions:
        raise _not_found(tokenizer, prompt, word, words, max_length)
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


@dataclass(frozen=True)
class TextSegment:
    """One tokenizer's part of a model's text sequence: the prompt(s) it reads, the position of its first
    token in the sequence, and how many tokens it keeps (SD3: CLIP's 77 at 0, then T5's at 77)."""

    tokenizer: Any
    prompts: str | Sequence[str]
    offset: int = 0
    max_length: int | None = None


def resolve_text_tokens(segments: Sequence[TextSegment], tokens: str | TokenSelection) -> list[int]:
    """Positions in a text sequence made of ``segments`` for a selection of words and indices.

    A word selects its positions in every segment that holds it (in segment order) and must be in one
    of them; integers pass unchanged, in the order given. One selection serves a whole batch, so every
    prompt must put the words at the same positions.
    """
    items = selection_items(tokens)
    batches = [[s.prompts] if isinstance(s.prompts, str) else list(s.prompts) for s in segments]
    if not batches or not all(batches):
        raise ValueError("no prompt to find the token words in")
    size = max(len(b) for b in batches)
    if any(len(b) not in (1, size) for b in batches):
        raise ValueError(f"the text encoders got {[len(b) for b in batches]} prompts; pass as many of each")

    def word(texts: tuple[str, ...], item: str) -> list[int]:
        found: list[int] = []
        first: list[PromptWord] = []
        for i, (segment, text) in enumerate(zip(segments, texts, strict=True)):
            positions, words = _match(segment.tokenizer, text, item, segment.max_length)
            found += [segment.offset + p for p in positions]
            first = words if i == 0 else first
        if not found:
            segment = segments[0]
            raise _not_found(segment.tokenizer, texts[0], item, first, segment.max_length)
        return found

    resolved: list[int] | None = None
    shown = ""
    for texts in dict.fromkeys(tuple(b[i % len(b)] for b in batches) for i in range(size)):
        positions = [
            p for item in items for p in (word(texts, item) if isinstance(item, str) else [int(item)])
        ]
        if resolved is not None and positions != resolved:
            raise ValueError(
                f"tokens {items} sit at positions {resolved} in {shown!r} but {positions} in "
                f"{texts[0]!r}; one selection serves the whole batch: generate these prompts in separate "
                "calls, or pass token indices"
            )
        resolved, shown = positions, shown or texts[0]
    assert resolved is not None
    return resolved


def resolve_tokens(
    tokenizer, prompts: str | Sequence[str], tokens: str | TokenSelection, max_length: int | None = None
) -> list[int]:
    """Positions for a selection of words and indices in one tokenizer's prompts (see
    :func:`resolve_text_tokens`)."""
    return resolve_text_tokens([TextSegment(tokenizer, prompts, 0, max_length)], tokens)
