"""Evaluation metrics: one interface (:class:`Metric`), built by name (:func:`build_metrics`).

Built in: ``dino``, ``clip_i``, ``clip_t`` and ``diversity`` (the DreamBooth benchmark as DreamBlend
reports it) and the masked ``mdino``, ``mclip_i`` (JeDi). Other modules add theirs with
:func:`register_metric`.
"""

from dreamblend.metrics.base import Metric, Role
from dreamblend.metrics.registry import (
    DEFAULT_METRICS,
    DEFAULT_MODELS,
    MetricContext,
    MetricFactory,
    available_metrics,
    build_metrics,
    register_metric,
)
from dreamblend.metrics.similarity import (
    CLIPImageSimilarity,
    CLIPTextSimilarity,
    DINOSimilarity,
    Diversity,
    MaskedCLIPImageSimilarity,
    MaskedDINOSimilarity,
    ReferenceSimilarity,
)

__all__ = [
    "DEFAULT_METRICS",
    "DEFAULT_MODELS",
    "CLIPImageSimilarity",
    "CLIPTextSimilarity",
    "DINOSimilarity",
    "Diversity",
    "MaskedCLIPImageSimilarity",
    "MaskedDINOSimilarity",
    "Metric",
    "MetricContext",
    "MetricFactory",
    "ReferenceSimilarity",
    "Role",
    "available_metrics",
    "build_metrics",
    "register_metric",
]
