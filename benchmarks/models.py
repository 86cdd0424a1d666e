"""Published UNet architectures as configs, built with random weights, and their step inputs.

Benchmarks need the real layer shapes (channels, heads, transformer depths, latent size) but not
the trained weights, and nothing may be downloaded: so the UNet configs of SD1.5, SD2.1 (768 px,
v-prediction) and SDXL base are written out here. Text encoders and the VAE are not built: the
step and image benchmarks time the UNet loop, fed with random text embeddings of the right shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch import Tensor

from dreamblend.pipelines.blend import Conditioning
from dreamblend.testing import sd_ddim_scheduler, tiny_sd_components, tiny_sdxl_components
from dreamblend.toyworld.model import WEIGHTS_DIR as TOYWORLD_BASE

__all__ = [
    "MODELS",
    "SMOKE_MODELS",
    "TEXT_TOKENS",
    "ModelSpec",
    "build_unet",
    "make_inputs",
    "make_scheduler",
]

TEXT_TOKENS = 77

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

SD21_UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
    "upcast_attention": True,
}

SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}


@functools.cache
def _tiny_config(kind: str, sample_size: int) -> dict[str, Any]:
    """The UNet config of :mod:`dreamblend.testing`'s tiny fixtures (same module types), small latents."""
    build = tiny_sdxl_components if kind == "sdxl" else tiny_sd_components
    return dict(build(seed=0, sample_size=sample_size)["unet"].config)


@functools.cache
def _toyworld_config() -> dict[str, Any]:
    """The shipped toy-world base UNet's architecture (timing needs its shapes, not its weights)."""
    return dict(UNet2DConditionModel.load_config(TOYWORLD_BASE / "unet"))


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked architecture: UNet config, image size and the sampler settings it needs."""

    name: str
    config: Callable[[], dict[str, Any]]
    resolution: int
    prediction_type: str = "epsilon"
    vae_scale_factor: int = 8  # image pixels per latent pixel


MODELS: dict[str, ModelSpec] = {
    "sd15": ModelSpec("sd15", lambda: SD15_UNET, 512),
    "sd21": ModelSpec("sd21", lambda: SD21_UNET, 768, prediction_type="v_prediction"),
    "sdxl": ModelSpec("sdxl", lambda: SDXL_UNET, 1024),
    "toyworld": ModelSpec("toyworld", _toyworld_config, 64, vae_scale_factor=4),
}
SMOKE_MODELS: dict[str, ModelSpec] = {
    "tiny-sd": ModelSpec("tiny-sd", lambda: _tiny_config("sd", 8), 64),
    "tiny-sdxl": ModelSpec("tiny-sdxl", lambda: _tiny_config("sdxl", 16), 128),
}


def build_unet(spec: ModelSpec, seed: int, dtype: torch.dtype, device: torch.device) -> UNet2DConditionModel:
    """A frozen UNet with seeded random weights, initialized directly on ``device`` (fast on GPU)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**spec.config())
    # nn.Module.to: diffusers' override warns about keep-in-fp32 modules even when there are none.
    return torch.nn.Module.to(unet, dtype=dtype).eval().requires_grad_(False)


def make_scheduler(spec: ModelSpec) -> DDIMScheduler:
    """DDIM with SD's training schedule (the sampler of the DreamBlend paper), per prediction type."""
    return sd_ddim_scheduler(spec.prediction_type)


def make_inputs(
    unet: UNet2DConditionModel,
    spec: ModelSpec,
    batch: int,
    guidance_scale: float,
    device: torch.device,
    seed: int = 0,
) -> tuple[Tensor, Conditioning]:
    """A float32 start latent (as the pipelines keep it) and random CFG conditioning of the real shapes.

    Text embeddings have 77 tokens and the model's width; SDXL also gets pooled embeddings and
    micro-conditioning time ids, laid out ``[uncond; cond]`` like the pipelines' ``Conditioning``.
    """
    config, dtype = unet.config, unet.dtype
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    size = config.sample_size
    latents = torch.randn(batch, config.in_channels, size, size, generator=g).to(device)
    embeds = randn(2 * batch, TEXT_TOKENS, config.cross_attention_dim)
    kwargs = {}
    if config.addition_embed_type == "text_time":
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        px = float(spec.resolution)  # original size, crop offset, target size
        time_ids = torch.tensor([[px, px, 0.0, 0.0, px, px]], device=device, dtype=dtype)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": randn(2 * batch, pooled_dim),
            "time_ids": time_ids.repeat(2 * batch, 1),
        }
    return latents, Conditioning(embeds, guidance_scale, kwargs)
