"""Tiny, offline, deterministic SD3 and FLUX fixtures (the MMDiT counterpart of :mod:`dreamblend.testing`).

Pipeline, training and CLI tests all need the same small SD3/FLUX transformers and pipelines; they
live here, next to the UNet fixtures whose tokenizer, CLIP configs, VAE and seeding they reuse, so
every test folder imports them instead of keeping its own copy. Like those fixtures they are built
from configs with seeded random weights and leave the caller's global RNG alone.
"""

from __future__ import annotations

import string
from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from dreamblend.testing import TINY_WORDS, _seeded, _text_config, _tiny_vae, tiny_clip_tokenizer

__all__ = [
    "tiny_flux",
    "tiny_flux_components",
    "tiny_flux_pipeline_transformer",
    "tiny_sd3",
    "tiny_sd3_components",
    "tiny_t5_encoder",
    "tiny_t5_tokenizer",
]

# SD3 and FLUX VAEs shift latents before scaling and have no quant convs; the pipelines rely on the shift.
_FLOW_VAE = {"shift_factor": 0.1, "use_quant_conv": False, "use_post_quant_conv": False}


def tiny_sd3(seed: int = 0) -> SD3Transformer2DModel:
    """Two joint blocks (the last context_pre_only), an SD3.5 image-only attn2 in the first, RMS qk-norm."""
    return _seeded(
        seed,
        "transformer",
        lambda: SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
            qk_norm="rms_norm",
            dual_attention_layers=(0,),
        ),
    )


def tiny_flux(
    seed: int = 0, *, in_channels: int = 4, num_single_layers: int = 2, guidance_embeds: bool = False
) -> FluxTransformer2DModel:
    """One double-stream block and ``num_single_layers`` single-stream ones, rotary axes [4, 4, 8]."""
    return _seeded(
        seed,
        "transformer",
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=in_channels,
            num_layers=1,
            num_single_layers=num_single_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=[4, 4, 8],
        ),
    )


def tiny_flux_pipeline_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """FLUX.1 [dev]-like: guidance-distilled, 16 input channels (4-channel latents in 2x2 patches)."""
    return tiny_flux(seed, in_channels=16, num_single_layers=1, guidance_embeds=True)


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer (sentencepiece unigram, "▁" word starts, pad 0, end 1, no start token) whose vocabulary
    is the tiny word list as whole words, plus letters and punctuation for anything else."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -1.0) for word in TINY_WORDS]
    pieces += [(ch, -5.0) for ch in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def tiny_t5_encoder(tokenizer: T5TokenizerFast, seed: int, component: str) -> T5EncoderModel:
    """A 2-layer T5 encoder, 32 wide (the tiny transformers' text width); ``component`` picks its seed."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return _seeded(seed, component, lambda: T5EncoderModel(config))


def _clip_with_projection(tokenizer: CLIPTokenizer, seed: int, component: str, hidden_act: str):
    """SD3's CLIP encoders: 16 wide (two of them fill the 32-wide text input), pooled projection 32."""
    config = _text_config(tokenizer, 16, projection_dim=32, hidden_act=hidden_act)
    return _seeded(seed, component, lambda: CLIPTextModelWithProjection(config))


def tiny_sd3_components(seed: int = 0, t5: bool = False) -> dict[str, Any]:
    """A tiny SD3 pipeline: two CLIP encoders (16 wide each, so their concatenation is the transformer's
    32-wide text input), a KL VAE with SD3's shift, and a 32-wide T5 with ``t5`` (else none: the stock
    pipeline feeds zeros for it)."""
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    components = {
        "transformer": tiny_sd3(seed),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": _tiny_vae(seed, 32, scaling_factor=1.5, **_FLOW_VAE),
        "text_encoder": _clip_with_projection(tokenizer, seed, "text_encoder", "quick_gelu"),
        "tokenizer": tokenizer,
        "text_encoder_2": _clip_with_projection(tokenizer_2, seed, "text_encoder_2", "gelu"),
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": None,
        "tokenizer_3": None,
    }
    if t5:
        tokenizer_3 = tiny_t5_tokenizer()
        components.update(
            text_encoder_3=tiny_t5_encoder(tokenizer_3, seed, "text_encoder_3"), tokenizer_3=tokenizer_3
        )
    return components


def tiny_flux_components(seed: int = 0) -> dict[str, Any]:
    """A tiny FLUX pipeline: CLIP (pooled, 32 wide), a 2-layer T5 (32 wide), a KL VAE with a shift."""
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    clip_config = _text_config(tokenizer, 32, projection_dim=32, hidden_act="quick_gelu")
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": _tiny_vae(seed, 32, scaling_factor=1.5, **_FLOW_VAE),
        "text_encoder": _seeded(seed, "text_encoder", lambda: CLIPTextModel(clip_config)),
        "tokenizer": tokenizer,
        "text_encoder_2": tiny_t5_encoder(tokenizer_2, seed, "text_encoder_2"),
        "tokenizer_2": tokenizer_2,
        "transformer": tiny_flux_pipeline_transformer(seed),
    }
