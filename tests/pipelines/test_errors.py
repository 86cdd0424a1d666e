"""Bad input to the pipelines and the loaders: each a clear error (or diffusers' warning) naming the fix."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from pipeline_helpers import PROMPT, blend_pipe, gen, sd_kwargs

from dreamblend import DreamBlendPipeline
from dreamblend.checkpoints import load_unet, read_state_dict
from dreamblend.testing import save_tiny_pipeline, tiny_sd_components


def test_architecture_mismatch_names_the_differing_config():
    comps = tiny_sd_components(0)
    other = UNet2DConditionModel(**{**comps["unet"].config, "cross_attention_dim": 64})
    pipe = DreamBlendPipeline(**comps, guidance_unet=other)
    with pytest.raises(ValueError, match=r"different architectures: cross_attention_dim \(G 64, E 32\)"):
        pipe(PROMPT, **sd_kwargs())
    deeper = UNet2DConditionModel(**{**comps["unet"].config, "layers_per_block": 1, "sample_size": 8})
    with pytest.raises(ValueError, match="layers_per_block.*sample_size.*same base model"):
        DreamBlendPipeline(**comps, guidance_unet=deeper)(PROMPT, **sd_kwargs())


def test_models_that_do_not_fit_the_pipeline():
    comps = tiny_sd_components(0)
    wide = {**comps["unet"].config, "cross_attention_dim": 64}
    pipe = DreamBlendPipeline(
        **{**comps, "unet": UNet2DConditionModel(**wide)}, guidance_unet=UNet2DConditionModel(**wide)
    )
    with pytest.raises(ValueError, match="text embeddings of width 64.*produces 32"):
        pipe(PROMPT, **sd_kwargs())
    inpaint = {**comps["unet"].config, "in_channels": 9}
    pipe = DreamBlendPipeline(
        **{**comps, "unet": UNet2DConditionModel(**inpaint)}, guidance_unet=UNet2DConditionModel(**inpaint)
    )
    with pytest.raises(ValueError, match="9 input channels.*4-channel latents"):
        pipe(PROMPT, **sd_kwargs())


def test_guidance_pipeline_must_share_vae_and_text_encoder():
    comps = tiny_sd_components(0)
    same = StableDiffusionPipeline(**{**tiny_sd_components(0), "unet": tiny_sd_components(1)["unet"]})
    assert DreamBlendPipeline(**comps, guidance_unet=same).guidance_unet is same.unet  # equal weights: fine
    other = StableDiffusionPipeline(**tiny_sd_components(1))  # its own text encoder and VAE
    with pytest.raises(ValueError, match="guidance pipeline's vae differs"):
        DreamBlendPipeline(**comps, guidance_unet=other)


def test_missing_or_unknown_adapters(lora_unet):
    comps = tiny_sd_components(0)
    single = DreamBlendPipeline(**comps)
    with pytest.raises(ValueError, match="needs a guidance model G.*guidance_unet=") as error:
        single(PROMPT, **sd_kwargs())
    assert "--" not in str(error.value)  # a Python caller is not told about command-line options
    pipe = DreamBlendPipeline(**{**comps, "unet": lora_unet})
    with pytest.raises(ValueError, match=r"unknown edit adapter\(s\) \['lat'\].*\['early', 'late'\]"):
        pipe(PROMPT, guidance_adapter="early", edit_adapter="lat", **sd_kwargs())
    with pytest.raises(ValueError, match="same model"):
        pipe(PROMPT, guidance_adapter="late", edit_adapter="late", **sd_kwargs())
    two = DreamBlendPipeline(**comps, guidance_unet=tiny_sd_components(1)["unet"])
    with pytest.raises(ValueError, match="guidance UNet has no LoRA adapters loaded.*load_lora_weights"):
        two(PROMPT, guidance_adapter="early", **sd_kwargs())


@pytest.mark.parametrize("alpha", [-0.1, math.nan, math.inf, "0.1"])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="must be a finite number >= 0.*use 0 to turn guidance off"):
        blend_pipe()(PROMPT, cross_attention_guidance_scale=alpha, **sd_kwargs())


def test_bad_schedule():
    with pytest.raises(ValueError, match="'lockstep'.*'two_phase'"):
        blend_pipe()(PROMPT, schedule="parallel", **sd_kwargs())


def test_long_prompt_is_truncated_with_diffusers_warning():
    """Like StableDiffusionPipeline: tokens past the tokenizer's 77 are dropped with a warning."""
    pipe = blend_pipe()
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        long_prompt = " ".join(["a sks dog in the jungle"] * 20) + " wearing a wizard hat"
        image = pipe(long_prompt, cross_attention_guidance_scale=0.5, generator=gen(), **sd_kwargs()).images
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert any("truncated because CLIP can only handle sequences up to 77 tokens" in m for m in messages)
    assert torch.isfinite(torch.from_numpy(image)).all()
    with pytest.raises(ValueError, match="out of range for a text sequence of N=77"):
        pipe(PROMPT, cross_attention_guidance_scale=0.5, attention_tokens=[80], **sd_kwargs())


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path):
    unet = tiny_sd_components(1)["unet"]
    unet.save_pretrained(tmp_path / "g" / "unet", safe_serialization=False)
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.bin is a pickle file.*allow_pickle=True"):
        load_unet(tmp_path / "g")
    loaded = load_unet(tmp_path / "g", allow_pickle=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), unet.parameters(), strict=True))
    base = save_tiny_pipeline(StableDiffusionPipeline(**tiny_sd_components(0)), tmp_path / "base")
    with pytest.raises(ValueError, match="pickle file"):
        DreamBlendPipeline.from_pretrained(base, guidance_unet=str(tmp_path / "g"))
    torch.save({"w": torch.zeros(1)}, tmp_path / "lora.pt")
    with pytest.raises(ValueError, match="--allow-pickle"):
        read_state_dict(tmp_path / "lora.pt")
    assert read_state_dict(tmp_path / "lora.pt", allow_pickle=True)["w"].shape == (1,)


def test_missing_model_paths():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_unet("/nonexistent/checkpoint-100")
    with pytest.raises(FileNotFoundError, match="not a hub id"):
        load_unet("./step-100")
