"""JeDi's inpainting formulation: the UNet input ``[x_t, x0 * (1 - mask), mask]`` and the converter.

JeDi casts personalization as inpainting over an image set: known images (the references, mask 0)
enter as clean latents ``x0``, unknown ones (mask 1) as zeros, and the per-image mask is a channel of
its own. A latent UNet with ``C`` channels therefore takes ``2 * C + 1`` (9 for SD, like diffusers'
SD inpainting UNets). The converter copies a text-to-image UNet and widens ``conv_in`` with zero
weights for the new channels, so the initial JeDi UNet computes exactly what the base model does
whatever ``x0`` and ``mask`` hold; training then teaches it to read them.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor


def jedi_in_channels(latent_channels: int) -> int:
    """Input channels of a JeDi UNet over ``latent_channels``-channel latents: x_t, masked x0, mask."""
    return 2 * latent_channels + 1


def is_jedi_unet(unet: UNet2DConditionModel) -> bool:
    """Whether ``unet`` takes JeDi's inpainting input (``in_channels == 2 * out_channels + 1``)."""
    return int(unet.config.in_channels) == jedi_in_channels(int(unet.config.out_channels))


def check_jedi_unet(unet: UNet2DConditionModel) -> None:
    """Raise a clear error for a UNet that is not a JeDi UNet (e.g. a base model passed by mistake)."""
    if not is_jedi_unet(unet):
        c_in, c_out = int(unet.config.in_channels), int(unet.config.out_channels)
        raise ValueError(
            f"the UNet takes {c_in} input channels; a JeDi UNet takes {jedi_in_channels(c_out)} "
            f"(x_t, masked x0, mask for {c_out}-channel latents). Convert a base model with "
            "dreamblend.jedi.convert_unet and train it with 'dreamblend train jedi'"
        )


def inpainting_input(latents: Tensor, known: Tensor, mask: Tensor) -> Tensor:
    """The UNet input ``[x_t, x0 * (1 - mask), mask]`` along channels.

    ``latents`` and ``known`` are ``(B, C, h, w)``; ``mask`` is one value per image ``(B,)`` (1:
    unknown, to generate; 0: known) or already spatial ``(B, 1, h, w)``.
    """
    if latents.shape != known.shape:
        raise ValueError(f"x_t {tuple(latents.shape)} and x0 {tuple(known.shape)} must have one shape")
    mask = mask.to(device=latents.device, dtype=latents.dtype)
    if mask.ndim == 1:
        mask = mask[:, None, None, None].expand(-1, 1, *latents.shape[-2:])
    if mask.shape != (latents.shape[0], 1, *latents.shape[-2:]):
        raise ValueError(
            f"mask must be (B,) or (B, 1, h, w) for x_t {tuple(latents.shape)}, got {tuple(mask.shape)}"
        )
    return torch.cat([latents, known.to(latents.dtype) * (1 - mask), mask], dim=1)


def convert_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A new JeDi UNet from a text-to-image ``unet`` (SD1.x/2.x/SDXL layouts, or the toy world's).

    Every weight is shared by value (copied), ``config.in_channels`` becomes ``2 * C + 1`` so the
    saved model loads with ``UNet2DConditionModel.from_pretrained``, and ``conv_in``'s new input
    channels start at zero: with any ``x0`` and ``mask`` the output equals the base model's.
    """
    if is_jedi_unet(unet):
        raise ValueError("this UNet already takes JeDi's inpainting input; it needs no conversion")
    latent_channels = int(unet.config.in_channels)
    if latent_channels != int(unet.config.out_channels):
        raise ValueError(
            f"cannot convert a UNet with {latent_channels} input and {unet.config.out_channels} output "
            "channels; JeDi starts from a text-to-image UNet (input channels = latent channels)"
        )
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    old = state["conv_in.weight"]
    wide = old.new_zeros(old.shape[0], jedi_in_channels(latent_channels), *old.shape[2:])
    wide[:, :latent_channels] = old
    state["conv_in.weight"] = wide
    with torch.device("meta"):  # no random initialisation: every tensor comes from `state`
        jedi = UNet2DConditionModel.from_config(unet.config, in_channels=jedi_in_channels(latent_channels))
    jedi.load_state_dict(state, strict=True, assign=True)
    return jedi.to(device=unet.device).train(unet.training)
