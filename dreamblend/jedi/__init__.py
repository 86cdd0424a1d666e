"""JeDi: finetuning-free personalization by a model that denoises a set of images of one subject jointly.

:mod:`~dreamblend.jedi.convert` turns a text-to-image UNet into the initial JeDi UNet (inpainting input),
:mod:`~dreamblend.jedi.data` reads image sets (the supplement's stacked files, or folders),
:mod:`~dreamblend.jedi.train` trains it (``dreamblend train jedi``) and
:mod:`~dreamblend.jedi.pipeline` generates from reference images (``dreamblend generate-jedi``).
Joint attention itself is :mod:`dreamblend.joint`. Names load on first use, so the command line can
import :mod:`dreamblend.jedi.options` without diffusers.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "check_jedi_unet": "convert",
    "convert_unet": "convert",
    "inpainting_input": "convert",
    "is_jedi_unet": "convert",
    "jedi_in_channels": "convert",
    "find_image_sets": "data",
    "write_stacked_set": "data",
    "JeDiConfig": "train",
    "train_jedi": "train",
    "GUIDANCE_STRATEGIES": "pipeline",
    "JeDiPipeline": "pipeline",
    "JeDiPipelineOutput": "pipeline",
    "combine_guidance": "pipeline",
    "load_jedi_pipeline": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"dreamblend.jedi.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dreamblend.jedi' has no attribute {name!r}")
