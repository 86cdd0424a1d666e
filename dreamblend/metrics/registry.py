"""Metrics by name: ``build_metrics(["dino", "clip_t"], device="cuda")``; ``register_metric`` adds more.

The eval command only knows names, so the benchmark's metrics and metrics registered elsewhere (the toy
world's) plug in the same way: installed packages declare a registering function under the entry-point
group ``dreamblend.metrics``, loaded the first time names are looked up. A factory gets one
:class:`MetricContext` per ``build_metrics`` call; metrics built from one context share loaded models
(CLIP-I and CLIP-T use one CLIP, DINO and diversity one DINO), so each model loads once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib.metadata import entry_points
from typing import Any, TypeVar

import torch

from dreamblend.metrics.base import Metric
from dreamblend.metrics.encoders import CLIP_MODEL, DINO_MODEL, CLIPEncoder, DINOEncoder
from dreamblend.metrics.masking import BACKGROUND, CLIPSEG_MODEL, CLIPSegSegmenter, SubjectMasker
from dreamblend.metrics.similarity import (
    CLIPImageSimilarity,
    CLIPTextSimilarity,
    DINOSimilarity,
    Diversity,
    MaskedCLIPImageSimilarity,
    MaskedDINOSimilarity,
)

T = TypeVar("T")

DEFAULT_MODELS: dict[str, str] = {"clip": CLIP_MODEL, "dino": DINO_MODEL, "clipseg": CLIPSEG_MODEL}
"""Hub ids of the models the benchmark metrics use, by key of ``MetricContext.models``."""


@dataclass
class MetricContext:
    """What a metric factory may use: device, batch size, model ids or folders, prompt conventions.

    ``models`` overrides :data:`DEFAULT_MODELS` by key ("clip", "dino", "clipseg"); metrics registered
    elsewhere read their own keys from it. ``segment=False`` skips loading CLIPSeg when every image
    given to a masked metric carries its mask as an alpha channel.
    """

    device: str | torch.device = "cpu"
    batch_size: int = 32
    models: Mapping[str, str] = field(default_factory=dict)
    token: str | None = "sks"
    class_word: str | None = None
    segment: bool = True
    mask_threshold: float = 0.5
    background: tuple[int, int, int] = BACKGROUND
    _shared: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def model(self, key: str) -> str:
        """The hub id or local folder for ``key``: the override, else the default."""
        if key in self.models:
            return self.models[key]
        if key in DEFAULT_MODELS:
            return DEFAULT_MODELS[key]
        raise ValueError(f"no model given for {key!r}; pass models={{{key!r}: <hub id or folder>}}")

    def shared(self, key: str, build: Callable[[], T]) -> T:
        """One object per ``key`` for every metric of this context (built on first request)."""
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]

    def clip(self) -> CLIPEncoder:
        name = self.model("clip")
        return self.shared("clip", lambda: CLIPEncoder(name, device=self.device, batch_size=self.batch_size))

    def dino(self) -> DINOEncoder:
        name = self.model("dino")
        return self.shared("dino", lambda: DINOEncoder(name, device=self.device, batch_size=self.batch_size))

    def masker(self) -> SubjectMasker:
        def build() -> SubjectMasker:
            segmenter = (
                CLIPSegSegmenter(
                    self.model("clipseg"),
                    device=self.device,
                    batch_size=self.batch_size,
                    threshold=self.mask_threshold,
                )
                if self.segment
                else None
            )
            return SubjectMasker(
                segmenter, token=self.token, class_word=self.class_word, background=self.background
            )

        return self.shared("masker", build)


MetricFactory = Callable[[MetricContext], Metric]

_REGISTRY: dict[str, MetricFactory] = {
    "dino": lambda ctx: DINOSimilarity(ctx.dino()),
    "clip_i": lambda ctx: CLIPImageSimilarity(ctx.clip()),
    "clip_t": lambda ctx: CLIPTextSimilarity(ctx.clip(), token=ctx.token),
    "diversity": lambda ctx: Diversity(ctx.dino()),
    "mdino": lambda ctx: MaskedDINOSimilarity(ctx.dino(), ctx.masker()),
    "mclip_i": lambda ctx: MaskedCLIPImageSimilarity(ctx.clip(), ctx.masker()),
}

DEFAULT_METRICS = ("dino", "clip_i", "clip_t", "diversity")
"""The DreamBooth benchmark's metrics plus diversity, as the DreamBlend paper reports them."""


def register_metric(name: str, factory: MetricFactory, *, replace: bool = False) -> None:
    """Make ``factory(context) -> Metric`` buildable as ``name``; the metric's own ``name`` must match."""
    if not name.isidentifier():
        raise ValueError(f"metric name {name!r} must be an identifier (it becomes a column name)")
    if name in _REGISTRY and not replace:
        raise ValueError(f"a metric named {name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[name] = factory


PLUGIN_GROUP = "dreamblend.metrics"
_plugins_loaded = False


def _load_plugins() -> None:
    """Call each installed ``dreamblend.metrics`` entry point once; a broken one warns and is skipped."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in entry_points(group=PLUGIN_GROUP):
        try:
            entry.load()()
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not take the built-in metrics down
            warnings.warn(
                f"metric plugin {entry.name!r} ({entry.value}) failed to load: {exc}",
                RuntimeWarning,
                stacklevel=3,
            )


def available_metrics() -> list[str]:
    """Names ``build_metrics`` accepts, sorted (built in, registered and from installed plugins)."""
    _load_plugins()
    return sorted(_REGISTRY)


def build_metrics(
    names: Sequence[str] = DEFAULT_METRICS,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    models: Mapping[str, str] | None = None,
    token: str | None = "sks",
    **options: Any,
) -> list[Metric]:
    """The named metrics, in order, sharing models; ``options`` are further :class:`MetricContext` fields.

    ``device`` defaults to CUDA when available, else CPU.
    """
    _load_plugins()
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {available_metrics()}")
    if len(set(names)) != len(names):
        raise ValueError(f"metric names repeat in {list(names)}; give each once")
    settable = {f.name for f in fields(MetricContext) if f.init}
    if set(options) - settable:
        raise ValueError(f"unknown option(s) {sorted(set(options) - settable)}; allowed: {sorted(settable)}")
    context = MetricContext(
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        batch_size=batch_size,
        models=dict(models or {}),
        token=token,
        **options,
    )
    metrics = []
    for name in names:
        metric = _REGISTRY[name](context)
        if metric.name != name:
            raise ValueError(f"the factory registered as {name!r} built a metric named {metric.name!r}")
        metrics.append(metric)
    return metrics
