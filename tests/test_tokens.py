"""`dreamblend.tokens`: a learned token's vector substituted at the text encoder's input, nothing written."""

from __future__ import annotations

import pytest
import torch

from dreamblend.testing import tiny_sd_components
from dreamblend.tokens import token_embeddings

PROMPT = "a photo of a <sks> dog"


@pytest.fixture
def text():
    """A tiny tokenizer and text encoder that know "<sks>" (a random row, as after loading a token)."""
    parts = tiny_sd_components(0)
    tokenizer, encoder = parts["tokenizer"], parts["text_encoder"]
    tokenizer.add_tokens("<sks>")
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokenizer, encoder


@torch.no_grad()
def encode(tokenizer, encoder, prompt: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    return encoder(ids.input_ids)[0]


def test_substitution_equals_writing_the_row(text):
    tokenizer, encoder = text
    vector = torch.randn(encoder.config.hidden_size)
    before = encoder.get_input_embeddings().weight.clone()
    plain = encode(tokenizer, encoder)
    with token_embeddings(tokenizer, encoder, {"<sks>": vector[None]}):  # (1, width) is taken too
        substituted = encode(tokenizer, encoder)
    assert torch.equal(encoder.get_input_embeddings().weight, before)  # nothing written
    assert torch.equal(encode(tokenizer, encoder), plain)  # and the hook is gone
    assert not torch.allclose(substituted, plain)

    with torch.no_grad():
        encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<sks>")] = vector
    torch.testing.assert_close(substituted, encode(tokenizer, encoder), rtol=0, atol=0)
    other = encode(tokenizer, encoder, "a photo of a dog")
    with token_embeddings(tokenizer, encoder, {"<sks>": -vector}):
        assert torch.equal(encode(tokenizer, encoder, "a photo of a dog"), other)  # no token, no change


@pytest.mark.parametrize(
    ("embeddings", "message"),
    [
        ({"<xyz>": torch.zeros(32)}, "is not one token of the tokenizer"),
        ({"<sks>": torch.zeros(31)}, "vector of width 32"),
        ({"<sks>": torch.zeros(2, 32)}, "vector of width 32"),
        ({"<sks>": torch.zeros(32, dtype=torch.long)}, "floating-point"),
        ({"<sks>": torch.full((32,), float("nan"))}, "non-finite"),
    ],
)
def test_bad_embeddings_name_the_problem(text, embeddings, message):
    tokenizer, encoder = text
    with pytest.raises(ValueError, match=message), token_embeddings(tokenizer, encoder, embeddings):
        pass
    assert not encoder.get_input_embeddings()._forward_hooks
