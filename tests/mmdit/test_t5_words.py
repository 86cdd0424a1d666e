"""Words to token positions for T5's sentencepiece tokenizer, and across a text block of several encoders."""

from __future__ import annotations

import pytest

from dreamblend.testing import tiny_clip_tokenizer
from dreamblend.testing_mmdit import tiny_t5_tokenizer
from dreamblend.tokens import TextSegment, prompt_words, resolve_text_tokens, resolve_tokens, word_positions


@pytest.fixture(scope="module")
def t5():
    return tiny_t5_tokenizer()


def test_t5_words_and_their_positions(t5):
    prompt = "A sks zebra on the street. (dog)"
    words = prompt_words(t5, prompt)
    # No start token: position 0 is the first word. "A" and "zebra" are not whole pieces in the vocabulary:
    # a bare "▁" then letters. Punctuation glued to a word ("street.") is a word of its own.
    assert [(w.text, w.positions) for w in words] == [
        ("A", (0, 1)), ("sks", (2,)), ("zebra", (3, 4, 5, 6, 7, 8)), ("on", (9,)), ("the", (10,)),
        ("street", (11,)), (".", (12,)), ("(", (13, 14)), ("dog", (15, 16, 17)), (")", (18,)),
    ]  # fmt: skip
    assert word_positions(t5, prompt, "street") == [11]
    assert word_positions(t5, prompt, "zebra") == [3, 4, 5, 6, 7, 8]
    assert word_positions(t5, prompt, "the street.") == [10, 11, 12]  # a phrase
    assert word_positions(t5, "a dog and a dog", "dog") == [1, 4]
    assert word_positions(t5, prompt, "A") == [0, 1]  # T5 keeps case: "a" is another token
    with pytest.raises(ValueError, match=r"'a' is not in the prompt .*0 is the first word"):
        word_positions(t5, prompt, "a")
    with pytest.raises(ValueError, match="reads only its first 4 tokens"):
        word_positions(t5, "a photo of sks dog", "dog", max_length=4)


def test_text_block_of_clip_then_t5():
    """SD3's text block: CLIP's 77 positions, then T5's; a word selects its positions in both."""
    clip, t5 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    segments = [TextSegment(clip, "a sks dog", 0, 77), TextSegment(t5, "the sks dog", 77, 16)]
    assert resolve_text_tokens(segments, ["dog", 0]) == [3, 77 + 2, 0]
    only_t5 = [TextSegment(clip, "a dog", 0, 77), TextSegment(t5, "a sks dog", 77, 16)]
    assert resolve_text_tokens(only_t5, "sks") == [77 + 1]  # in one segment is enough
    with pytest.raises(ValueError, match=r"'cat' is not in the prompt 'a dog'.*0 is the start token"):
        resolve_text_tokens(only_t5, ["cat"])
    batch = [TextSegment(clip, ["a sks dog", "a sks red dog"], 0, 77), TextSegment(t5, "sks dog", 77, 16)]
    with pytest.raises(
        ValueError, match=r"positions \[3, 78\] in 'a sks dog' but \[4, 78\] in 'a sks red dog'"
    ):
        resolve_text_tokens(batch, ["dog"])
    with pytest.raises(ValueError, match="got \\[2, 3\\] prompts"):
        resolve_text_tokens([TextSegment(clip, ["a", "b"]), TextSegment(t5, ["a", "b", "c"])], ["a"])
    assert resolve_tokens(t5, ["a sks dog", "a sks cat"], "sks") == [1]
