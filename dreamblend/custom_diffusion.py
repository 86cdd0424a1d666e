"""Custom Diffusion checkpoints under DreamBlend capture and guidance.

A Custom Diffusion checkpoint lives in its attention processors: they carry their own key/value (and
optionally query/output) projections. Installing the plain :class:`DreamBlendProcessor` over them
would silently drop the fine-tuned weights, so :func:`attach_dreamblend` wraps each Custom Diffusion
processor in a variant that captures with its projections, and refuses processors it cannot
reproduce instead of replacing them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    CustomDiffusionAttnProcessor,
    CustomDiffusionAttnProcessor2_0,
    CustomDiffusionXFormersAttnProcessor,
    XFormersAttnProcessor,
)
from torch import Tensor, nn

from dreamblend.processor import DreamBlendProcessor
from dreamblend.store import AttentionStore, is_attention

CUSTOM_DIFFUSION_PROCESSORS = (
    CustomDiffusionAttnProcessor,
    CustomDiffusionAttnProcessor2_0,
    CustomDiffusionXFormersAttnProcessor,
)
# Processors whose math is the stock attention on the module's own projections.
PLAIN_PROCESSORS = (AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor, DreamBlendProcessor)


class CustomDiffusionDreamBlendProcessor(DreamBlendProcessor, nn.Module):
    """:class:`DreamBlendProcessor` that projects with a Custom Diffusion processor's weights.

    The wrapped processor stays a submodule, so its weights follow ``unet.to(...)`` while installed,
    and the original object is what :func:`attach_dreamblend` puts back.
    """

    def __init__(self, store: AttentionStore | None, custom: nn.Module) -> None:
        nn.Module.__init__(self)
        self.store = store
        self.custom = custom

    def project_qkv(
        self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        custom = self.custom
        if custom.train_q_out:
            query = custom.to_q_custom_diffusion(hidden_states).to(attn.to_q.weight.dtype)
        else:
            query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if not custom.train_kv:
            return query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        context = encoder_hidden_states.to(custom.to_k_custom_diffusion.weight.dtype)
        key = custom.to_k_custom_diffusion(context).to(query.dtype)
        value = custom.to_v_custom_diffusion(context).to(query.dtype)
        return query, key, value

    def project_out(self, attn: nn.Module, hidden_states: Tensor) -> Tensor:
        if not self.custom.train_q_out:
            return super().project_out(attn, hidden_states)
        out = self.custom.to_out_custom_diffusion
        return out[1](out[0](hidden_states))


def dreamblend_processors(model: nn.Module, store: AttentionStore | None) -> dict[str, object]:
    """DreamBlend processors for every attention layer of ``model``, keeping Custom Diffusion weights."""
    shared = DreamBlendProcessor(store)
    processors: dict[str, object] = {}
    for name, current in model.attn_processors.items():
        if isinstance(current, CustomDiffusionDreamBlendProcessor):
            current = current.custom
        if isinstance(current, CUSTOM_DIFFUSION_PROCESSORS):
            processors[name] = CustomDiffusionDreamBlendProcessor(store, current)
        elif isinstance(current, PLAIN_PROCESSORS):
            processors[name] = shared
        else:
            raise ValueError(
                f"layer {name!r} uses {type(current).__name__}, which DreamBlend cannot capture without "
                "dropping what it adds; supported are the stock attention processors and Custom Diffusion "
                "ones. Reset it with unet.set_default_attn_processor() (or unload the adapter that set it)"
            )
    return processors


@contextmanager
def attach_dreamblend(model: nn.Module, store: AttentionStore) -> Iterator[AttentionStore]:
    """Like :func:`dreamblend.attach`, but Custom Diffusion layers keep their own projections."""
    previous = dict(model.attn_processors)
    processors = dreamblend_processors(model, store)
    store.bind(model)
    model.set_attn_processor(processors)
    try:
        yield store
    finally:
        model.set_attn_processor(dict(previous))


def is_custom_diffusion_state_dict(state_dict: Mapping[str, object]) -> bool:
    return any("_custom_diffusion." in key for key in state_dict)


def load_custom_diffusion(unet: nn.Module, state_dict: Mapping[str, object]) -> list[str]:
    """Install the Custom Diffusion processors described by ``state_dict`` on ``unet``.

    Keys look like ``<layer>.processor.to_k_custom_diffusion.weight`` (the format of diffusers'
    ``save_attn_procs``); layers without weights keep their processor. Returns the layers changed.
    """
    groups: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for key, value in state_dict.items():
        if not isinstance(value, Tensor) or value.numel() == 0:
            continue  # the pickle format marks weightless layers with empty entries
        layer, sep, param = key.partition(".processor.")
        if not sep or "_custom_diffusion" not in param:
            raise ValueError(
                f"key {key!r} is not a Custom Diffusion weight (expected '<layer>.processor."
                "to_k_custom_diffusion.weight' as written by unet.save_attn_procs)"
            )
        groups[layer][param] = value
    if not groups:
        raise ValueError("the checkpoint holds no Custom Diffusion weights")
    attention = {name for name, module in unet.named_modules() if is_attention(module)}
    processors = dict(unet.attn_processors)
    for layer, params in groups.items():
        if layer not in attention:
            raise ValueError(
                f"Custom Diffusion weights for layer {layer!r}, which this UNet does not have; "
                "the checkpoint was trained on a different base model"
            )
        key_weight = params.get("to_k_custom_diffusion.weight")
        if key_weight is None or "to_v_custom_diffusion.weight" not in params:
            raise ValueError(f"Custom Diffusion weights for layer {layer!r} lack to_k/to_v projections")
        processor = CustomDiffusionAttnProcessor2_0(
            train_kv=True,
            train_q_out="to_q_custom_diffusion.weight" in params,
            hidden_size=key_weight.shape[0],
            cross_attention_dim=key_weight.shape[1],
            out_bias="to_out_custom_diffusion.0.bias" in params,
        )
        processor.load_state_dict(params)
        processors[f"{layer}.processor"] = processor.to(device=unet.device, dtype=unet.dtype)
    unet.set_attn_processor(processors)
    return sorted(groups)
