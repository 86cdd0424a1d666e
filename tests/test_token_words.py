"""Tokens chosen by word: positions in the tokenized prompt, errors, and the store's word selection."""

from __future__ import annotations

import pytest
import torch

from dreamblend import AttentionStore, attach
from dreamblend.testing import tiny_clip_tokenizer, tiny_sd_components
from dreamblend.tokens import prompt_words, resolve_tokens, word_positions


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_clip_tokenizer()
    tok.add_tokens("<new1>")  # a learned token, as textual inversion adds it
    return tok


def test_words_and_their_positions(tokenizer):
    prompt = "A <new1> zebra on the cobblestone street."
    words = prompt_words(tokenizer, prompt)
    assert [w.text for w in words] == ["a", "<new1>", "zebra", "on", "the", "cobblestone", "street", "."]
    assert words[2].positions == (3, 4, 5, 6, 7)  # "zebra" is not in the tiny vocabulary: five pieces
    assert word_positions(tokenizer, prompt, "zebra") == [3, 4, 5, 6, 7]
    assert word_positions(tokenizer, prompt, "<new1>") == [2]
    assert word_positions(tokenizer, prompt, "Street") == [11]  # the tokenizer lower-cases
    assert word_positions(tokenizer, prompt, "the cobblestone") == [9, 10]  # a phrase
    # whole words only: zebra's last piece is the token of "a", and "stone" is inside "cobblestone"
    assert word_positions(tokenizer, prompt, "a") == [1]
    assert word_positions(tokenizer, "a dog and a dog", "dog") == [2, 5]  # every occurrence


def test_missing_word_names_the_prompt_words(tokenizer):
    with pytest.raises(ValueError, match=r"'stone' is not in the prompt .*\['a', 'cobblestone'\]"):
        word_positions(tokenizer, "a cobblestone", "stone")
    with pytest.raises(ValueError, match="has no tokens"):
        word_positions(tokenizer, "a dog", " ")
    with pytest.raises(ValueError, match="reads only its first 77 tokens"):
        word_positions(tokenizer, "a " * 80 + "dog", "dog")


def test_resolve_keeps_order_and_indices_and_checks_the_batch(tokenizer):
    assert resolve_tokens(tokenizer, "a sks dog", ["dog", 0, "sks", -1]) == [3, 0, 2, -1]
    assert resolve_tokens(tokenizer, ["a sks dog", "a sks dog"], "sks") == [2]
    assert resolve_tokens(tokenizer, ["a sks dog", "the sks cat"], ["sks"]) == [2]
    with pytest.raises(ValueError, match=r"positions \[3\] in 'a sks dog' but \[4\] in 'a sks red dog'"):
        resolve_tokens(tokenizer, ["a sks dog", "a sks red dog"], ["dog"])
    with pytest.raises(TypeError, match="words .* or token indices"):
        resolve_tokens(tokenizer, "a dog", ["dog", 1.5])


def test_store_selects_by_word_like_by_index(tokenizer):
    components = tiny_sd_components(0)
    unet, encoder, tok = components["unet"], components["text_encoder"], components["tokenizer"]
    prompt = "a sks zebra in the jungle"
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = encoder(ids)[0]
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def maps(store: AttentionStore) -> dict[str, torch.Tensor]:
        with attach(unet, store), store.record(), torch.no_grad():
            unet(x, 500, embeds)
        return store.maps

    by_word = AttentionStore(tokens=["zebra", "jungle"], head_mean=True)
    with pytest.raises(ValueError, match=r"name words; .*resolve_words\(tokenizer, prompt\)"):
        maps(by_word)
    by_index = maps(AttentionStore(tokens=[3, 4, 5, 6, 7, 10], head_mean=True))
    by_word_maps = maps(by_word.resolve_words(tok, prompt))
    assert by_word_maps.keys() == by_index.keys()
    for name, value in by_index.items():
        assert value.shape[-1] == 6
        torch.testing.assert_close(by_word_maps[name], value, rtol=0, atol=0)
