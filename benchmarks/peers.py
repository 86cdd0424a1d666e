"""The peers every end-to-end figure compares (DESIGN §6), as one table.

A peer decides two things: which attention processor runs on each layer, and how cross-attention
maps reach the guidance loss. Peers that are not ours get their maps the way published code does,
with module hooks on stock diffusers processors and the L1 loss in plain torch; they expose the
same ``record``/``guide``/``maps``/``loss`` surface as :class:`~dreamblend.AttentionStore`, so a
single guided-step implementation serves every peer and only the attention path differs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor
from torch import Tensor, nn

from dreamblend import AttentionStore, DreamBlendProcessor
from dreamblend.ops import resolve_backend
from dreamblend.ops.reference import l1_map_loss
from dreamblend.store import AllLayersScored, EndsAtLastLayer, is_attention, is_cross_attention

__all__ = ["PEERS", "Capture", "HookedMaps", "Peer", "attached"]


class HookedMaps:
    """Cross-attention maps collected by hooks on stock processors; L1 guidance loss in torch.

    ``recompute=False`` reads the probabilities that ``Attention.get_attention_scores`` materializes
    for the output (pix2pix-zero, Attend-and-Excite). ``recompute=True`` hooks ``to_q``/``to_k`` and
    recomputes ``softmax(scale * q k^T)`` next to a fused SDPA output, slicing the batch rows first.
    """

    def __init__(self, unets: Sequence[nn.Module], recompute: bool) -> None:
        self.maps: dict[str, Tensor] = {}
        self.losses: dict[str, Tensor] = {}
        self.mode = "off"
        self._rows: slice | None = None
        self._ref: Mapping[str, Tensor] = {}
        self._undo: list[Callable[[], object]] = []
        for unet in unets:  # G and E share layer names, so maps recorded on G key E's loss
            for name, module in unet.named_modules():
                if is_attention(module) and is_cross_attention(module):
                    (self._hook_qk if recompute else self._wrap_scores)(name, module)

    @property
    def loss(self) -> Tensor | None:
        """Per-sample loss summed over layers, ``(B,)``, as :attr:`AttentionStore.loss`."""
        return torch.stack(list(self.losses.values())).sum(dim=0) if self.losses else None

    @contextmanager
    def record(self, rows: slice | None = None) -> Iterator[HookedMaps]:
        self.maps = {}
        with self._active("record", rows):
            yield self

    @contextmanager
    def guide(self, ref_maps: Mapping[str, Tensor], rows: slice | None = None) -> Iterator[HookedMaps]:
        self.losses, self._ref = {}, ref_maps
        with self._active("guide", rows):
            yield self

    def run_for_loss(self, model: Callable[..., object], *args: object, **kwargs: object) -> None:
        """The whole model call, output and all: published guidance code runs the full forward."""
        model(*args, **kwargs)

    def close(self) -> None:
        """Remove every hook (the processors are reset by :func:`attached`)."""
        while self._undo:
            self._undo.pop()()

    @contextmanager
    def _active(self, mode: str, rows: slice | None) -> Iterator[None]:
        self.mode, self._rows = mode, rows
        try:
            yield
        finally:
            self.mode, self._rows, self._ref = "off", None, {}

    def _select(self, batch_first: Tensor) -> Tensor:
        return batch_first if self._rows is None else batch_first[self._rows]

    def _take(self, name: str, probs: Tensor) -> None:
        """Store ``probs`` ``(B, H, M, N)`` as a float32 map (float64 kept, as the ops keep it), or its
        L1 distance to the reference."""
        probs = probs.to(torch.promote_types(probs.dtype, torch.float32))
        if self.mode == "record":
            self.maps[name] = probs.detach()
        else:
            self.losses[name] = l1_map_loss(probs, self._ref[name], head_mean=False)

    def _wrap_scores(self, name: str, attn: nn.Module) -> None:
        original = attn.get_attention_scores

        def scores(query: Tensor, key: Tensor, attention_mask: Tensor | None = None) -> Tensor:
            probs = original(query, key, attention_mask)
            if self.mode != "off":  # (B*H, M, N), batch-major as head_to_batch_dim lays it out
                self._take(name, self._select(probs.unflatten(0, (-1, attn.heads))))
            return probs

        attn.get_attention_scores = scores
        self._undo.append(partial(delattr, attn, "get_attention_scores"))

    def _hook_qk(self, name: str, attn: nn.Module) -> None:
        pending: dict[str, Tensor] = {}

        def on_query(module: nn.Module, args: tuple, query: Tensor) -> None:
            if self.mode != "off":
                pending["q"] = self._select(query)

        def on_key(module: nn.Module, args: tuple, key: Tensor) -> None:
            query = pending.pop("q", None)
            if query is None:
                return
            q, k = attn.head_to_batch_dim(query), attn.head_to_batch_dim(self._select(key))
            self._take(name, attn.get_attention_scores(q, k).unflatten(0, (-1, attn.heads)))

        for linear, hook in ((attn.to_q, on_query), (attn.to_k, on_key)):
            self._undo.append(linear.register_forward_hook(hook).remove)


class NoMaps(EndsAtLastLayer):
    """The compute floor of a guided step: no map is captured, and the "loss" is a zero-weighted sum of
    every cross-attention layer's output, so E's conditional forward (as far as the last cross-attention
    layer, as ours runs it) and its input-gradient backward run through the same layers (SDPA
    everywhere) with no map, softmax recompute or L1 work at all."""

    def __init__(self, unets: Sequence[nn.Module]) -> None:
        self.maps: dict[str, Tensor] = {}
        self.losses: dict[str, Tensor] = {}
        self.mode = "off"
        self._names: set[str] = set()
        self._undo: list[Callable[[], object]] = []
        for unet in unets:
            for name, module in unet.named_modules():
                if is_attention(module) and is_cross_attention(module):
                    self._names.add(name)
                    self._undo.append(module.register_forward_hook(partial(self._on_output, name)).remove)

    @property
    def loss(self) -> Tensor | None:
        return torch.stack(list(self.losses.values())).sum(dim=0) if self.losses else None

    @contextmanager
    def record(self, rows: slice | None = None) -> Iterator[NoMaps]:
        self.maps = {}
        yield self

    @contextmanager
    def guide(self, ref_maps: Mapping[str, Tensor], rows: slice | None = None) -> Iterator[NoMaps]:
        self.losses, self.mode = {}, "guide"
        try:
            yield self
        finally:
            self.mode = "off"

    def close(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _on_output(self, name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self.mode == "guide":
            self.losses[name] = output.flatten(1).sum(dim=1) * 0.0
            if self._stop_early and len(self.losses) == len(self._names):
                raise AllLayersScored


Capture = AttentionStore | HookedMaps | NoMaps
UNets = Sequence[UNet2DConditionModel]


def _sdpa(unets: UNets) -> None:
    for unet in unets:
        unet.set_attn_processor(AttnProcessor2_0())


def _eager(unets: UNets, every_layer: bool) -> HookedMaps:
    for unet in unets:
        processors = {}
        for key in unet.attn_processors:
            cross = is_cross_attention(unet.get_submodule(key.removesuffix(".processor")))
            processors[key] = AttnProcessor() if every_layer or cross else AttnProcessor2_0()
        unet.set_attn_processor(processors)
    return HookedMaps(unets, recompute=False)


def _recompute(unets: UNets, processor: type) -> HookedMaps:
    for unet in unets:
        unet.set_attn_processor(processor())
    return HookedMaps(unets, recompute=True)


def _no_maps(unets: UNets) -> NoMaps:
    _sdpa(unets)
    return NoMaps(unets)


def _ours(unets: UNets, backend: str) -> AttentionStore:
    store = AttentionStore(backend=backend)
    for unet in unets:
        store.bind(unet)
        unet.set_attn_processor(DreamBlendProcessor(store))
    return store


def _always(device: torch.device) -> str | None:
    return None


def _needs_xformers(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "xformers runs on CUDA only"
    return None if importlib.util.find_spec("xformers") else "xformers is not installed"


def _needs_backend(backend: str, device: torch.device) -> str | None:
    if backend == "triton" and device.type != "cuda":
        return "Triton kernels are timed on CUDA only (the CPU interpreter is for debugging)"
    try:
        resolve_backend(backend, device)
    except RuntimeError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Peer:
    """One row of the comparison: how attention runs and how maps become a guidance loss.

    ``workload`` is what the peer runs per timestep: "plain" (one model's CFG pass, a plain SD
    image), "unguided" (G's and E's CFG passes) or "guided" (the DreamBlend step).
    """

    name: str
    workload: str
    install: Callable[[UNets], Capture | None]
    summary: str
    unavailable: Callable[[torch.device], str | None] = _always
    backend: str | None = None


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer("plain", "plain", _sdpa, "one UNet, classifier-free guidance, SDPA: a plain SD step/image"),
        Peer("floor", "unguided", _sdpa, "G and E CFG passes with SDPA, no capture or guidance"),
        Peer(
            "guided_floor",
            "guided",
            _no_maps,
            "the guided step's passes (E's conditional forward + input-gradient backward too), SDPA, "
            "no maps or loss: the compute floor of a guided step",
        ),
        Peer(
            "eager",
            "guided",
            partial(_eager, every_layer=False),
            "stock AttnProcessor on attn2 (materialized probabilities), hooks, torch L1 (pix2pix-zero)",
        ),
        Peer(
            "all_eager",
            "guided",
            partial(_eager, every_layer=True),
            "materialized attention on every layer, attn1 too (Attend-and-Excite, AttnDreamBooth)",
        ),
        Peer(
            "sdpa_recompute",
            "guided",
            partial(_recompute, processor=AttnProcessor2_0),
            "SDPA output plus softmax(qk^T) recomputed for the maps, torch L1",
        ),
        Peer(
            "xformers_recompute",
            "guided",
            partial(_recompute, processor=XFormersAttnProcessor),
            "xformers output plus recomputed maps, torch L1",
            _needs_xformers,
        ),
        *(
            Peer(
                f"ours_{backend}",
                "guided",
                partial(_ours, backend=backend),
                f"DreamBlendProcessor with the {backend} backend: fused capture and guided backward",
                partial(_needs_backend, backend),
                backend,
            )
            for backend in ("triton", "cpp", "torch")
        ),
    )
}


@contextmanager
def attached(peer: Peer, unets: UNets) -> Iterator[Capture | None]:
    """Install ``peer`` on G and E with one shared capture, as the pipelines share one store.

    Afterwards every layer runs SDPA again and no hook is left.
    """
    capture = peer.install(unets)
    try:
        yield capture
    finally:
        if isinstance(capture, (HookedMaps, NoMaps)):
            capture.close()
        _sdpa(unets)
