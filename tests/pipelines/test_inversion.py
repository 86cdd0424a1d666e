"""Real-image editing: DDIM inversion of an image, then guided synthesis from the inverted latent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import blend_pipe, blend_xl_pipe

from dreamblend.pipelines.blend import vae_encode

SOURCE = "a photo of a cat"


def _smooth_image(size: int = 32) -> Image.Image:
    coarse = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    pixels = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear")[0].permute(1, 2, 0)
    return Image.fromarray((pixels.numpy() * 255).astype(np.uint8))


def _invertible_pipe():
    """The tiny pair, made well-conditioned for inversion the way trained models are.

    Untrained UNets vary wildly between adjacent timesteps, which no DDIM inversion survives; damping
    G's output makes the denoiser smooth, so the test measures the inversion's bookkeeping (timesteps,
    VAE scaling, conditioning). The VAE's scaling factor is set so latents have unit variance, as a
    real checkpoint's does.
    """
    pipe = blend_pipe()
    with torch.no_grad():
        pipe.guidance_unet.conv_out.weight.mul_(0.03)
        pipe.guidance_unet.conv_out.bias.mul_(0.03)
    image = _smooth_image()
    latents = vae_encode(pipe.vae, pipe.image_processor.preprocess(image))
    pipe.vae.register_to_config(scaling_factor=pipe.vae.config.scaling_factor / latents.std().item())
    return pipe, image


@pytest.mark.parametrize("steps", [5, 20])
def test_inversion_without_guidance_reconstructs_the_image_latent(steps):
    pipe, image = _invertible_pipe()
    target = vae_encode(pipe.vae, pipe.image_processor.preprocess(image))
    inverted = pipe.invert(image, SOURCE, num_inference_steps=steps)
    assert inverted.shape == target.shape and inverted.dtype == torch.float32

    def reconstruct(num_steps):
        out = pipe(
            SOURCE,
            latents=inverted,
            num_inference_steps=num_steps,
            guidance_scale=1.0,
            cross_attention_guidance_scale=0.0,
            return_reference=True,
            output_type="latent",
        )
        return (out.reference_images - target).norm() / target.norm()

    error = reconstruct(steps)
    assert error < 0.03
    assert reconstruct(steps + 1) > 3 * error  # a mismatched schedule does not reconstruct


def test_guided_edit_from_an_inverted_image():
    """Fig. 8: invert with G, then E follows G's layout of the real image."""
    pipe, image = _invertible_pipe()
    inverted = pipe.invert(image, SOURCE, num_inference_steps=5)
    kwargs = {"latents": inverted, "num_inference_steps": 5, "output_type": "np", "return_reference": True}
    edited = pipe("a photo of a sks cat", cross_attention_guidance_scale=1.0, **kwargs)
    plain = pipe("a photo of a sks cat", cross_attention_guidance_scale=0.0, **kwargs)
    assert edited.images.shape == (1, 32, 32, 3) and np.isfinite(edited.images).all()
    assert not np.allclose(edited.images, plain.images, atol=1e-4)
    with_cfg = pipe.invert(image, SOURCE, num_inference_steps=5, guidance_scale=2.0, model="edit")
    assert not torch.allclose(with_cfg, inverted)
    with pytest.raises(ValueError, match="model role"):
        pipe.invert(image, SOURCE, num_inference_steps=2, model="base")


def test_sdxl_inversion_warns_about_non_ddim_sampling():
    pipe = blend_xl_pipe(scheduler="euler")
    with pytest.warns(UserWarning, match="DDIMScheduler.from_config"):
        latents = pipe.invert(_smooth_image(64), SOURCE, num_inference_steps=2)
    assert latents.shape == (1, 4, 32, 32) and torch.isfinite(latents).all()
