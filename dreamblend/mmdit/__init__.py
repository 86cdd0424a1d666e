"""DreamBlend for MMDiT transformers (SD3, SD3.5, FLUX): processors that capture or guide text-image maps.

:func:`attach` installs the right processor on an ``SD3Transformer2DModel`` or
``FluxTransformer2DModel`` for a block; the :class:`~dreamblend.AttentionStore` then records or guides
the joint attention layers by name, exactly as it does cross-attention layers in UNets.
"""

from dreamblend.mmdit.processors import FluxDreamBlendProcessor, SD3DreamBlendProcessor, attach, processor_for

__all__ = ["FluxDreamBlendProcessor", "SD3DreamBlendProcessor", "attach", "processor_for"]
