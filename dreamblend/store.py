"""AttentionStore: what to capture, and what was captured, for DreamBlendProcessor.

Control state lives here rather than in ``cross_attention_kwargs`` so one processor object can
serve every layer and the pipeline can switch between recording G and guiding E without
re-installing processors. Results are keyed by the attention module's name, never by call order,
so gradient checkpointing (which re-runs forwards during the backward) cannot double-capture.
"""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dreamblend.ops import BACKENDS, TokenSpec, map_shape, normalize_tokens
from dreamblend.ops.reference import compute_dtype
from dreamblend.tokens import TokenSelection, has_words, resolve_tokens, selection_items

LayerSpec = str | int
CROSS_ATTENTION_EXAMPLE = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
JOINT_ATTENTION_EXAMPLE = "transformer_blocks.0.attn"


def in_backward_pass() -> bool:
    """True while autograd runs a backward (e.g. gradient checkpointing re-running a forward).

    Compiled graphs never re-enter Python for recomputation, so tracing always sees a forward.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def is_attention(module: nn.Module) -> bool:
    """diffusers attention modules are the ones that carry a swappable processor."""
    return hasattr(module, "set_processor") and hasattr(module, "processor")


def is_cross_attention(module: nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False))


def is_joint_attention(module: nn.Module) -> bool:
    """MMDiT attention (SD3, FLUX) over image and text tokens together: where those models' maps live.

    Double-stream layers project the text with their own ``add_k_proj`` (``added_kv_proj_dim``); FLUX's
    single-stream layers receive text and image as one sequence and have no output projection
    (``pre_only``). SD3.5's extra image-only ``attn2`` has neither.
    """
    if not is_attention(module) or is_cross_attention(module):
        return False
    return getattr(module, "added_kv_proj_dim", None) is not None or bool(getattr(module, "pre_only", False))


def takes_text(module: nn.Module) -> bool:
    """Whether an attention layer's keys hold text tokens (the layers a store can select)."""
    return is_cross_attention(module) or is_joint_attention(module)


class AllLayersScored(Exception):  # noqa: N818 - a signal, not an error
    """Ends a model call from inside once every reference layer has its loss
    (:meth:`AttentionStore.run_for_loss`, which catches it; nothing else sees it)."""


class EndsAtLastLayer:
    """:meth:`run_for_loss` for a capture in guide mode that raises :class:`AllLayersScored` once
    every layer it scores has its loss (when ``_stop_early`` is set)."""

    mode: str
    _stop_early: bool = False

    def run_for_loss(self, model: Callable[..., object], *args: object, **kwargs: object) -> None:
        """``model(*args, **kwargs)`` inside ``guide``, ended as soon as every reference layer has its
        loss: the layers after the last one feed nothing the loss uses, so they are skipped (the
        call's output is never made). The DreamBlend samplers' guided pass runs E this way."""
        if self.mode != "guide":
            raise RuntimeError(
                "run_for_loss() scores against reference maps: call it inside `with store.guide(ref):`"
            )
        self._stop_early = True
        try:
            model(*args, **kwargs)
        except AllLayersScored:
            pass
        finally:
            self._stop_early = False


@dataclass(frozen=True)
class LayerPlan:
    """What the processor does in one cross-attention layer for one call."""

    name: str
    mode: str  # "record" | "guide"
    tokens: Tensor | None
    ref: Tensor | None
    rows: slice | None
    write: bool  # False while a checkpointed forward is recomputed in the backward


class AttentionStore(EndsAtLastLayer):
    """Selects cross-attention layers/tokens and holds captured maps or guidance losses.

    Args:
        tokens: tokens to capture (default: all ``N`` text tokens): indices, or words of the prompt
            (``["sks", "dog"]``, mixed with indices if wanted). Words become positions once
            :meth:`resolve_words` has seen the tokenizer and prompt; the pipelines do that for
            ``attention_tokens``.
        head_mean: capture the head-mean map ``(B, M, T)`` instead of per-head ``(B, H, M, T)``.
        layers: which cross-attention layers take part: ``None`` for all, or a sequence of glob
            patterns on layer names (a pattern without wildcards also matches as a dotted prefix,
            so ``"up_blocks.1"`` selects every layer inside it) and ints ``r`` selecting layers
            whose maps are ``r x r`` (``M == r * r``, as in prompt-to-prompt).
        backend: op backend, see :mod:`dreamblend.ops`.

    Use ``with store.record(): unet(...)`` to fill :attr:`maps`, and
    ``with store.guide(ref_maps): unet(...)`` to make :attr:`loss` a differentiable ``(B,)``
    tensor. With gradient checkpointing on, run the backward inside the same context.
    Inside ``guide``, ``store.run_for_loss(unet, ...)`` calls the model only as far as the last
    reference layer: for a pass whose output is not needed, as Algorithm 1's guided pass.
    """

    def __init__(
        self,
        tokens: TokenSpec | TokenSelection | str = None,
        head_mean: bool = False,
        layers: LayerSpec | Sequence[LayerSpec] | None = None,
        backend: str = "auto",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        if isinstance(layers, (str, int)):
            layers = [layers]
        self.layers: tuple[LayerSpec, ...] | None = None if layers is None else tuple(layers)
        for spec in self.layers or ():
            if (
                isinstance(spec, bool)
                or not isinstance(spec, (str, int))
                or (isinstance(spec, int) and spec < 1)
            ):
                raise TypeError(
                    f"layers entries must be name patterns (str) or resolutions (int >= 1); got {spec!r}"
                )
        self.words: tuple[int | str, ...] | None = None
        if has_words(tokens):
            self.words, tokens = selection_items(tokens), None
        normalize_tokens(tokens, 1 << 62, torch.device("cpu"))  # fail early on malformed token lists
        self.tokens = None if tokens is None else torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        self.head_mean = head_mean
        self.backend = backend
        self.maps: dict[str, Tensor] = {}
        self.losses: dict[str, Tensor] = {}
        self.mode = "off"
        self._ref: Mapping[str, Tensor] | None = None
        self._rows: slice | None = None
        self._names: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        self._bound_roots: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._seen: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._explicitly_bound = False
        self._token_cache: dict[tuple[int, torch.device], Tensor | None] = {}

    # ----------------------------------------------------------------- results
    @property
    def loss(self) -> Tensor | None:
        """Sum over guided layers of the per-sample L1 map distance, ``(B,)`` float32."""
        if not self.losses:
            return None
        return torch.stack(list(self.losses.values())).sum(dim=0)

    def resolve_words(self, tokenizer, prompt: str | Sequence[str]) -> AttentionStore:
        """Turn the words of ``tokens`` into their positions in ``prompt`` (index lists stay as they are).

        A word in several pieces selects all of them; a batch of prompts must agree on the positions.
        Returns the store.
        """
        if self.words is not None:
            self.tokens = torch.as_tensor(resolve_tokens(tokenizer, prompt, self.words), dtype=torch.long)
            self._token_cache.clear()
        return self

    # ----------------------------------------------------------------- naming
    def bind(self, model: nn.Module) -> list[str]:
        """Name ``model``'s attention modules and check ``layers`` against them.

        :func:`dreamblend.attach` calls this; a bare ``set_attn_processor`` install binds lazily
        on the first recorded or guided forward. Returns the selected cross-attention layer names.
        """
        self._explicitly_bound = True
        return self._bind(model)

    def _bind(self, model: nn.Module) -> list[str]:
        if model in self._bound_roots:
            return self.selected_layers(model)
        attention = [(name, mod) for name, mod in model.named_modules() if is_attention(mod)]
        for name, mod in attention:
            self._names.setdefault(mod, name)
        self._bound_roots.add(model)
        self._check_patterns(attention)
        return self.selected_layers(model)

    def _check_patterns(self, attention: list[tuple[str, nn.Module]]) -> None:
        cross = [name for name, mod in attention if takes_text(mod)]
        if not cross:
            return  # a model part without cross-attention (e.g. a VAE) is not an error
        joint = any(is_joint_attention(mod) for _, mod in attention)
        for pattern in self.layers or ():
            if not isinstance(pattern, str):
                continue
            if any(self._matches(pattern, name) for name in cross):
                continue
            self_attn = [
                name for name, mod in attention if not takes_text(mod) and self._matches(pattern, name)
            ]
            if self_attn:
                raise ValueError(
                    f"layer pattern {pattern!r} selects self-attention layer(s) such as {self_attn[0]!r}; "
                    + (
                        "maps are captured on the joint text-image attention layers only (names ending in "
                        "'.attn')"
                        if joint
                        else "maps are captured on cross-attention layers only (names ending in 'attn2')"
                    )
                )
            example, glob, prefix = (
                (JOINT_ATTENTION_EXAMPLE, "single_transformer_blocks.*", "transformer_blocks.1")
                if joint
                else (CROSS_ATTENTION_EXAMPLE, "up_blocks.*", "mid_block")
            )
            raise ValueError(
                f"layer pattern {pattern!r} matches no {'text' if joint else 'cross'}-attention layer; names "
                f"look like {cross[0]!r} ({len(cross)} layers, e.g. {example!r}); "
                f"use a glob such as {glob!r} or a dotted prefix such as {prefix!r}"
            )

    @staticmethod
    def _matches(pattern: str, name: str) -> bool:
        if any(c in pattern for c in "*?["):
            return fnmatch.fnmatchcase(name, pattern)
        return name == pattern or name.startswith(pattern + ".")

    def selects(self, name: str, num_queries: int | None = None) -> bool:
        """Whether cross-attention layer ``name`` (with ``num_queries`` positions) takes part."""
        if self.layers is None:
            return True
        for spec in self.layers:
            if isinstance(spec, str) and self._matches(spec, name):
                return True
            if isinstance(spec, int) and num_queries is not None and num_queries == spec * spec:
                return True
        return False

    def selected_layers(self, model: nn.Module) -> list[str]:
        """Names of ``model``'s cross-attention layers selected by name patterns (ints need a forward)."""
        names = [n for n, m in model.named_modules() if is_attention(m) and takes_text(m)]
        return [n for n in names if self.selects(n)]

    def name_of(self, attn: nn.Module) -> str | None:
        return self._names.get(attn)

    # ----------------------------------------------------------------- modes
    @contextmanager
    def record(self, rows: slice | None = None) -> Iterator[AttentionStore]:
        """Capture maps of the selected layers into :attr:`maps` (cleared on entry).

        ``rows`` restricts capture to a slice of the batch (e.g. the conditional half of a
        classifier-free-guidance batch); other rows run plain attention.
        """
        self.maps = {}
        with self._active("record", rows):
            yield self
        self._check_selection(self.maps)

    @contextmanager
    def guide(
        self, ref_maps: Mapping[str, Tensor] | None = None, rows: slice | None = None
    ) -> Iterator[AttentionStore]:
        """Score the selected layers against ``ref_maps`` (default: the last recording) into :attr:`loss`."""
        if ref_maps is None:
            if not self.maps:
                raise RuntimeError(
                    "guide() has no reference maps: record them first with `with store.record(): unet(...)` "
                    "or pass ref_maps={layer name: map}"
                )
            ref_maps = {name: m.detach() for name, m in self.maps.items()}
        if not isinstance(ref_maps, Mapping) or not ref_maps:
            raise TypeError("ref_maps must be a non-empty mapping {layer name: map tensor}")
        self._ref = ref_maps
        self.losses = {}
        try:
            with self._active("guide", rows):
                yield self
        finally:
            self._ref = None
        self._check_selection(self.losses)

    @contextmanager
    def _active(self, mode: str, rows: slice | None) -> Iterator[None]:
        if self.mode != "off":
            raise RuntimeError(f"store is already in {self.mode!r} mode; record() and guide() do not nest")
        if self.words is not None and self.tokens is None:
            raise ValueError(
                f"tokens {list(self.words)} name words; turn them into positions first with "
                "store.resolve_words(tokenizer, prompt) (the DreamBlend pipelines do this), or pass indices"
            )
        if rows is not None and (not isinstance(rows, slice) or rows.step not in (None, 1)):
            raise TypeError(f"rows must be a contiguous slice of the batch, got {rows!r}")
        hook = None
        if not self._explicitly_bound:
            hook = nn.modules.module.register_module_forward_pre_hook(self._bind_hook)
        self.mode, self._rows = mode, rows
        try:
            yield
        finally:
            self.mode, self._rows = "off", None
            if hook is not None:
                hook.remove()

    def _bind_hook(self, module: nn.Module, args: object) -> None:
        # The outermost module runs its pre-hook first, so names are rooted at the model called;
        # its submodules then find their attention layers already named and are skipped.
        if module in self._seen:
            return
        self._seen.add(module)
        if any(m not in self._names for m in _attention_modules(module)):
            self._bind(module)

    def _check_selection(self, results: Mapping[str, Tensor]) -> None:
        if self.layers is not None and not results and self._bound_roots:
            raise ValueError(
                f"layers={list(self.layers)} selected no cross-attention layer in this pass; ints select "
                "layers whose maps are r x r (e.g. 16 for 16x16 maps), strings match layer names"
            )

    # ----------------------------------------------------------------- processor side
    def plan(
        self, attn: nn.Module, num_queries: int, num_keys: int, device: torch.device, joint: bool = False
    ) -> LayerPlan | None:
        """What to do in ``attn`` for this call, or None to run plain attention.

        ``joint``: the caller is an MMDiT processor; then ``num_queries`` counts the image positions,
        ``num_keys`` the text ones, and only joint-attention layers take part.
        """
        if self.mode == "off":
            return None
        name = self._names.get(attn)
        kind = is_joint_attention if joint else is_cross_attention
        if name is None or not kind(attn) or not self.selects(name, num_queries):
            return None
        tokens = self._tokens_for(num_keys, device)
        ref = None
        if self.mode == "guide":
            ref = self._ref.get(name) if self._ref is not None else None
            if ref is None:
                raise KeyError(
                    f"no reference map for layer {name!r}; the reference has {len(self._ref or {})} layers "
                    f"(e.g. {next(iter(self._ref or {'-': None}))!r}); record it with the same layers setting"
                )
        return LayerPlan(name, self.mode, tokens, ref, self._rows, write=not in_backward_pass())

    def check_ref(self, plan: LayerPlan, q: Tensor, num_keys: int, num_queries: int | None = None) -> Tensor:
        """The plan's reference map on q's device in the compute dtype; a layer-named error if misshapen.

        ``num_queries``: the map's query positions when not all of q's (joint maps hold image queries only).
        """
        n_tok = num_keys if plan.tokens is None else plan.tokens.numel()
        expected = map_shape(q, n_tok, self.head_mean)
        if num_queries is not None:
            expected = (*expected[:-2], num_queries, n_tok)
        ref = plan.ref
        if tuple(ref.shape) != expected:
            raise ValueError(
                f"reference map for layer {plan.name!r} has shape {tuple(ref.shape)}, expected {expected} "
                f"({'head-mean' if self.head_mean else 'per-head'}, batch {q.shape[0]}, {n_tok} tokens); "
                "record the reference with the same batch size, tokens and head_mean"
            )
        return ref.to(device=q.device, dtype=compute_dtype(q))

    def put(self, plan: LayerPlan, value: Tensor) -> None:
        if not plan.write:
            return
        (self.maps if plan.mode == "record" else self.losses)[plan.name] = value
        if self._stop_early and plan.mode == "guide" and len(self.losses) == len(self._ref or ()):
            raise AllLayersScored

    def _tokens_for(self, num_keys: int, device: torch.device) -> Tensor | None:
        key = (num_keys, device)
        if key not in self._token_cache:
            self._token_cache[key] = normalize_tokens(self.tokens, num_keys, device)
        return self._token_cache[key]


def _attention_modules(module: nn.Module) -> Iterable[nn.Module]:
    return (m for m in module.modules() if is_attention(m))
