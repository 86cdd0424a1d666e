"""DreamBlend pipelines."""
