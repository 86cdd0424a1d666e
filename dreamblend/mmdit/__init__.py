"""DreamBlend for MMDiT transformers (SD3, SD3.5, FLUX): processors that capture or guide text-image maps.

:func:`attach` installs the right processor on an ``SD3Transformer2DModel`` or
``FluxTransformer2DModel`` for a block; the :class:`~dreamblend.AttentionStore` then records or guides
the joint attention layers by name, exactly as it does cross-attention layers in UNets.
:class:`DreamBlendSD3Pipeline` and :class:`DreamBlendFluxPipeline` run Algorithm 1 on SD3 and FLUX.
"""

from typing import Any

from dreamblend.mmdit.processors import FluxDreamBlendProcessor, SD3DreamBlendProcessor, attach, processor_for

__all__ = [
    "DreamBlendFluxPipeline",
    "DreamBlendSD3Pipeline",
    "FluxDreamBlendProcessor",
    "SD3DreamBlendProcessor",
    "attach",
    "processor_for",
]


def __getattr__(name: str) -> Any:
    # The pipelines import diffusers' pipeline stack and transformers: load them on first use.
    if name == "DreamBlendSD3Pipeline":
        from dreamblend.mmdit.pipeline_sd3 import DreamBlendSD3Pipeline

        return DreamBlendSD3Pipeline
    if name == "DreamBlendFluxPipeline":
        from dreamblend.mmdit.pipeline_flux import DreamBlendFluxPipeline

        return DreamBlendFluxPipeline
    raise AttributeError(f"module 'dreamblend.mmdit' has no attribute {name!r}")
