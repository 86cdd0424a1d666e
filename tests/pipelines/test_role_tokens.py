"""G with its own learned token vector (``guidance_token_embeddings``) while E keeps the text encoder's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pipeline_helpers import blend_pipe, blend_xl_pipe, gen, plain_pipe, sd_kwargs

PROMPT = "a <sks> dog in the jungle"


def learn_token(pipe, vector: torch.Tensor) -> None:
    """Give ``pipe``'s tokenizer the token "<sks>" with ``vector`` as its row (what loading a token does)."""
    pipe.tokenizer.add_tokens("<sks>")
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[-1] = vector


@pytest.fixture
def vectors() -> tuple[torch.Tensor, torch.Tensor]:
    generator = gen(5)
    return torch.randn(32, generator=generator), torch.randn(32, generator=generator)


def test_g_encodes_its_prompt_with_its_own_vector(vectors):
    edit_vector, guidance_vector = vectors
    pipe = blend_pipe()
    learn_token(pipe, edit_vector)
    weights = pipe.text_encoder.get_input_embeddings().weight.clone()
    own = {"<sks>": guidance_vector}
    out = pipe(
        PROMPT,
        cross_attention_guidance_scale=0.0,
        guidance_token_embeddings=own,
        generator=gen(),
        return_reference=True,
        **sd_kwargs(),
    )
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, weights)  # nothing written

    # E sees the text encoder's vector, G its own: each equals stock SD with that vector as the row.
    for unet, vector, images in (
        (pipe.unet, edit_vector, out.images),
        (pipe.guidance_unet, guidance_vector, out.reference_images),
    ):
        plain = plain_pipe(unet)
        learn_token(plain, vector)
        expected = plain(PROMPT, guidance_scale=3.0, generator=gen(), **sd_kwargs()).images
        np.testing.assert_array_equal(images, expected)

    # Under guidance, G's vector reaches E through G's maps.
    guided = [
        pipe(
            PROMPT,
            cross_attention_guidance_scale=1.0,
            guidance_token_embeddings=e,
            generator=gen(),
            **sd_kwargs(),
        )
        for e in (None, own)
    ]
    assert not np.allclose(guided[0].images, guided[1].images, atol=1e-4)


def test_inversion_with_g_uses_its_vector(vectors):
    edit_vector, guidance_vector = vectors
    pipe = blend_pipe()
    learn_token(pipe, edit_vector)
    image = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    own = {"<sks>": guidance_vector}
    inverted = {
        model: pipe.invert(image, PROMPT, 2, model=model, guidance_token_embeddings=own)
        for model in ("guidance", "edit")
    }
    plain = blend_pipe()
    learn_token(plain, guidance_vector)
    torch.testing.assert_close(inverted["guidance"], plain.invert(image, PROMPT, 2, model="guidance"))
    plain = blend_pipe()
    learn_token(plain, edit_vector)
    torch.testing.assert_close(inverted["edit"], plain.invert(image, PROMPT, 2, model="edit"))


def test_bad_input(vectors):
    pipe = blend_pipe()
    learn_token(pipe, vectors[0])
    own = {"<sks>": vectors[1]}
    embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    with pytest.raises(ValueError, match="pass the prompt as text"):
        pipe(prompt_embeds=embeds, guidance_token_embeddings=own, **sd_kwargs())
    with pytest.raises(ValueError, match="not one token of the tokenizer"):
        pipe(PROMPT, guidance_token_embeddings={"<other>": vectors[1]}, **sd_kwargs())
    xl = blend_xl_pipe()
    with pytest.raises(ValueError, match="does not take guidance_token_embeddings"):
        xl.invert(np.zeros((32, 32, 3), np.float32), PROMPT, 2, guidance_token_embeddings=own)
