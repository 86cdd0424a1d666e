"""DreamBlend: cross-attention guided blending of personalization checkpoints."""
