"""The tiny SD3/FLUX fixtures: seeded per component, the caller's RNG untouched, widths that fit together."""

from __future__ import annotations

import pytest
import torch

from dreamblend.testing_mmdit import tiny_flux_components, tiny_sd3_components

BUILDERS = {"sd3": lambda seed: tiny_sd3_components(seed, t5=True), "flux": tiny_flux_components}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    ref = a.state_dict()
    return all(torch.equal(ref[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_weights_are_seeded_and_leave_global_rng_alone(name):
    state = torch.random.get_rng_state()
    first, again, other = BUILDERS[name](0), BUILDERS[name](0), BUILDERS[name](1)
    assert torch.equal(torch.random.get_rng_state(), state)
    modules = [key for key, value in first.items() if isinstance(value, torch.nn.Module)]
    assert len(modules) == (5 if name == "sd3" else 4)
    for key in modules:
        assert same_weights(first[key], again[key]), key
        assert not same_weights(first[key], other[key]), key


def test_sd3_text_widths_fill_the_transformer_inputs():
    parts = tiny_sd3_components(t5=True)
    config = parts["transformer"].config
    clips = [parts["text_encoder"].config, parts["text_encoder_2"].config]
    # SD3 concatenates the two CLIPs' hidden states (padded to T5's width) and their pooled projections.
    t5_width = parts["text_encoder_3"].config.d_model
    assert sum(c.hidden_size for c in clips) == t5_width == config.joint_attention_dim
    assert sum(c.projection_dim for c in clips) == config.pooled_projection_dim
    assert parts["vae"].config.shift_factor is not None  # the SD3/FLUX pipelines shift decoded latents
