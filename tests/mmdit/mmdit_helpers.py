"""Inputs for the tiny SD3 and FLUX transformers (:mod:`dreamblend.testing_mmdit`) and an eager
reference for their joint attention.

The reference never re-derives q and k: it swaps ``torch.nn.functional.scaled_dot_product_attention``
for an explicit softmax while the *stock* processors run, so the maps and losses come from exactly the
q, k (normed, roped) that diffusers hands to attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import Tensor, nn

from dreamblend.store import is_attention, is_joint_attention
from dreamblend.testing_mmdit import tiny_flux, tiny_sd3

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


def _joint_inputs(
    model: nn.Module, latent: tuple[int, ...], timestep: float, batch: int, seed: int, dtype: torch.dtype
) -> dict:
    """Random latent (``(batch, *latent)``), text and pooled inputs, and one timestep for every sample."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return {
        "hidden_states": torch.randn(batch, *latent, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(batch, N_TEXT, cfg.joint_attention_dim, generator=g).to(dtype),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),
        "timestep": torch.full((batch,), timestep).to(dtype),
    }


def sd3_inputs(model: nn.Module, batch: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    return _joint_inputs(model, (model.config.in_channels, 8, 8), 500.0, batch, seed, dtype)


def flux_inputs(model: nn.Module, batch: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    side = 4
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(dtype)
    # Text ids differ per token so the rotary embedding moves text keys too (FLUX pipelines use zeros).
    txt_ids = torch.stack([torch.arange(N_TEXT)] * 3, dim=-1).to(dtype)
    inputs = _joint_inputs(model, (side * side, model.config.in_channels), 0.5, batch, seed, dtype)
    return {**inputs, "img_ids": img_ids, "txt_ids": txt_ids}


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


# ------------------------------------------------------------------------------------------------ LoRA files


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
