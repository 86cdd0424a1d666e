"""Building DreamBlend pipelines the diffusers ways, and Custom Diffusion checkpoints under capture."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import (
    AttnAddedKVProcessor,
    AttnProcessor2_0,
)
from pipeline_helpers import (
    PROMPT,
    blend_pipe,
    blend_xl_pipe,
    custom_diffusion_unet,
    gen,
    plain_pipe,
    sd_kwargs,
)
from safetensors.torch import save_file

from dreamblend import AttentionStore, DreamBlendPipeline, attach
from dreamblend.checkpoints import ModelSpec, prepare_models, read_state_dict
from dreamblend.custom_diffusion import (
    CustomDiffusionDreamBlendProcessor,
    attach_dreamblend,
    load_custom_diffusion,
)
from dreamblend.testing import save_tiny_pipeline, tiny_sd_components, tiny_sd_pipeline


def test_from_pretrained_from_pipe_and_save(tmp_path):
    expected = blend_pipe()(PROMPT, generator=gen(), **sd_kwargs()).images
    base = save_tiny_pipeline(tiny_sd_pipeline(0), tmp_path / "base")
    guidance = plain_pipe(tiny_sd_components(1)["unet"])
    save_tiny_pipeline(guidance, tmp_path / "g")
    for spec in (str(tmp_path / "g"), tmp_path / "g" / "unet", guidance):  # folder, UNet folder, pipeline
        pipe = DreamBlendPipeline.from_pretrained(base, guidance_unet=spec)
        pipe.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(pipe(PROMPT, generator=gen(), **sd_kwargs()).images, expected, atol=1e-5)
    pipe.save_pretrained(tmp_path / "blend")
    reloaded = DreamBlendPipeline.from_pretrained(tmp_path / "blend")
    assert reloaded.guidance_unet is not None
    assert DreamBlendPipeline.from_pretrained(base).guidance_unet is None  # optional component

    stock = tiny_sd_pipeline(0)
    blend = DreamBlendPipeline.from_pipe(stock, guidance_unet=guidance.unet)
    assert blend.unet is stock.unet and blend.vae is stock.vae and blend.guidance_unet is guidance.unet
    back = StableDiffusionPipeline.from_pipe(blend)
    assert type(back) is StableDiffusionPipeline and back.unet is stock.unet


def test_model_cpu_offload_moves_g_and_e_through_the_hooks():
    """The offload hooks chain G's UNet too (on CPU they only exercise the bookkeeping, images equal)."""
    pipe = blend_pipe()
    call = sd_kwargs(cross_attention_guidance_scale=1.0, return_reference=True)
    expected = pipe(PROMPT, generator=gen(), **call)
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.guidance_unet, "_hf_hook")
    out = pipe(PROMPT, generator=gen(), **call)
    np.testing.assert_array_equal(out.images, expected.images)
    np.testing.assert_array_equal(out.reference_images, expected.reference_images)


# ------------------------------------------------------------------------------------- Custom Diffusion


def _with_weights_swapped_in(unet: torch.nn.Module) -> torch.nn.Module:
    """A copy whose own attention projections are the Custom Diffusion ones, on stock processors."""
    swapped = copy.deepcopy(unet)
    for name, processor in unet.attn_processors.items():
        attn = swapped.get_submodule(name.removesuffix(".processor"))
        with torch.no_grad():
            if getattr(processor, "train_kv", False):
                attn.to_k.weight.copy_(processor.to_k_custom_diffusion.weight)
                attn.to_v.weight.copy_(processor.to_v_custom_diffusion.weight)
            if getattr(processor, "train_q_out", False):
                attn.to_q.weight.copy_(processor.to_q_custom_diffusion.weight)
                attn.to_out[0].weight.copy_(processor.to_out_custom_diffusion[0].weight)
                attn.to_out[0].bias.copy_(processor.to_out_custom_diffusion[0].bias)
    swapped.set_attn_processor(AttnProcessor2_0())
    return swapped


@pytest.mark.parametrize("train_q_out", [False, True])
def test_custom_diffusion_projections_are_captured(train_q_out):
    # float64: the two UNets compute attention by different kernels (ours vs SDPA), which in float32
    # differ by a few ulps that depend on the CPU's vector unit.
    unet = custom_diffusion_unet(train_q_out).double()
    swapped = _with_weights_swapped_in(unet)
    g = gen(0)
    x, c = torch.randn(1, 4, 8, 8, generator=g).double(), torch.randn(1, 77, 32, generator=g).double()
    with torch.no_grad():
        stock = unet(x, 500, c).sample
    store = AttentionStore()
    with attach_dreamblend(unet, store), torch.no_grad(), store.record():
        assert isinstance(unet.attn_processors[next(iter(store.selected_layers(unet))) + ".processor"],
                          CustomDiffusionDreamBlendProcessor)  # fmt: skip
        captured = unet(x, 500, c).sample
    maps = dict(store.maps)
    with attach(swapped, store), torch.no_grad(), store.record():
        swapped(x, 500, c)
    torch.testing.assert_close(captured, stock, atol=1e-12, rtol=0)
    assert maps.keys() == store.maps.keys()
    for name, value in maps.items():
        torch.testing.assert_close(value, store.maps[name], atol=1e-13, rtol=0)
    assert all(type(p).__name__.startswith("CustomDiffusion") for p in unet.attn_processors.values())


def test_custom_diffusion_edit_model_in_the_pipeline(tmp_path):
    """alpha = 0 equals stock sampling with the Custom Diffusion UNet; the checkpoint round-trips."""
    edit = custom_diffusion_unet(train_q_out=True)
    pipe = DreamBlendPipeline(
        **{**tiny_sd_components(0), "unet": edit}, guidance_unet=tiny_sd_components(1)["unet"]
    )
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(PROMPT, cross_attention_guidance_scale=0.0, generator=gen(), **sd_kwargs()).images
    np.testing.assert_allclose(
        plain, plain_pipe(edit)(PROMPT, guidance_scale=3.0, generator=gen(), **sd_kwargs()).images, atol=1e-5
    )
    guided = pipe(PROMPT, cross_attention_guidance_scale=1.0, generator=gen(), **sd_kwargs()).images
    assert not np.allclose(guided, plain, atol=1e-4)

    edit.save_attn_procs(tmp_path, weight_name="cd.safetensors")
    edit.save_attn_procs(tmp_path, weight_name="cd.bin", safe_serialization=False)
    with pytest.raises(ValueError, match="pickle"):
        read_state_dict(tmp_path / "cd.bin")
    for state_dict in (
        read_state_dict(tmp_path / "cd.safetensors"),
        read_state_dict(tmp_path / "cd.bin", allow_pickle=True),
    ):
        fresh = tiny_sd_components(0)["unet"]
        layers = load_custom_diffusion(fresh, state_dict)
        assert len(layers) == len([n for n in fresh.attn_processors if "attn2" in n])
        reloaded = DreamBlendPipeline(
            **{**tiny_sd_components(0), "unet": fresh}, guidance_unet=pipe.guidance_unet
        )
        reloaded.set_progress_bar_config(disable=True)
        again = reloaded(PROMPT, cross_attention_guidance_scale=1.0, generator=gen(), **sd_kwargs()).images
        np.testing.assert_allclose(again, guided, atol=1e-5)
    with pytest.raises(ValueError, match="not a Custom Diffusion weight"):
        load_custom_diffusion(fresh, {"down_blocks.0.lora.weight": torch.zeros(1)})


def test_processors_that_cannot_be_captured_are_refused():
    unet = tiny_sd_components(0)["unet"]
    name = next(n for n in unet.attn_processors if "attn2" in n)
    unet.set_attn_processor({**unet.attn_processors, name: AttnAddedKVProcessor()})
    with pytest.raises(ValueError, match="AttnAddedKVProcessor.*set_default_attn_processor"):
        with attach_dreamblend(unet, AttentionStore()):
            pass
    assert isinstance(unet.attn_processors[name], AttnAddedKVProcessor)  # untouched


def test_learned_token_files_load_or_are_refused_clearly(tmp_path):
    """A folder with a learned token: loaded for SD (G and E share it), refused for SDXL's two encoders."""
    folder = tmp_path / "ti"
    tiny_sd_components(1)["unet"].save_pretrained(folder / "unet")
    vector = torch.randn(32, generator=gen(0))
    save_file({"<sks>": vector}, folder / "learned_embeds.safetensors")
    pipe = blend_pipe()
    assert prepare_models(pipe, ModelSpec(str(folder)), ModelSpec()) == {
        "guidance_adapter": None,
        "edit_adapter": None,
    }
    token_id = pipe.tokenizer.convert_tokens_to_ids("<sks>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], vector)

    with pytest.raises(ValueError, match="SDXL has two text encoders"):
        prepare_models(blend_xl_pipe(), ModelSpec(str(folder)), ModelSpec())
    save_file({"<sks>": torch.zeros(32, dtype=torch.int64)}, folder / "learned_embeds.safetensors")
    with pytest.raises(ValueError, match="is not a learned-token file"):
        prepare_models(blend_pipe(), ModelSpec(str(folder)), ModelSpec())


def test_custom_diffusion_modifier_tokens_load_with_their_weights(tmp_path):
    """diffusers' Custom Diffusion output: weights plus ``<new1>.safetensors``; G's own vector kept apart."""
    vectors = {}
    for role, seed in (("guidance", 1), ("edit", 2)):
        folder = tmp_path / role
        custom_diffusion_unet(train_q_out=False).save_attn_procs(folder)
        vectors[role] = torch.randn(32, generator=gen(seed))
        save_file({"<new1>": vectors[role]}, folder / "<new1>.safetensors")
    weights = "pytorch_custom_diffusion_weights.safetensors"
    pipe = blend_pipe()
    kwargs = prepare_models(
        pipe, ModelSpec(str(tmp_path / "guidance" / weights)), ModelSpec(str(tmp_path / "edit"))
    )
    token_id = pipe.tokenizer.convert_tokens_to_ids("<new1>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], vectors["edit"])
    assert torch.equal(kwargs["guidance_token_embeddings"]["<new1>"], vectors["guidance"])
    images = pipe("a <new1> dog", generator=gen(), **kwargs, **sd_kwargs()).images
    assert np.isfinite(images).all()

    # A pickled token file is refused like any pickle, not skipped (the prompt would silently change).
    (tmp_path / "edit" / "<new1>.safetensors").unlink()
    torch.save({"<new1>": vectors["edit"]}, tmp_path / "edit" / "<new1>.bin")
    with pytest.raises(ValueError, match="<new1>.bin is a pickle file"):
        prepare_models(blend_pipe(), ModelSpec(), ModelSpec(str(tmp_path / "edit")))
    pipe = blend_pipe()
    prepare_models(pipe, ModelSpec(), ModelSpec(str(tmp_path / "edit")), allow_pickle=True)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[-1], vectors["edit"])
