"""DreamBlendProcessor: a drop-in ``AttnProcessor2_0`` that can capture or guide cross-attention.

Self-attention and unselected layers run ``F.scaled_dot_product_attention`` exactly as the stock
processor does; selected cross-attention layers route the attention core through
:func:`dreamblend.ops.capture_attention` (record) or :func:`dreamblend.ops.guided_attention`
(guide). Prologue and epilogue (spatial/group norm, ``norm_cross``, ``norm_q/k``, ``to_out``,
residual, ``rescale_output_factor``) follow the stock processor line for line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamblend import ops
from dreamblend.store import AttentionStore, LayerPlan


class DreamBlendProcessor:
    """Attention processor for diffusers ``Attention`` modules.

    With ``store=None`` (or the store off) it equals ``AttnProcessor2_0``. Install one instance on
    every layer: ``unet.set_attn_processor(DreamBlendProcessor(store))``.
    """

    def __init__(self, store: AttentionStore | None = None) -> None:
        self.store = store

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = self.project_qkv(attn, hidden_states, encoder_hidden_states)

        query, key, value = split_heads(attn, query, key, value, attn.norm_q, attn.norm_k)
        head_dim = query.shape[-1]

        plan = None
        if self.store is not None:
            plan = self.store.plan(attn, query.shape[2], key.shape[2], query.device)
        if plan is None:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        else:
            if attention_mask is not None:
                raise ValueError(
                    f"layer {plan.name!r}: capturing attention maps with an attention mask is not supported; "
                    "drop encoder_attention_mask or exclude the layer via AttentionStore(layers=...)"
                )
            hidden_states = self._attend(attn, plan, query, key, value)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = self.project_out(attn, hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def project_qkv(
        self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Query, key and value projections before the head split.

        Overridable so processors whose layers carry their own projection weights (e.g. Custom
        Diffusion) reuse everything else here instead of copying it.
        """
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        return query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)

    def project_out(self, attn: nn.Module, hidden_states: Tensor) -> Tensor:
        """Output projection and dropout (overridable like :meth:`project_qkv`)."""
        return attn.to_out[1](attn.to_out[0](hidden_states))

    def _attend(self, attn: nn.Module, plan: LayerPlan, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The captured/guided attention core; rows outside ``plan.rows`` get no maps (plain SDPA, or the
        backend's own ``capture_rows`` over the whole batch when it has one)."""
        store = self.store
        start, stop = plan_rows(plan, q.shape[0])
        # The store validated and cached the token indices on this device: straight to the backend, so
        # no per-layer check reads a device tensor back (a host sync on CUDA).
        backend = ops.resolve_backend(store.backend, q)
        capture_rows = getattr(backend, "capture_rows", None)
        if plan.mode == "record" and capture_rows is not None and (start, stop) != (0, q.shape[0]):
            # A backend that keeps maps for some rows only does the whole batch in one call.
            ops.check_qkv(q, k, v)
            out, maps = capture_rows(q, k, v, attn.scale, plan.tokens, store.head_mean, start, stop)
            store.put(plan, maps)
            return out
        sel = (q[start:stop], k[start:stop], v[start:stop])
        ops.check_qkv(*sel)
        if plan.mode == "record":
            out, result = backend.capture_attention(*sel, attn.scale, plan.tokens, store.head_mean)
        else:
            ref = store.check_ref(plan, sel[0], k.shape[2])
            out, result = backend.guided_attention(*sel, ref, attn.scale, plan.tokens, store.head_mean)
        store.put(plan, result)
        return join_rows(out, q, k, v, start, stop)


def split_heads(
    attn: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    norm_q: nn.Module | None,
    norm_k: nn.Module | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, L, H * D)`` projections as ``(B, H, L, D)`` heads, query and key through the given norms.

    The stock processors' steps in their order (UNet and SD3 layers, SD3's text projections with their
    ``norm_added_q/k``), so every processor here computes exactly what the stock one would.
    """
    batch_size, head_dim = query.shape[0], key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


def plan_rows(plan: LayerPlan, batch: int) -> tuple[int, int]:
    """The ``[start, stop)`` batch rows a plan captures (all by default); a layer-named error if none."""
    start, stop, _ = (plan.rows or slice(None)).indices(batch)
    if stop <= start:
        raise ValueError(f"layer {plan.name!r}: rows={plan.rows} selects no sample of a batch of {batch}")
    return start, stop


def join_rows(out: Tensor, q: Tensor, k: Tensor, v: Tensor, start: int, stop: int) -> Tensor:
    """``out``, rows ``[start, stop)`` of a ``(B, H, M, D)`` attention, plus plain SDPA on the rest."""
    if (start, stop) == (0, q.shape[0]):
        return out
    parts = [out]
    if start > 0:
        parts.insert(0, F.scaled_dot_product_attention(q[:start], k[:start], v[:start]))
    if stop < q.shape[0]:
        parts.append(F.scaled_dot_product_attention(q[stop:], k[stop:], v[stop:]))
    # Joined in (B, M, H, D) order, the order the callers reshape to (and the order SDPA and the
    # C++ backend write): one copy here and none in the reshape.
    return torch.cat([part.transpose(1, 2) for part in parts], dim=0).transpose(1, 2)


@contextmanager
def attach(model: nn.Module, store: AttentionStore | None = None) -> Iterator[AttentionStore]:
    """Install :class:`DreamBlendProcessor` on every attention layer of ``model`` for the block.

    The previous processors (whatever they were: stock, LoRA-aware, user-made) are restored on
    exit, also when the block raises. Yields the store (a fresh one if none is given).
    """
    with installed(model, store, DreamBlendProcessor) as store:
        yield store


@contextmanager
def installed(
    model: nn.Module, store: AttentionStore | None, processor: Callable[[AttentionStore], object]
) -> Iterator[AttentionStore]:
    """Install ``processor(store)`` on every attention layer of ``model`` for the block (see :func:`attach`).

    One processor instance serves every layer; the model's previous processors come back on exit.
    """
    store = AttentionStore() if store is None else store
    if not hasattr(model, "set_attn_processor") or not hasattr(model, "attn_processors"):
        raise TypeError(
            f"attach() needs a diffusers model with attention processors, got {type(model).__name__}"
        )
    previous = dict(model.attn_processors)
    store.bind(model)
    model.set_attn_processor(processor(store))
    try:
        yield store
    finally:
        model.set_attn_processor(dict(previous))
