"""Attention processors for MMDiT transformers (SD3, FLUX) that capture or guide text-image maps.

MMDiT models have no cross-attention: each block runs one attention over the image and text tokens
together. The map DreamBlend needs is the image queries' attention on the text keys, taken from that
joint softmax (a row of it sums to one over text *and* image keys). The processors here equal
diffusers' stock processors line for line when the store is off or does not select the layer, and
route selected layers through :func:`dreamblend.ops.joint_capture_attention` (record) or
:func:`dreamblend.ops.joint_guided_attention` (guide) otherwise, with the q and k the stock
processor would hand to attention (after ``norm_q/k`` and, for FLUX, the rotary embedding).

Layout of the joint sequence, as the models build it: SD3 puts the image tokens first and the text
after them; FLUX puts the text first. FLUX's single-stream blocks receive the concatenation as one
sequence; the text length comes from the double-stream blocks that run before them in the same
forward, so one processor instance must serve every layer (``attach`` installs it so).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

# The stock FLUX processor's own projection helper (plain or fused QKV), so the two cannot drift apart.
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections
from torch import Tensor, nn

from dreamblend.ops.joint import resolve_joint_backend
from dreamblend.processor import installed, join_rows, plan_rows, split_heads
from dreamblend.store import AttentionStore


class _MMDiTProcessor:
    """Store handling shared by the SD3 and FLUX processors: plan a layer, run the joint op on its rows."""

    def __init__(self, store: AttentionStore | None = None) -> None:
        self.store = store

    def _attend(
        self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, text: tuple[int, int], mask: Tensor | None
    ) -> Tensor | None:
        """The joint attention output ``(B, H, L, D)`` for a selected layer, or None to run the stock path.

        ``text`` is the ``(start, length)`` of the text block among the ``L`` positions.
        """
        if self.store is None:
            return None
        store = self.store
        num_image = q.shape[2] - text[1]
        plan = store.plan(attn, num_image, text[1], q.device, joint=True)
        if plan is None:
            return None
        if mask is not None:
            raise ValueError(
                f"layer {plan.name!r}: capturing attention maps with an attention mask is not supported; "
                "drop the attention mask or exclude the layer via AttentionStore(layers=...)"
            )
        start, stop = plan_rows(plan, q.shape[0])
        sel = (q[start:stop], k[start:stop], v[start:stop])
        # The store's tokens are checked indices on q's device already: the backend is called directly,
        # as DreamBlendProcessor does, so no layer re-validates them (a GPU sync per layer). The scale is
        # SDPA's default, which the stock processors use.
        backend = resolve_joint_backend(store.backend, q)
        options = (1.0 / math.sqrt(q.shape[-1]), text, plan.tokens, store.head_mean, False)
        if plan.mode == "record":
            out, result = backend.joint_capture_attention(*sel, *options)
        else:
            ref = store.check_ref(plan, sel[0], text[1], num_queries=num_image)
            out, result = backend.joint_guided_attention(*sel, ref, *options)
        store.put(plan, result)
        return join_rows(out, q, k, v, start, stop)


class SD3DreamBlendProcessor(_MMDiTProcessor):
    """Drop-in ``JointAttnProcessor2_0`` (SD3, SD3.5) that captures or guides through a store.

    With ``store=None`` (or the store off) it equals the stock processor. SD3.5's image-only ``attn2``
    layers run the stock path always.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor | tuple[Tensor, Tensor]:
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query, key, value = split_heads(
            attn,
            attn.to_q(hidden_states),
            attn.to_k(hidden_states),
            attn.to_v(hidden_states),
            attn.norm_q,
            attn.norm_k,
        )
        head_dim = query.shape[-1]

        if encoder_hidden_states is not None:
            context_query, context_key, context_value = split_heads(
                attn,
                attn.add_q_proj(encoder_hidden_states),
                attn.add_k_proj(encoder_hidden_states),
                attn.add_v_proj(encoder_hidden_states),
                attn.norm_added_q,
                attn.norm_added_k,
            )
            query = torch.cat([query, context_query], dim=2)
            key = torch.cat([key, context_key], dim=2)
            value = torch.cat([value, context_value], dim=2)

        out = None
        if encoder_hidden_states is not None:
            # The stock processor ignores attention_mask; so does this one (no mask reaches the op).
            text = (residual.shape[1], encoder_hidden_states.shape[1])
            out = self._attend(attn, query, key, value, text, None)
        if out is None:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxDreamBlendProcessor(_MMDiTProcessor):
    """Drop-in ``FluxAttnProcessor`` for FLUX's double- and single-stream blocks.

    With ``store=None`` (or the store off) it equals the stock processor, attention backend included
    (``set_attention_backend`` sets ``_attention_backend`` here as on the stock one). Captured layers
    use the roped q and k. Install one instance on every layer (single-stream layers learn the text
    length from the double-stream ones of the same forward).
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, store: AttentionStore | None = None) -> None:
        super().__init__(store)
        self.text_length: int | None = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Tensor | tuple[Tensor, Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        query, key, value, context_query, context_key, context_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            context_query = context_query.unflatten(-1, (-1, attn.head_dim))
            context_key = context_key.unflatten(-1, (-1, attn.head_dim))
            context_value = context_value.unflatten(-1, (-1, attn.head_dim))
            context_query = attn.norm_added_q(context_query)
            context_key = attn.norm_added_k(context_key)
            query = torch.cat([context_query, query], dim=1)
            key = torch.cat([context_key, key], dim=1)
            value = torch.cat([context_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        out = self._flux_attend(attn, query, key, value, encoder_hidden_states, attention_mask)
        if out is None:
            out = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        hidden_states = out.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]],
                dim=1,
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states

    def _flux_attend(
        self,
        attn: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        encoder_hidden_states: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor | None:
        """The captured/guided core in FLUX's ``(B, L, H, D)`` layout, or None for the stock path."""
        if encoder_hidden_states is not None:
            self.text_length = encoder_hidden_states.shape[1]
        if self.store is None or self.store.mode == "off":
            return None
        if self.text_length is None:
            raise RuntimeError(
                "a FLUX single-stream layer was asked for maps before any double-stream layer ran, so the "
                "text length is unknown; install one FluxDreamBlendProcessor on every layer "
                "(dreamblend.mmdit.attach does) and call the whole transformer"
            )
        if self._parallel_config is not None:
            raise ValueError(
                "capturing attention maps under context parallelism is not supported: each rank holds "
                "only part of the sequence; run the DreamBlend call without a parallel config"
            )
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = self._attend(attn, q, k, v, (0, self.text_length), mask)
        return None if out is None else out.transpose(1, 2)


def processor_for(model: nn.Module) -> type[_MMDiTProcessor]:
    """The DreamBlend processor class for an MMDiT transformer (SD3 or FLUX); a clear error otherwise."""
    if isinstance(model, FluxTransformer2DModel):
        return FluxDreamBlendProcessor
    if isinstance(model, SD3Transformer2DModel):
        return SD3DreamBlendProcessor
    raise TypeError(
        f"no MMDiT DreamBlend processor for {type(model).__name__}; supported: SD3Transformer2DModel, "
        "FluxTransformer2DModel (use dreamblend.attach for UNet2DConditionModel)"
    )


def check_replaceable(model: nn.Module) -> None:
    """Every layer must run a stock processor (or ours): replacing another would drop what it adds."""
    for name, processor in model.attn_processors.items():
        if not isinstance(processor, (JointAttnProcessor2_0, FluxAttnProcessor, _MMDiTProcessor)):
            raise ValueError(
                f"layer {name!r} uses {type(processor).__name__}, which DreamBlend cannot capture without "
                "dropping what it adds; supported are the stock JointAttnProcessor2_0 (SD3) and "
                "FluxAttnProcessor (FLUX). Unload what set it (e.g. pipe.unload_ip_adapter()) first"
            )


@contextmanager
def attach(model: nn.Module, store: AttentionStore | None = None) -> Iterator[AttentionStore]:
    """Install the model's DreamBlend processor (one instance) on every attention layer for the block.

    The previous processors come back on exit, also when the block raises. Yields the store.
    """
    processor = processor_for(model)
    check_replaceable(model)
    with installed(model, store, processor) as store:
        yield store
