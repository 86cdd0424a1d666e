"""The peers compute the same guidance: maps, loss and latent gradient agree (tiny UNets).

This is what makes the timing comparison honest: every guided peer does the same work, and G's
output does not depend on how its maps were captured. The UNets run in float64: the L1 loss's
gradient flips sign wherever E's map crosses G's, and in float32 the peers' different summation
orders (which oneDNN/MKL pick per CPU: AVX2, AVX-512, AMX) move a few of those near-ties, which
changes the gradient by 1e-3 relative on these tiny maps. In float64 no element sits that close.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.models import SMOKE_MODELS, build_unet, make_inputs
from benchmarks.peers import PEERS, attached
from benchmarks.workloads import Run, sampler_for
from dreamblend.ops import available_backends

GUIDED = [
    "eager",
    "all_eager",
    "sdpa_recompute",
    *(f"ours_{b}" for b in ("cpp",) if b in available_backends()),
]


@pytest.fixture(scope="module", params=sorted(SMOKE_MODELS))
def models(request: pytest.FixtureRequest):
    spec = SMOKE_MODELS[request.param]
    cpu = torch.device("cpu")
    # Different weights for G and E, as for an underfit and an overfit checkpoint.
    return spec, build_unet(spec, 0, torch.float64, cpu), build_unet(spec, 1, torch.float64, cpu)


def guided_step(models, peer: str) -> dict[str, object]:
    """G's CFG step with capture, E's guidance update and E's CFG step at the middle of 50 steps."""
    spec, g, e = models
    with attached(PEERS[peer], (g, e)) as capture:
        latents, cond = make_inputs(g, spec, batch=2, guidance_scale=3.0, device=torch.device("cpu"))
        run = Run(spec, g, e, capture, latents, cond, PEERS[peer].workload)
        sampler, timesteps = sampler_for(run, 50)
        i, t = 25, timesteps[25]
        x_g, ref = sampler.guidance_step(i, t, latents)
        result = {"x_g": x_g, "x_e": sampler.edit_step(i, t, latents, ref)}
        if ref is not None:
            updated = sampler.guided_update(i, e, latents, t, ref)
            result.update(maps=dict(ref), loss=capture.loss, grad=(latents - updated) / run.alpha)
    return result


@pytest.fixture(scope="module")
def reference(models) -> dict[str, object]:
    return guided_step(models, "ours_torch")


@pytest.mark.parametrize("peer", GUIDED)
def test_guided_peers_agree_with_ours(models, reference, peer: str) -> None:
    got = guided_step(models, peer)
    assert got["maps"].keys() == reference["maps"].keys()
    # float64 maps and loss: probabilities <= 1 summed over at most 64 keys differ by ~1e-15.
    for name, expected in reference["maps"].items():
        assert expected.dtype == torch.float64
        torch.testing.assert_close(got["maps"][name], expected, rtol=0, atol=1e-12, msg=name)
    torch.testing.assert_close(got["loss"], reference["loss"], rtol=1e-10, atol=0)
    grad, expected = got["grad"], reference["grad"]
    assert expected.abs().max() > 0
    # The latent (as in the pipelines) is float32, so the gradient is rounded to float32 once (2**-24
    # relative per element) after float64 work: 1e-6 of the norm leaves room for that and nothing else.
    assert (grad - expected).norm() <= 1e-6 * expected.norm()
    # Latents after a step are float32: one float32 rounding apart at most.
    torch.testing.assert_close(got["x_g"], reference["x_g"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["x_e"], reference["x_e"], rtol=1e-6, atol=1e-6)


def test_guided_floor_runs_the_guided_passes_without_moving_the_latent(models, reference) -> None:
    """guided_floor does E's conditional forward and backward, but with a zero loss."""
    got = guided_step(models, "guided_floor")
    assert got["maps"] == {} and torch.count_nonzero(got["loss"]) == 0
    assert torch.count_nonzero(got["grad"]) == 0
    torch.testing.assert_close(got["x_g"], reference["x_g"], rtol=1e-6, atol=1e-6)


def test_capture_does_not_change_the_models_outputs(models, reference) -> None:
    floor = guided_step(models, "floor")
    torch.testing.assert_close(floor["x_g"], reference["x_g"], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(floor["x_e"], reference["x_e"])  # guidance moved E's latent
