"""The timed work: one DreamBlend timestep, and a whole image as the pipelines' lockstep loop.

Each timestep goes through the pipelines' own :class:`~dreamblend.pipelines.blend.DreamBlendSampler`
(DESIGN §2: G's CFG step records its conditional maps, E's conditional pass is scored against them
and differentiated to the float32 latent, the latent moves by ``-alpha * grad``, E takes its CFG step
at the updated latent), with the peer's capture object in place of the pipeline's store. So every
peer runs the code users run and only the attention path differs. G and E advance in lockstep:
one timestep's reference maps are dropped before the next are recorded, so memory is flat in steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor

from benchmarks.models import ModelSpec, make_scheduler
from benchmarks.peers import Capture
from dreamblend.pipelines.blend import Conditioning, DreamBlendSampler, ModelPair, resolve_alpha

__all__ = ["Run", "image", "lockstep", "middle_step", "sampler_for"]


@dataclass
class Run:
    """One peer on one batch: G and E, the peer's capture, the start latent and the conditioning.

    ``workload`` is the peer's: "plain" (G's CFG step only), "unguided" (G and E, no guidance) or
    "guided" (the DreamBlend step).
    """

    spec: ModelSpec
    g: UNet2DConditionModel
    e: UNet2DConditionModel
    capture: Capture | None
    latents: Tensor
    cond: Conditioning
    workload: str

    @property
    def alpha(self) -> float:
        return resolve_alpha(None, self.spec.prediction_type) if self.workload == "guided" else 0.0


def sampler_for(run: Run, steps: int) -> tuple[DreamBlendSampler, Tensor]:
    """The pipelines' sampler for a ``steps``-step DDIM schedule, and that schedule's timesteps."""
    scheduler = make_scheduler(run.spec)
    scheduler.set_timesteps(steps, device=run.latents.device)
    sampler = DreamBlendSampler(
        ModelPair(run.g, run.e),
        run.capture,
        run.cond,
        scheduler,
        alpha=run.alpha,
        guided_steps=frozenset(range(steps)),  # emptied by the sampler when alpha is 0
        num_steps=steps,
        return_reference=True,
        edit_step_kwargs={},
        guidance_step_kwargs={},
    )
    return sampler, scheduler.timesteps


@torch.no_grad()  # as the pipelines' __call__: only the guidance update enables grad, locally
def lockstep(
    sampler: DreamBlendSampler, workload: str, i: int, t: Tensor, x_g: Tensor, x_e: Tensor
) -> tuple[Tensor, Tensor]:
    """Step ``i`` (timestep ``t``) for G and, unless the workload is "plain", for E."""
    x_g, ref = sampler.guidance_step(i, t, x_g)
    if workload == "plain":
        return x_g, x_e
    return x_g, sampler.edit_step(i, t, x_e, ref)


def middle_step(run: Run) -> Callable[[], tuple[Tensor, Tensor]]:
    """The step workload: one call runs the middle timestep of a 50-step schedule from the start latent."""
    sampler, timesteps = sampler_for(run, 50)
    i = len(timesteps) // 2
    return partial(lockstep, sampler, run.workload, i, timesteps[i], run.latents, run.latents)


def image(run: Run, steps: int) -> tuple[Tensor, Tensor]:
    """A whole ``steps``-step image (the UNet loop, no VAE) from the shared start latent."""
    sampler, timesteps = sampler_for(run, steps)
    x_g = x_e = run.latents
    for i, t in enumerate(timesteps):
        x_g, x_e = lockstep(sampler, run.workload, i, t, x_g, x_e)
    return x_g, x_e
