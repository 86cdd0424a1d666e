"""Helpers for the DreamBlend pipeline tests: tiny SD/SDXL pairs built from configs, CPU only.

E is the tiny model with seed 0, G the one with seed 1: same architecture, different weights, like
two checkpoints of one fine-tuning run.
"""

from __future__ import annotations

import copy
import warnings

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0
from peft import LoraConfig

from dreamblend.pipelines import DreamBlendPipeline, DreamBlendXLPipeline
from dreamblend.testing import tiny_sd_components, tiny_sdxl_components

STEPS = 3
SIZE = 16  # pixels: 8 x 8 latents for the SD fixtures
PROMPT = "a sks dog in the jungle"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sd_kwargs(**overrides: object) -> dict:
    """Call arguments shared by the SD tests (3 DDIM steps, 16 px, numpy output)."""
    return {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "output_type": "np", **overrides}


def blend_pipe(edit_seed: int = 0, guidance_seed: int = 1, **options: object) -> DreamBlendPipeline:
    comps = tiny_sd_components(edit_seed, **options)
    pipe = DreamBlendPipeline(**comps, guidance_unet=tiny_sd_components(guidance_seed, **options)["unet"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_pipe(unet: torch.nn.Module, **options: object) -> StableDiffusionPipeline:
    """Stock Stable Diffusion with the same VAE/text encoder/scheduler and the given UNet."""
    pipe = StableDiffusionPipeline(**{**tiny_sd_components(0, **options), "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def blend_xl_pipe(scheduler: str = "ddim") -> DreamBlendXLPipeline:
    comps = tiny_sdxl_components(0, scheduler=scheduler)
    guidance = tiny_sdxl_components(1)["unet"]
    pipe = DreamBlendXLPipeline(**comps, guidance_unet=guidance, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_xl_pipe(unet: torch.nn.Module, scheduler: str = "ddim") -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline(
        **{**tiny_sdxl_components(0, scheduler=scheduler), "unet": unet}, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


LORA = {"r": 4, "lora_alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def add_random_lora(unet: torch.nn.Module, name: str, seed: int) -> None:
    """A LoRA adapter with random (non-zero) A and B, so it changes the model."""
    with warnings.catch_warnings():  # peft notes that a second adapter joins the first: intended here
        warnings.simplefilter("ignore", UserWarning)
        unet.add_adapter(LoraConfig(**LORA, init_lora_weights=False), adapter_name=name)
    generator = gen(seed)
    with torch.no_grad():
        for param_name, param in unet.named_parameters():
            if f"lora_A.{name}." in param_name or f"lora_B.{name}." in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def merged_copy(unet: torch.nn.Module, name: str | None) -> torch.nn.Module:
    """A copy of ``unet`` with adapter ``name`` merged into its base weights (None: the base model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(unet)
    if name is None:
        merged.disable_adapters()
        return merged
    merged.set_adapters([name])
    for module in merged.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[name])
    return merged


def custom_diffusion_unet(train_q_out: bool) -> torch.nn.Module:
    """The tiny E UNet with random Custom Diffusion processors on every cross-attention layer."""
    unet = tiny_sd_components(0)["unet"]
    generator = gen(5)
    processors = {}
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            processors[name] = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False)
            continue
        attn = unet.get_submodule(name.removesuffix(".processor"))
        processor = CustomDiffusionAttnProcessor2_0(
            train_kv=True,
            train_q_out=train_q_out,
            hidden_size=attn.to_q.out_features,
            cross_attention_dim=attn.to_k.in_features,
        )
        with torch.no_grad():
            for param in processor.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        processors[name] = processor
    unet.set_attn_processor(processors)
    return unet
