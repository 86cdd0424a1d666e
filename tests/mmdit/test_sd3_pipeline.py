"""DreamBlendSD3Pipeline on a tiny SD3: alpha 0 is the stock pipeline, guidance moves only E."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from dreamblend import AttentionStore
from dreamblend.mmdit import DreamBlendSD3Pipeline, attach
from dreamblend.testing_mmdit import tiny_sd3, tiny_sd3_components

PROMPT = "a photo of sks dog on the beach"
CALL = {"height": 32, "width": 32, "num_inference_steps": 3, "guidance_scale": 4.0, "max_sequence_length": 6}


def stock_images(components: dict, transformer=None) -> np.ndarray:
    pipe = StableDiffusion3Pipeline(**{**components, "transformer": transformer or components["transformer"]})
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **CALL).images


@pytest.fixture(scope="module")
def components():
    return tiny_sd3_components(seed=0)


@pytest.fixture(scope="module")
def guidance():
    return tiny_sd3(seed=1)  # G: another checkpoint of the same architecture


def blend(components, guidance, **kwargs):
    pipe = DreamBlendSD3Pipeline(**components, guidance_transformer=guidance)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **{**CALL, **kwargs})


def test_alpha_zero_equals_the_stock_pipeline(components, guidance):
    out = blend(components, guidance, cross_attention_guidance_scale=0.0, return_reference=True)
    np.testing.assert_array_equal(out.images, stock_images(components))
    np.testing.assert_array_equal(out.reference_images, stock_images(components, guidance))


def test_guidance_moves_e_toward_g_and_leaves_g(components, guidance):
    out = blend(components, guidance, cross_attention_guidance_scale=50.0, return_reference=True)
    # G records its maps through the capture op, whose float32 softmax rounds differently from SDPA's
    # (~1e-7 relative); three steps and the VAE keep that near 1e-6 in pixels.
    np.testing.assert_allclose(out.reference_images, stock_images(components, guidance), rtol=0, atol=1e-5)
    plain = stock_images(components)
    assert np.isfinite(out.images).all() and np.abs(out.images - plain).max() > 1e-3


def test_one_guided_step_is_a_gradient_step_on_the_latent(components, guidance):
    """Algorithm 1 by hand for one step: G's conditional maps at l_T, E's L1 gradient, then E's CFG step."""
    alpha, call = 20.0, {**CALL, "num_inference_steps": 1, "output_type": "latent"}
    start = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    pipe = DreamBlendSD3Pipeline(**components, guidance_transformer=guidance)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, latents=start, cross_attention_guidance_scale=alpha, **call).images

    edit = components["transformer"]
    embeds, _, pooled, _ = pipe.encode_prompt(
        PROMPT, None, None, do_classifier_free_guidance=False, max_sequence_length=CALL["max_sequence_length"]
    )
    t = torch.tensor([1000.0])  # one flow-matching step starts at sigma 1
    inputs = {"encoder_hidden_states": embeds, "pooled_projections": pooled, "timestep": t}
    store = AttentionStore()
    with attach(guidance, store), torch.no_grad(), store.record():
        guidance(hidden_states=start, **inputs)
    x = start.clone().requires_grad_()
    with attach(edit, store), store.guide():
        edit(hidden_states=x, **inputs)
        (grad,) = torch.autograd.grad(store.loss.sum(), x)
    assert grad.abs().max() > 0
    stock = StableDiffusion3Pipeline(**components)
    stock.set_progress_bar_config(disable=True)
    expected = stock(PROMPT, latents=start - alpha * grad, **call).images
    # G recorded its maps in the CFG batch here and alone by hand: float32 rounding of the same maps,
    # amplified by alpha through one step.
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    no_guidance = stock(PROMPT, latents=start, **call).images
    assert (out - no_guidance).abs().max() > 100 * 1e-4  # the comparison above can tell the update apart


def test_lora_files_from_the_dreambooth_scripts_pair_as_roles(tmp_path):
    """A LoRA saved the way diffusers' train_dreambooth_lora_sd3.py saves it is E; the base model is G."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trained = tiny_sd3(seed=0)
    trained.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(trained)
    )

    pipe = DreamBlendSD3Pipeline(**tiny_sd3_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path, adapter_name="late")
    kwargs = {"generator": torch.Generator().manual_seed(0), "output_type": "np", **CALL}
    out = pipe(
        PROMPT, cross_attention_guidance_scale=0.0, return_reference=True, edit_adapter="late", **kwargs
    )
    stock = StableDiffusion3Pipeline(**tiny_sd3_components(seed=0))
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(tmp_path, adapter_name="late")
    with_lora = stock(PROMPT, **{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
    np.testing.assert_array_equal(out.images, with_lora)
    np.testing.assert_array_equal(out.reference_images, stock_images(tiny_sd3_components(seed=0)))
    assert np.abs(with_lora - out.reference_images).max() > 1e-3  # the adapter changes the model

    guided = pipe(PROMPT, cross_attention_guidance_scale=50.0, edit_adapter="late", **kwargs).images
    assert np.isfinite(guided).all() and np.abs(guided - with_lora).max() > 1e-3
    assert pipe.transformer.active_adapters() == ["late"]  # the call restored the adapter state


def test_word_tokens_and_maps_of_the_conditional_branch(components, guidance):
    seen = []
    blend(
        components,
        guidance,
        cross_attention_guidance_scale=1.0,
        attention_tokens=["dog"],
        attention_callback=lambda role, i, maps: seen.append(
            (role, i, {k: v.shape for k, v in maps.items()})
        ),
    )
    assert [(role, i) for role, i, _ in seen] == [(r, i) for i in range(3) for r in ("guidance", "edit")]
    layers = {"transformer_blocks.0.attn", "transformer_blocks.1.attn"}
    for _, _, shapes in seen:  # one image's conditional row, 4 heads, 8x8 patches, the one word token
        assert shapes == {name: (1, 4, 64, 1) for name in layers}


def test_words_select_their_clip_and_t5_positions():
    """With a T5 encoder a word is its CLIP-L positions and its T5 ones after CLIP's 77: the same maps."""
    components = tiny_sd3_components(seed=0, t5=True)
    pipe = DreamBlendSD3Pipeline(**components, guidance_transformer=tiny_sd3(seed=1))
    pipe.set_progress_bar_config(disable=True)
    maps = {}
    for tokens in (["dog"], [5, 77 + 4]):  # CLIP: start token, a photo of sks dog; T5: a photo of sks dog
        pipe(
            PROMPT,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            cross_attention_guidance_scale=1.0,
            attention_tokens=tokens,
            attention_callback=lambda role, i, m, key=str(tokens): maps.setdefault((key, role, i), m),
            **CALL,
        )
    for role in ("guidance", "edit"):
        for i in range(CALL["num_inference_steps"]):
            by_word, by_index = maps[("['dog']", role, i)], maps[("[5, 81]", role, i)]
            assert {m.shape[-1] for m in by_word.values()} == {2}
            for name in by_word:
                torch.testing.assert_close(by_word[name], by_index[name], rtol=0, atol=0)


def test_pairing_errors_speak_of_transformers(components):
    pipe = DreamBlendSD3Pipeline(**components)
    with pytest.raises(ValueError, match="pass an earlier checkpoint as guidance_transformer="):
        pipe(PROMPT, **CALL)


def test_from_pipe_and_a_guidance_folder(components, guidance, tmp_path):
    guidance.save_pretrained(tmp_path / "transformer")  # a pipeline folder's layout
    stock = StableDiffusion3Pipeline(**components)
    pipe = DreamBlendSD3Pipeline.from_pipe(stock, guidance_transformer=str(tmp_path))
    assert pipe.transformer is components["transformer"]
    assert pipe.guidance_transformer is not guidance  # loaded from the folder; the images below compare it
    pipe.set_progress_bar_config(disable=True)
    call = {"generator": torch.Generator().manual_seed(0), "output_type": "np", **CALL}
    out = pipe(PROMPT, cross_attention_guidance_scale=0.0, return_reference=True, **call)
    np.testing.assert_array_equal(out.reference_images, stock_images(components, guidance))
