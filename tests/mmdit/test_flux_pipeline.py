"""DreamBlendFluxPipeline on a tiny guidance-distilled FLUX: alpha 0 is the stock pipeline, no CFG batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from dreamblend import AttentionStore
from dreamblend.mmdit import DreamBlendFluxPipeline, attach
from dreamblend.testing_mmdit import tiny_flux_components, tiny_flux_pipeline_transformer

PROMPT = "a photo of sks dog on the beach"
CALL = {"height": 32, "width": 32, "num_inference_steps": 3, "guidance_scale": 3.5, "max_sequence_length": 8}


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_images(components: dict, transformer=None, **kwargs) -> np.ndarray:
    pipe = quiet(FluxPipeline(**{**components, "transformer": transformer or components["transformer"]}))
    call = {"generator": torch.Generator().manual_seed(0), "output_type": "np", **CALL, **kwargs}
    return pipe(PROMPT, **call).images


@pytest.fixture(scope="module")
def components():
    return tiny_flux_components(seed=0)


@pytest.fixture(scope="module")
def guidance():
    return tiny_flux_pipeline_transformer(seed=1)


def blend(components, guidance, **kwargs):
    pipe = quiet(DreamBlendFluxPipeline(**components, guidance_transformer=guidance))
    call = {"generator": torch.Generator().manual_seed(0), "output_type": "np", **CALL, **kwargs}
    return pipe(PROMPT, **call)


def test_alpha_zero_equals_the_stock_pipeline(components, guidance):
    out = blend(components, guidance, cross_attention_guidance_scale=0.0, return_reference=True)
    np.testing.assert_array_equal(out.images, stock_images(components))
    np.testing.assert_array_equal(out.reference_images, stock_images(components, guidance))
    latent = blend(components, guidance, cross_attention_guidance_scale=0.0, output_type="latent").images
    np.testing.assert_array_equal(latent, stock_images(components, output_type="latent"))  # packed, as stock


def test_guidance_moves_e_and_leaves_g(components, guidance):
    out = blend(components, guidance, cross_attention_guidance_scale=50.0, return_reference=True)
    # G records its maps through the capture op, whose float32 softmax rounds differently from SDPA's.
    np.testing.assert_allclose(out.reference_images, stock_images(components, guidance), rtol=0, atol=1e-5)
    assert np.isfinite(out.images).all() and np.abs(out.images - stock_images(components)).max() > 1e-3


def test_one_guided_step_is_a_gradient_step_on_the_latent(components, guidance):
    """Algorithm 1 by hand on FLUX's packed tokens: G's maps at l_T, E's L1 gradient, E's step."""
    alpha, call = 20.0, {**CALL, "num_inference_steps": 1, "output_type": "latent"}
    start = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(3))  # 8x8 tokens of 2x2x4
    pipe = quiet(DreamBlendFluxPipeline(**components, guidance_transformer=guidance))
    out = pipe(PROMPT, latents=start, cross_attention_guidance_scale=alpha, **call).images

    embeds, pooled, text_ids = pipe.encode_prompt(
        PROMPT, None, max_sequence_length=CALL["max_sequence_length"]
    )
    inputs = {
        "encoder_hidden_states": embeds,
        "pooled_projections": pooled,
        "timestep": torch.tensor([1.0]),  # one step starts at sigma 1
        "guidance": torch.tensor([CALL["guidance_scale"]]),
        "txt_ids": text_ids,
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32),
    }
    store = AttentionStore()
    with attach(guidance, store), torch.no_grad(), store.record():
        guidance(hidden_states=start, **inputs)
    x = start.clone().requires_grad_()
    edit = components["transformer"]
    with attach(edit, store), store.guide():
        edit(hidden_states=x, **inputs)
        (grad,) = torch.autograd.grad(store.loss.sum(), x)
    assert grad.abs().max() > 0
    stock = quiet(FluxPipeline(**components))
    expected = stock(PROMPT, latents=start - alpha * grad, **call).images
    # The same maps and gradient in float32 through one step; the margin below shows the update is seen.
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert (out - stock(PROMPT, latents=start, **call).images).abs().max() > 100 * 1e-4


def test_lora_files_from_the_dreambooth_scripts_pair_as_roles(tmp_path):
    """A LoRA saved the way diffusers' train_dreambooth_lora_flux.py saves it is E; the base model is G."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trained = tiny_flux_pipeline_transformer(seed=0)
    targets = ["to_k", "to_q", "to_v", "to_out.0"]
    trained.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets))
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(trained))

    pipe = quiet(DreamBlendFluxPipeline(**tiny_flux_components(seed=0)))
    pipe.load_lora_weights(tmp_path, adapter_name="late")
    call = {"generator": torch.Generator().manual_seed(0), "output_type": "np", **CALL}
    out = pipe(PROMPT, cross_attention_guidance_scale=0.0, return_reference=True, edit_adapter="late", **call)
    stock = quiet(FluxPipeline(**tiny_flux_components(seed=0)))
    stock.load_lora_weights(tmp_path, adapter_name="late")
    with_lora = stock(PROMPT, **{**call, "generator": torch.Generator().manual_seed(0)}).images
    np.testing.assert_array_equal(out.images, with_lora)
    np.testing.assert_array_equal(out.reference_images, stock_images(tiny_flux_components(seed=0)))
    assert np.abs(with_lora - out.reference_images).max() > 1e-3  # the adapter changes the model
    call["generator"] = torch.Generator().manual_seed(0)
    guided = pipe(PROMPT, cross_attention_guidance_scale=50.0, edit_adapter="late", **call).images
    assert np.isfinite(guided).all() and np.abs(guided - with_lora).max() > 1e-3
    assert pipe.transformer.active_adapters() == ["late"]  # the call restored the adapter state


def test_maps_cover_both_block_kinds_and_callbacks_see_packed_latents(components, guidance):
    seen, shapes = [], []

    def on_step(pipe, i, t, tensors):
        shapes.append(tuple(tensors["latents"].shape))
        return tensors

    blend(
        components,
        guidance,
        cross_attention_guidance_scale=1.0,
        attention_tokens=[3, 4],  # "sks", "dog" in the T5 tokenization (no start token)
        attention_callback=lambda role, i, maps: seen.append(
            (role, i, {k: v.shape for k, v in maps.items()})
        ),
        callback_on_step_end=on_step,
    )
    assert [(role, i) for role, i, _ in seen] == [(r, i) for i in range(3) for r in ("guidance", "edit")]
    layers = {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    for _, _, maps in seen:  # one image (no CFG batch), 2 heads, 8x8 tokens, two text tokens
        assert maps == {name: (1, 2, 64, 2) for name in layers}
    assert shapes == [(1, 64, 16)] * 3


def test_words_select_their_t5_positions(components, guidance):
    """Words resolve in the T5 tokenization (of prompt_2 when given): the same maps as their positions."""
    maps = {}

    def run(tokens, **kwargs):
        record = lambda role, i, m: maps.setdefault((str(tokens), role, i), m)  # noqa: E731
        blend(components, guidance, attention_tokens=tokens, attention_callback=record, **kwargs)

    run(["sks dog"])
    run([3, 4])
    for role in ("guidance", "edit"):
        for i in range(3):
            by_word, by_index = maps[("['sks dog']", role, i)], maps[("[3, 4]", role, i)]
            assert by_word.keys() == by_index.keys()
            for name in by_word:
                torch.testing.assert_close(by_word[name], by_index[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"'beach' is not in the prompt 'a sks dog'.*0 is the first word"):
        run(["beach"], prompt_2="a sks dog")  # T5 reads prompt_2
    with pytest.raises(ValueError, match="reads only its first 4 tokens"):
        run(["beach"], max_sequence_length=4)
