"""DreamBlend: cross-attention guided blending of an underfit and an overfit personalization checkpoint.

Entry points: :class:`AttentionStore` + :class:`DreamBlendProcessor` (drop-in attention processor
for diffusers UNets), :func:`attach`, :class:`SD3DreamBlendProcessor` and
:class:`FluxDreamBlendProcessor` for MMDiT transformers (:func:`dreamblend.mmdit.attach`), the op
API in :mod:`dreamblend.ops`, and the pipelines :class:`DreamBlendPipeline` (SD1.x/2.x),
:class:`DreamBlendXLPipeline` (SDXL), :class:`DreamBlendSD3Pipeline` and :class:`DreamBlendFluxPipeline`;
finetuning-free personalization with :class:`JeDiPipeline`
(:mod:`dreamblend.jedi`).
"""

from typing import Any

from dreamblend import quiet
from dreamblend.processor import DreamBlendProcessor, attach
from dreamblend.store import AttentionStore

__all__ = [
    "AttentionStore",
    "DreamBlendFluxPipeline",
    "DreamBlendPipeline",
    "DreamBlendPipelineOutput",
    "DreamBlendProcessor",
    "DreamBlendSD3Pipeline",
    "DreamBlendXLPipeline",
    "FluxDreamBlendProcessor",
    "JeDiPipeline",
    "SD3DreamBlendProcessor",
    "attach",
]
__version__ = "0.1.0"
quiet.install()

_PIPELINES = ("DreamBlendPipeline", "DreamBlendPipelineOutput", "DreamBlendXLPipeline")
_MMDIT = (
    "DreamBlendFluxPipeline",
    "DreamBlendSD3Pipeline",
    "FluxDreamBlendProcessor",
    "SD3DreamBlendProcessor",
)


def __getattr__(name: str) -> Any:
    # Pipelines import diffusers' pipeline stack; load it on first use so `import dreamblend` stays light.
    if name in _PIPELINES:
        from dreamblend import pipelines

        return getattr(pipelines, name)
    if name == "JeDiPipeline":
        from dreamblend.jedi.pipeline import JeDiPipeline

        return JeDiPipeline
    if name in _MMDIT:  # diffusers' transformer models and pipelines: also on first use
        from dreamblend import mmdit

        return getattr(mmdit, name)
    raise AttributeError(f"module 'dreamblend' has no attribute {name!r}")
