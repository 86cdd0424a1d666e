"""DreamBlendPipeline (SD1.x/2.x) semantics on tiny models: DESIGN §2 and Algorithm 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from pipeline_helpers import (
    PROMPT,
    STEPS,
    blend_pipe,
    gen,
    merged_copy,
    plain_pipe,
    sd_kwargs,
)

from dreamblend import AttentionStore, DreamBlendPipeline, attach
from dreamblend.pipelines.blend import DreamBlendSampler
from dreamblend.testing import tiny_sd_components


def test_alpha_zero_is_plain_sampling_with_e_and_g():
    """alpha = 0: E's image is stock SD with E's UNet, bit for bit; the reference is stock SD with G's."""
    pipe = blend_pipe()
    out = pipe(
        PROMPT, cross_attention_guidance_scale=0.0, generator=gen(), return_reference=True, **sd_kwargs()
    )
    edit = plain_pipe(pipe.unet)(PROMPT, guidance_scale=3.0, generator=gen(), **sd_kwargs()).images
    guidance = plain_pipe(pipe.guidance_unet)(
        PROMPT, guidance_scale=3.0, generator=gen(), **sd_kwargs()
    ).images
    np.testing.assert_array_equal(out.images, edit)
    np.testing.assert_array_equal(out.reference_images, guidance)
    assert out.nsfw_content_detected is None
    alone = pipe(PROMPT, cross_attention_guidance_scale=0.0, generator=gen(), **sd_kwargs())
    np.testing.assert_array_equal(alone.images, edit)  # G is skipped entirely when nothing needs it
    assert alone.reference_images is None


def _trajectory(pipe, alpha):
    latents = []

    def keep(p, i, t, kwargs):
        latents.append(kwargs["latents"].clone())
        return {}

    out = pipe(
        PROMPT,
        cross_attention_guidance_scale=alpha,
        generator=gen(),
        callback_on_step_end=keep,
        **sd_kwargs(),
    )
    return out.images, latents


def _map_distance(pipe, guidance_latents, edit_latents):
    """Sum over steps 1.. of the L1 distance of E's conditional maps to G's at each step's input latent."""
    embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    timesteps = pipe.scheduler.timesteps
    store, total = AttentionStore(), 0.0
    with attach(pipe.guidance_unet, store), attach(pipe.unet, store), torch.no_grad():
        for i in range(1, len(timesteps)):
            with store.record():
                pipe.guidance_unet(guidance_latents[i - 1], timesteps[i], embeds)
            with store.guide(dict(store.maps)):
                pipe.unet(edit_latents[i - 1], timesteps[i], embeds)
            total += store.loss.sum().item()
    return total


def test_guidance_pulls_e_maps_toward_g_and_changes_the_image():
    pipe = blend_pipe()
    guidance_latents = []
    plain_pipe(pipe.guidance_unet)(
        PROMPT,
        guidance_scale=3.0,
        generator=gen(),
        callback_on_step_end=lambda p, i, t, kw: guidance_latents.append(kw["latents"].clone()) or {},
        **sd_kwargs(),
    )
    distances, images = [], []
    for alpha in (0.0, 0.3, 1.0):
        image, latents = _trajectory(pipe, alpha)
        distances.append(_map_distance(pipe, guidance_latents, latents))
        images.append(image)
    assert distances[0] > distances[1] > distances[2]
    assert not np.allclose(images[0], images[2], atol=1e-3)


@pytest.mark.parametrize("scheduler", ["ddim_eta", "dpm_multistep"])
def test_lockstep_equals_two_phase(scheduler):
    """G and E have their own scheduler state and noise stream, so the interleaving cannot matter."""
    pipe = blend_pipe()
    eta = 0.0
    if scheduler == "ddim_eta":
        eta = 0.7  # stochastic DDIM: each trajectory draws noise from its own generator copy
    else:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    kwargs = sd_kwargs(cross_attention_guidance_scale=1.0, eta=eta, return_reference=True)
    lockstep = pipe(PROMPT, generator=gen(), schedule="lockstep", **kwargs)
    two_phase = pipe(PROMPT, generator=gen(), schedule="two_phase", **kwargs)
    np.testing.assert_array_equal(lockstep.images, two_phase.images)
    np.testing.assert_array_equal(lockstep.reference_images, two_phase.reference_images)


def test_each_image_is_independent_of_the_batch():
    """The loss is summed over the batch, so an image's update does not depend on its batch mates.

    (A batch mean would halve each update: a change of ~1e-2 here; batched CPU kernels differ ~1e-4.)
    """
    pipe = blend_pipe()
    prompts = [PROMPT, "a red cat on the beach"]
    kwargs = sd_kwargs(cross_attention_guidance_scale=1.0)
    batched = pipe(prompts, generator=[gen(3), gen(4)], **kwargs).images
    for i, (prompt, seed) in enumerate(zip(prompts, (3, 4), strict=True)):
        single = pipe(prompt, generator=gen(seed), **kwargs).images[0]
        half = pipe(prompt, generator=gen(seed), **{**kwargs, "cross_attention_guidance_scale": 0.5}).images[
            0
        ]
        np.testing.assert_allclose(batched[i], single, atol=1e-3)
        assert np.abs(single - half).max() > 5e-3


def test_lora_adapters_equal_two_unets(lora_unet):
    """G/E as two adapters on one UNet == two UNets with those adapters merged into their weights."""
    comps = tiny_sd_components(0)
    kwargs = sd_kwargs(cross_attention_guidance_scale=1.0, return_reference=True)
    adapters = DreamBlendPipeline(**{**comps, "unet": lora_unet})
    adapters.set_progress_bar_config(disable=True)
    lora_unet.set_adapters(["early"])  # the state the call must restore
    out = adapters(PROMPT, guidance_adapter="early", edit_adapter="late", generator=gen(), **kwargs)
    assert lora_unet.active_adapters() == ["early"]
    two = DreamBlendPipeline(
        **{**comps, "unet": merged_copy(lora_unet, "late")}, guidance_unet=merged_copy(lora_unet, "early")
    )
    two.set_progress_bar_config(disable=True)
    expected = two(PROMPT, generator=gen(), **kwargs)
    np.testing.assert_allclose(out.images, expected.images, atol=1e-4)
    np.testing.assert_allclose(out.reference_images, expected.reference_images, atol=1e-4)
    guided_off = adapters(
        PROMPT, guidance_adapter="early", edit_adapter="late", generator=gen(), **sd_kwargs()
    )
    assert not np.allclose(out.images, guided_off.images, atol=1e-3)  # sanity: the default alpha guides too


def test_base_model_as_guidance_when_only_e_has_adapters(lora_unet):
    """One UNet, no guidance adapter named: G is the base model (adapters off), E the active adapters."""
    comps = tiny_sd_components(0)
    lora_unet.set_adapters(["late"])
    pipe = DreamBlendPipeline(**{**comps, "unet": lora_unet})
    pipe.set_progress_bar_config(disable=True)
    kwargs = sd_kwargs(cross_attention_guidance_scale=1.0, return_reference=True)
    out = pipe(PROMPT, generator=gen(), **kwargs)
    two = DreamBlendPipeline(
        **{**comps, "unet": merged_copy(lora_unet, "late")}, guidance_unet=merged_copy(lora_unet, None)
    )
    two.set_progress_bar_config(disable=True)
    expected = two(PROMPT, generator=gen(), **kwargs)
    np.testing.assert_allclose(out.images, expected.images, atol=1e-4)
    np.testing.assert_allclose(out.reference_images, expected.reference_images, atol=1e-4)
    assert lora_unet.active_adapters() == ["late"]
    # weights as {name: weight}: half of "late" differs from all of it
    half = pipe(PROMPT, edit_adapter={"late": 0.5}, generator=gen(), **sd_kwargs())
    assert not np.allclose(half.images, out.images, atol=1e-4)


def test_v_prediction_model_uses_a_ten_times_smaller_default_alpha():
    options = {"prediction_type": "v_prediction", "upcast_attention": True, "use_linear_projection": True}
    pipe = blend_pipe(**options)
    default = pipe(PROMPT, generator=gen(), **sd_kwargs()).images
    explicit = pipe(PROMPT, cross_attention_guidance_scale=0.01, generator=gen(), **sd_kwargs()).images
    plain = pipe(PROMPT, cross_attention_guidance_scale=0.0, generator=gen(), **sd_kwargs()).images
    np.testing.assert_array_equal(default, explicit)
    assert np.isfinite(default).all() and not np.array_equal(default, plain)


def test_guidance_steps_select_the_guided_steps(monkeypatch):
    pipe = blend_pipe()
    guided = []
    original = DreamBlendSampler.guided_update

    def spy(self, i, *args):
        guided.append(i)
        return original(self, i, *args)

    monkeypatch.setattr(DreamBlendSampler, "guided_update", spy)
    kwargs = sd_kwargs(cross_attention_guidance_scale=1.0)
    pipe(PROMPT, generator=gen(), guidance_steps=(0.0, 0.5), **kwargs)
    pipe(PROMPT, generator=gen(), guidance_steps=[0, -1], **kwargs)
    none = pipe(PROMPT, generator=gen(), guidance_steps=(0.0, 0.0), **kwargs).images
    assert guided == [0, 1, 0, STEPS - 1]
    plain = pipe(PROMPT, generator=gen(), cross_attention_guidance_scale=0.0, **sd_kwargs()).images
    np.testing.assert_array_equal(none, plain)
    with pytest.raises(ValueError, match="out of range"):
        pipe(PROMPT, guidance_steps=[STEPS], **kwargs)
    with pytest.raises(ValueError, match="0 <= start <= end <= 1"):
        pipe(PROMPT, guidance_steps=(0.5, 0.2), **kwargs)
    with pytest.raises(TypeError, match="guidance_steps"):
        pipe(PROMPT, guidance_steps=["all"], **kwargs)


def test_guided_pass_of_e_stops_after_its_last_cross_attention_layer():
    """E's output convolution runs once per step (its CFG pass), not in the guided pass too."""
    pipe = blend_pipe()
    calls = []
    pipe.unet.conv_out.register_forward_hook(lambda *args: calls.append(1))
    pipe(PROMPT, generator=gen(), **sd_kwargs(cross_attention_guidance_scale=1.0))
    assert len(calls) == STEPS


def test_layers_tokens_and_head_mean_reach_the_guidance():
    pipe = blend_pipe()
    kwargs = sd_kwargs(cross_attention_guidance_scale=1.0)
    full = pipe(PROMPT, generator=gen(), **kwargs).images
    for options in ({"attention_layers": ["up_blocks.*"]}, {"attention_tokens": [4, 5]}, {"head_mean": True}):
        image = pipe(PROMPT, generator=gen(), **options, **kwargs).images
        assert np.isfinite(image).all() and not np.array_equal(image, full), options
    with pytest.raises(ValueError, match="matches no cross-attention layer"):
        pipe(PROMPT, attention_layers=["nope.*"], **kwargs)


def test_non_finite_update_is_skipped_with_a_warning():
    """A NaN reference (here: G produces NaN) gives NaN gradients; E's latent must not take them."""
    pipe = blend_pipe()
    pipe.guidance_unet.conv_in.register_forward_hook(lambda module, args, out: out * float("nan"))
    with pytest.warns(RuntimeWarning, match=f"skipped {STEPS} non-finite"):
        guided = pipe(PROMPT, cross_attention_guidance_scale=1.0, generator=gen(), **sd_kwargs()).images
    plain = pipe(PROMPT, cross_attention_guidance_scale=0.0, generator=gen(), **sd_kwargs()).images
    np.testing.assert_array_equal(guided, plain)


def test_bfloat16_unets_take_the_update_in_float32():
    """In half precision the update (alpha * grad, small) still lands: latents stay float32."""
    pipe = blend_pipe().to(torch.bfloat16)
    seen = []
    kwargs = sd_kwargs(output_type="latent")

    def keep(p, i, t, kw):
        seen.append(kw["latents"].dtype)
        return {}

    guided = pipe(
        PROMPT, cross_attention_guidance_scale=1.0, generator=gen(), callback_on_step_end=keep, **kwargs
    )
    plain = pipe(PROMPT, cross_attention_guidance_scale=0.0, generator=gen(), **kwargs)
    assert seen == [torch.float32] * STEPS
    assert torch.isfinite(guided.images).all()
    assert not torch.equal(guided.images, plain.images)


def test_callback_can_change_e_latents_and_processors_are_restored():
    pipe = blend_pipe()
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    steps = []

    def zero_last(p, i, t, kw):
        steps.append(i)
        return {"latents": torch.zeros_like(kw["latents"])} if i == STEPS - 1 else {}

    out = pipe(PROMPT, generator=gen(), callback_on_step_end=zero_last, **sd_kwargs(output_type="latent"))
    assert steps == list(range(STEPS)) and torch.count_nonzero(out.images) == 0
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before
    assert all(p.requires_grad for p in pipe.unet.parameters())  # frozen only during the call
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(PROMPT, callback_on_step_end=zero_last, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_tuple_output_and_scheduler_untouched_for_the_user():
    pipe = blend_pipe()
    images, reference, nsfw = pipe(PROMPT, generator=gen(), return_dict=False, **sd_kwargs())
    assert images.shape == (1, 16, 16, 3) and reference is None and nsfw is None
    assert isinstance(pipe.scheduler, DDIMScheduler)
