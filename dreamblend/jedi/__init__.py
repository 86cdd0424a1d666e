"""JeDi: finetuning-free personalization by a model that denoises a set of images of one subject jointly.

:mod:`~dreamblend.jedi.convert` turns a text-to-image UNet into the initial JeDi UNet (inpainting input),
:mod:`~dreamblend.jedi.data` reads image sets (the supplement's stacked files, or folders),
:mod:`~dreamblend.jedi.train` trains it (``dreamblend train jedi``) and
:mod:`~dreamblend.jedi.pipeline` generates from reference images (``dreamblend generate-jedi``).
Joint attention itself is :mod:`dreamblend.joint`.
"""

from dreamblend.jedi.convert import (
    check_jedi_unet,
    convert_unet,
    inpainting_input,
    is_jedi_unet,
    jedi_in_channels,
)

__all__ = ["check_jedi_unet", "convert_unet", "inpainting_input", "is_jedi_unet", "jedi_in_channels"]
