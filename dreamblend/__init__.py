"""DreamBlend: cross-attention guided blending of an underfit and an overfit personalization checkpoint.

Entry points: :class:`AttentionStore` + :class:`DreamBlendProcessor` (drop-in attention processor
for diffusers UNets), :func:`attach`, and the op API in :mod:`dreamblend.ops`.
"""

from dreamblend.processor import DreamBlendProcessor, attach
from dreamblend.store import AttentionStore

__all__ = ["AttentionStore", "DreamBlendProcessor", "attach"]
__version__ = "0.1.0"
