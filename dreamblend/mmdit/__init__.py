"""DreamBlend for MMDiT transformers (SD3, SD3.5, FLUX): processors that capture or guide text-image maps.

:func:`attach` installs the right processor on an ``SD3Transformer2DModel`` or
``FluxTransformer2DModel`` for a block; the :class:`~dreamblend.AttentionStore` then records or guides
the joint attention layers by name, exactly as it does cross-attention layers in UNets.
:class:`DreamBlendSD3Pipeline` runs Algorithm 1 on SD3.
"""

from typing import Any

from dreamblend.mmdit.processors import FluxDreamBlendProcessor, SD3DreamBlendProcessor, attach, processor_for

__all__ = [
    "DreamBlendSD3Pipeline",
    "FluxDreamBlendProcessor",
    "SD3DreamBlendProcessor",
    "attach",
    "processor_for",
]


def __getattr__(name: str) -> Any:
    # The pipeline imports diffusers' pipeline stack and transformers: load it on first use.
    if name == "DreamBlendSD3Pipeline":
        from dreamblend.mmdit.pipeline_sd3 import DreamBlendSD3Pipeline

        return DreamBlendSD3Pipeline
    raise AttributeError(f"module 'dreamblend.mmdit' has no attribute {name!r}")
