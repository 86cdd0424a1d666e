"""The JeDi converter: with mask 1 everywhere and zero x0 the converted UNet is the base UNet (fp64)."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from dreamblend.jedi import check_jedi_unet, convert_unet, inpainting_input, is_jedi_unet
from dreamblend.testing import tiny_sd_components, tiny_sdxl_components
from dreamblend.toyworld.model import base_model_path

DTYPE = torch.float64


def toy_base_unet() -> UNet2DConditionModel:
    try:
        folder = base_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)


def sdxl_added(unet: UNet2DConditionModel, batch: int) -> dict[str, torch.Tensor]:
    if unet.config.addition_embed_type != "text_time":
        return {}
    pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
    return {
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, pooled, dtype=DTYPE),
            "time_ids": torch.rand(batch, 6, dtype=DTYPE) * 64,
        }
    }


UNETS = {
    "sd": lambda: tiny_sd_components(seed=0)["unet"],
    "sdxl": lambda: tiny_sdxl_components(seed=0)["unet"],
    "toy_base": toy_base_unet,
}


@pytest.mark.parametrize("name", list(UNETS))
def test_converted_unet_equals_base_with_everything_unknown(name: str) -> None:
    torch.manual_seed(0)
    base = UNETS[name]().to(DTYPE).eval()
    jedi = convert_unet(base)
    assert jedi.config.in_channels == 9 and is_jedi_unet(jedi) and not is_jedi_unet(base)
    size, batch = int(base.config.sample_size), 3
    x = torch.randn(batch, 4, size, size, dtype=DTYPE)
    context = torch.randn(batch, 5, base.config.cross_attention_dim, dtype=DTYPE)
    t = torch.tensor([10, 500, 990])
    extra = sdxl_added(base, batch)
    with torch.no_grad():
        expected = base(x, t, context, **extra).sample
        unknown = jedi(
            inpainting_input(x, torch.zeros_like(x), torch.ones(batch)), t, context, **extra
        ).sample
        # the new channels start at zero weight, so even a known x0 changes nothing before training
        known = jedi(inpainting_input(x, torch.randn_like(x), torch.zeros(batch)), t, context, **extra).sample
    # Same weights, same fp64 ops except conv_in's wider sum of exact zeros: equal to rounding.
    torch.testing.assert_close(unknown, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(known, expected, rtol=1e-12, atol=1e-12)
    # the base UNet is untouched and the weights are copies, not shared storage
    assert base.conv_in.weight.shape[1] == 4
    assert jedi.conv_in.weight.data_ptr() != base.conv_in.weight.data_ptr()


def test_a_trained_input_channel_changes_the_output() -> None:
    """The equality above is not vacuous: once the x0 channels have weight, x0 matters."""
    jedi = convert_unet(tiny_sd_components(seed=0)["unet"].to(DTYPE).eval())
    with torch.no_grad():
        jedi.conv_in.weight[:, 4:8] = 0.1
    x = torch.randn(1, 4, 16, 16, dtype=DTYPE)
    c = torch.randn(1, 5, 32, dtype=DTYPE)
    with torch.no_grad():
        zero = jedi(inpainting_input(x, torch.zeros_like(x), torch.zeros(1)), 500, c).sample
        known = jedi(inpainting_input(x, torch.ones_like(x), torch.zeros(1)), 500, c).sample
        masked = jedi(inpainting_input(x, torch.ones_like(x), torch.ones(1)), 500, c).sample
    assert (zero - known).abs().max() > 1e-3
    torch.testing.assert_close(masked, zero, rtol=0, atol=0)  # mask 1 hides x0 entirely


def test_saved_jedi_unet_loads_with_from_pretrained(tmp_path) -> None:
    jedi = convert_unet(tiny_sd_components(seed=0)["unet"])
    jedi.save_pretrained(tmp_path / "unet", safe_serialization=True)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert loaded.config.in_channels == 9 and is_jedi_unet(loaded)
    for (name, a), b in zip(jedi.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_input_layout_and_errors() -> None:
    x, x0 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = inpainting_input(x, x0, torch.tensor([0.0, 1.0]))
    assert out.shape == (2, 9, 8, 8)
    torch.testing.assert_close(out[:, :4], x)
    torch.testing.assert_close(out[0, 4:8], x0[0])
    assert out[1, 4:8].abs().max() == 0 and out[1, 8].min() == 1 and out[0, 8].max() == 0
    with pytest.raises(ValueError, match="one shape"):
        inpainting_input(x, x0[:1], torch.ones(2))
    with pytest.raises(ValueError, match="mask must be"):
        inpainting_input(x, x0, torch.ones(3))
    base = tiny_sd_components(seed=0)["unet"]
    with pytest.raises(ValueError, match="train it with 'dreamblend train jedi'"):
        check_jedi_unet(base)
    with pytest.raises(ValueError, match="needs no conversion"):
        convert_unet(convert_unet(base))
