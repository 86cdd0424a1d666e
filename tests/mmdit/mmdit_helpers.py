"""Tiny SD3 and FLUX transformers and an eager reference for their joint attention.

The reference never re-derives q and k: it swaps ``torch.nn.functional.scaled_dot_product_attention``
for an explicit softmax while the *stock* processors run, so the maps and losses come from exactly the
q, k (normed, roped) that diffusers hands to attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import Tensor, nn

from dreamblend.store import is_attention, is_joint_attention

N_TEXT = 7  # text tokens the tiny models see


@dataclass(frozen=True)
class Case:
    """A tiny MMDiT model kind: how to build it, feed it, and where its text block sits."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[..., dict]
    stock: Callable[[], object]
    text_first: bool
    latent: str = "hidden_states"

    def text_block(self, length: int) -> slice:
        """Positions of the text tokens in a joint sequence of ``length``."""
        return slice(0, N_TEXT) if self.text_first else slice(length - N_TEXT, length)


def tiny_sd3(seed: int = 0) -> SD3Transformer2DModel:
    """Two joint blocks (the last context_pre_only), an SD3.5 image-only attn2 in the first, RMS qk-norm."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
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
    ).eval()


def sd3_inputs(model: nn.Module, batch: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return {
        "hidden_states": torch.randn(batch, cfg.in_channels, 8, 8, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(batch, N_TEXT, cfg.joint_attention_dim, generator=g).to(dtype),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),
        "timestep": torch.full((batch,), 500.0).to(dtype),
    }


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    """One double- and two single-stream blocks, rotary axes [4, 4, 8]."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()


def flux_inputs(model: nn.Module, batch: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    side = 4
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(dtype)
    # Text ids differ per token so the rotary embedding moves text keys too (FLUX pipelines use zeros).
    txt_ids = torch.stack([torch.arange(N_TEXT)] * 3, dim=-1).to(dtype)
    return {
        "hidden_states": torch.randn(batch, side * side, cfg.in_channels, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(batch, N_TEXT, cfg.joint_attention_dim, generator=g).to(dtype),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),
        "timestep": torch.full((batch,), 0.5).to(dtype),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }


CASES = {
    "sd3": Case("sd3", tiny_sd3, sd3_inputs, JointAttnProcessor2_0, text_first=False),
    "flux": Case("flux", tiny_flux, flux_inputs, FluxAttnProcessor, text_first=True),
}


def joint_layers(model: nn.Module) -> list[str]:
    return [name for name, mod in model.named_modules() if is_joint_attention(mod)]


def run(model: nn.Module, inputs: dict) -> Tensor:
    return model(**inputs, return_dict=False)[0]


@contextmanager
def eager_attention(model: nn.Module, on_probs: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Every SDPA call inside ``model`` becomes an explicit softmax; ``on_probs(layer, P)`` sees each P.

    ``P`` is ``(B, H, L, L)`` in float64, part of the autograd graph.
    """
    state: dict[str, str] = {}
    hooks = [
        mod.register_forward_pre_hook(lambda *_, name=name: state.__setitem__("layer", name))
        for name, mod in model.named_modules()
        if is_attention(mod)
    ]
    real = torch.nn.functional.scaled_dot_product_attention

    def explicit(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        assert attn_mask is None and not is_causal and dropout_p == 0.0
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        probs = torch.softmax(query.double() @ key.double().transpose(-1, -2) * scale, dim=-1)
        on_probs(state["layer"], probs)
        return (probs @ value.double()).to(query.dtype)

    torch.nn.functional.scaled_dot_product_attention = explicit
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
        for hook in hooks:
            hook.remove()


def stock_probs(case: Case, model: nn.Module, inputs: dict) -> dict[str, Tensor]:
    """``{joint layer: P}`` of the stock processors, float64 ``(B, H, L, L)``."""
    model.set_attn_processor(case.stock())
    joint = set(joint_layers(model))
    probs: dict[str, Tensor] = {}
    with (
        torch.no_grad(),
        eager_attention(model, lambda name, p: probs.update({name: p} if name in joint else {})),
    ):
        run(model, inputs)
    return probs


def image_text_maps(case: Case, probs: Tensor) -> Tensor:
    """Image-query rows x text-key columns of a joint ``P``, image positions in sequence order."""
    length = probs.shape[-1]
    text = case.text_block(length)
    image = torch.ones(length, dtype=torch.bool)
    image[text] = False
    return probs[:, :, image][..., text]


def eager_latent_grad(
    case: Case, model: nn.Module, inputs: dict, ref: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """Per-sample loss (DESIGN §2: ``mean_h sum |A - ref|`` summed over layers) and its latent gradient."""
    model.set_attn_processor(case.stock())
    joint = set(joint_layers(model))
    losses: list[Tensor] = []

    def score(name: str, probs: Tensor) -> None:
        if name in joint:
            losses.append((image_text_maps(case, probs) - ref[name].double()).abs().sum((2, 3)).mean(1))

    latent = inputs[case.latent].clone().requires_grad_()
    with eager_attention(model, score):
        run(model, {**inputs, case.latent: latent})
    loss = torch.stack(losses).sum(0)
    (grad,) = torch.autograd.grad(loss.sum(), latent)
    return loss.detach(), grad


# ---------------------------------------------------------------------------------------------- pipelines


def _clip_text_encoder(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def _tiny_vae(seed: int):
    """A two-level KL VAE (4 latent channels, downscale 2) with SD3/FLUX-style scaling and shift."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=1.5,
        shift_factor=0.1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    return vae


def tiny_sd3_components(seed: int = 0, t5: bool = False) -> dict:
    """A tiny SD3 pipeline: two CLIP encoders (16 wide each, so their concatenation is the transformer's
    32-wide text input), a KL VAE with SD3's shift, and a 32-wide T5 with ``t5`` (else none: the stock
    pipeline feeds zeros for it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dreamblend.testing import tiny_clip_tokenizer

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    components = {
        "transformer": tiny_sd3(seed),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": _tiny_vae(seed),
        "text_encoder": _clip_text_encoder(tokenizer, seed + 2),
        "tokenizer": tokenizer,
        "text_encoder_2": _clip_text_encoder(tokenizer_2, seed + 3),
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": None,
        "tokenizer_3": None,
    }
    if t5:
        tokenizer_3 = tiny_t5_tokenizer()
        components.update(text_encoder_3=_t5_encoder(tokenizer_3, seed + 4), tokenizer_3=tokenizer_3)
    return components


def tiny_t5_tokenizer():
    """A T5 tokenizer (sentencepiece unigram, "▁" word starts, pad 0, end 1, no start token) whose vocabulary
    is the tiny word list as whole words, plus letters and punctuation for anything else."""
    import string

    from transformers import T5TokenizerFast

    from dreamblend.testing import TINY_WORDS

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -1.0) for word in TINY_WORDS]
    pieces += [(ch, -5.0) for ch in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _t5_encoder(tokenizer, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
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
    return T5EncoderModel(config).eval()


def tiny_flux_pipeline_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """FLUX.1 [dev]-like: guidance-distilled, 16 input channels (4-channel latents in 2x2 patches)."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=[4, 4, 8],
    ).eval()


def tiny_flux_components(seed: int = 0) -> dict:
    """A tiny FLUX pipeline: CLIP (pooled, 32 wide), a 2-layer T5 (32 wide), a KL VAE with a shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreamblend.testing import tiny_clip_tokenizer

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed + 2)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": _tiny_vae(seed),
        "text_encoder": clip,
        "tokenizer": tokenizer,
        "text_encoder_2": _t5_encoder(tokenizer_2, seed + 3),
        "tokenizer_2": tokenizer_2,
        "transformer": tiny_flux_pipeline_transformer(seed),
    }


def save_dreambooth_lora(pipeline_cls, transformer: nn.Module, folder, seed: int = 0):
    """A random LoRA on a copy of ``transformer``, saved as diffusers' DreamBooth-LoRA scripts for SD3
    and FLUX save theirs (``pipeline_cls.save_lora_weights``: keys ``transformer.*``); returns the file."""
    import copy
    from pathlib import Path

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trained = copy.deepcopy(transformer)
    torch.manual_seed(seed)
    targets = ["to_k", "to_q", "to_v", "to_out.0"]
    trained.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets))
    pipeline_cls.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(trained))
    return Path(folder) / "pytorch_lora_weights.safetensors"
