"""The benchmarked architectures are the published ones (checked without memory on the meta device)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.models import MODELS, build_unet, make_inputs
from benchmarks.peers import PEERS, attached

# Parameter counts of the released UNets: SD1.5, SD2.1 (768-v), SDXL base 1.0, and the shipped
# toy-world base (its safetensors file).
PUBLISHED = {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684, "toyworld": 1_534_084}
# (cross-attention layers, heads and positions of the first one) at the benchmarked resolution.
LAYOUT = {
    "sd15": (16, 8, 64 * 64),
    "sd21": (16, 5, 96 * 96),
    "sdxl": (70, 10, 64 * 64),
    "toyworld": (7, 2, 16 * 16),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_published_architecture_runs_with_capture(name: str) -> None:
    spec = MODELS[name]
    meta = torch.device("meta")
    unet = build_unet(spec, 0, torch.float16, meta)
    assert sum(p.numel() for p in unet.parameters()) == PUBLISHED[name]
    latents, cond = make_inputs(unet, spec, batch=1, guidance_scale=3.0, device=meta)
    assert latents.shape[-1] * spec.vae_scale_factor == spec.resolution and cond.embeds.shape[1] == 77
    with attached(PEERS["ours_torch"], (unet,)) as store, store.record(rows=slice(1, 2)):
        x = torch.cat([latents, latents]).half()
        out = unet(x, torch.tensor(500, device=meta), encoder_hidden_states=cond.embeds, **cond.kwargs)
    assert out.sample.shape == x.shape
    layers, heads, positions = LAYOUT[name]
    assert len(store.maps) == layers
    assert next(iter(store.maps.values())).shape == (1, heads, positions, 77)
