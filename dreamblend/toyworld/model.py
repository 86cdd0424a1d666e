"""The toy world's text-to-image model: a real Stable Diffusion pipeline, small enough to train on a CPU.

Every component has SD1.x's type and layout (CLIP BPE tokenizer and causal text transformer, a KL
autoencoder, a cross-attention UNet, SD's noise schedule), so DreamBlend and every tool that takes an
SD checkpoint folder run on it unchanged. Sizes were chosen by timing a batch-32 training step on one
thread of a 2-core machine: 64x64 images become 16x16x4 latents, and the UNet cross-attends at 16x16
and 8x8 like SD's two finest levels. Train it with ``python -m dreamblend.toyworld.train``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dreamblend.testing import MODEL_MAX_LENGTH, sd_ddim_scheduler, write_tiny_tokenizer_files
from dreamblend.toyworld.vocab import VOCABULARY

__all__ = [
    "IMAGE_SIZE",
    "LATENT_SIZE",
    "TEXT_HIDDEN_SIZE",
    "base_model_path",
    "build_pipeline",
    "build_text_encoder",
    "build_tokenizer",
    "build_unet",
    "build_vae",
    "ddim_scheduler",
    "ddpm_scheduler",
    "save_pipeline",
]

IMAGE_SIZE = 64
LATENT_SIZE = 16
TEXT_HIDDEN_SIZE = 128
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "base"
TRAIN_COMMAND = (
    "python -m dreamblend.toyworld.train vae --out RUN && python -m dreamblend.toyworld.train base --out RUN "
    "&& python -m dreamblend.toyworld.train export --run RUN"
)


def build_tokenizer(path: str | Path) -> CLIPTokenizer:
    """SD's CLIP tokenizer class over the world's vocabulary, written to `path`: every word is one token."""
    folder = write_tiny_tokenizer_files(path, VOCABULARY)
    return CLIPTokenizer.from_pretrained(
        str(folder), model_max_length=MODEL_MAX_LENGTH, local_files_only=True
    )


def build_text_encoder(tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPTextModel:
    """A 3-layer causal CLIP text transformer (0.7 M parameters); its hidden size is the UNet's context size.

    Special-token ids come from the tokenizer so the pooled output picks the real end-of-text position.
    """
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=4 * TEXT_HIDDEN_SIZE,
        projection_dim=TEXT_HIDDEN_SIZE,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 16 + 2)
        return CLIPTextModel(config)


def build_vae(seed: int = 0, scaling_factor: float = 1.0) -> AutoencoderKL:
    """A 3-level KL autoencoder, 64x64x3 -> 16x16x4 (0.7 M parameters).

    Channels stay at 16 at full resolution because those convolutions dominate a CPU step; the training
    script measures `scaling_factor` (1 / latent std) and writes it into the config, as SD's VAE has.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 16 + 1)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=IMAGE_SIZE,
            scaling_factor=scaling_factor,
        )


def build_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD1.x's UNet layout at 1.5 M parameters: cross-attention at 16x16 and 8x8 and in the mid block.

    `attention_head_dim` is diffusers' legacy name for the number of heads: two heads (of 16 and 32
    channels) cost about 30 % less time per step than eight tiny ones.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 16)
        return UNet2DConditionModel(
            sample_size=LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            norm_num_groups=32,
            cross_attention_dim=TEXT_HIDDEN_SIZE,
            attention_head_dim=2,
        )


def ddim_scheduler() -> DDIMScheduler:
    """The sampler shipped with the pipeline: DDIM over SD1.x's training schedule."""
    return sd_ddim_scheduler()


def ddpm_scheduler() -> DDPMScheduler:
    """The training noise schedule: the same betas as `ddim_scheduler`, epsilon prediction."""
    config = ddim_scheduler().config
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=config.beta_schedule,
        clip_sample=False,
        prediction_type="epsilon",
    )


def build_pipeline(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer
) -> StableDiffusionPipeline:
    """The components as an SD pipeline with no safety checker (the world has nothing to filter)."""
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(
    pipe: StableDiffusionPipeline, folder: str | Path, dtype: torch.dtype = torch.float16
) -> Path:
    """Write `pipe` as a safetensors pipeline folder in `dtype`, leaving `pipe` itself untouched.

    The copy is converted, not `pipe`, so a float32 training model is never rounded by saving it. The
    text encoder stays float32: diffusers loads its own models as float32 whatever the files hold, but
    transformers keeps a stored float16, and a plain ``from_pretrained`` on a CPU would then mix dtypes.
    """
    folder = Path(folder)
    saved = copy.deepcopy(pipe).to(dtype=dtype)
    saved.text_encoder.to(torch.float32)
    saved.save_pretrained(str(folder), safe_serialization=True)
    return folder


def base_model_path() -> Path:
    """The shipped base model folder, loadable with `StableDiffusionPipeline.from_pretrained`."""
    if not (WEIGHTS_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no toy-world base weights in {WEIGHTS_DIR}; train them with: {TRAIN_COMMAND}"
        )
    return WEIGHTS_DIR
