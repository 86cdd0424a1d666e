"""What the MMDiT pipelines (SD3, FLUX) share: G/E pairing, the model call, the DreamBlend loop.

The machinery of :mod:`dreamblend.pipelines.blend` (model pairing, the CFG step, the guided update,
the sampler) is written against the UNet calling convention ``model(sample, t,
encoder_hidden_states=..., **kwargs)`` on ``(B, C, H, W)`` latents. :class:`TransformerCall` puts a
transformer behind that convention (FLUX's packing of 2x2 patches included: the loop keeps latents
unpacked, which the elementwise flow-matching step does not notice), and :class:`FlowScheduler`
gives the flow-matching scheduler the identity ``scale_model_input`` the sampler calls, so the
MMDiT pipelines reuse that code instead of copying it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from diffusers import DiffusionPipeline, FluxPipeline, FluxTransformer2DModel
from torch import Tensor, nn

from dreamblend.mmdit.processors import attach
from dreamblend.pipelines.blend import (
    AdapterSpec,
    DreamBlendSampler,
    ModelPair,
    check_shares_components,
    step_callback,
)


class TransformerCall:
    """An MMDiT transformer called the way the shared sampler calls a UNet.

    Conditioning kwargs (``pooled_projections``, FLUX's ids and guidance) pass through; the timestep
    is broadcast to the batch as the stock pipelines do.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def __call__(
        self,
        sample: Tensor,
        t: Tensor,
        encoder_hidden_states: Tensor,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> Any:
        return self.model(
            hidden_states=sample,
            timestep=t.expand(sample.shape[0]),
            encoder_hidden_states=encoder_hidden_states,
            return_dict=return_dict,
            **kwargs,
        )


class FluxCall(TransformerCall):
    """FLUX on ``(B, C, H, W)`` latents: packed into 2x2-patch tokens for the model, the output unpacked.

    The timestep goes in as ``t / 1000`` in the latents' dtype and a float ``guidance`` as a float32
    batch, as ``FluxPipeline`` passes them.
    """

    def __call__(
        self,
        sample: Tensor,
        t: Tensor,
        encoder_hidden_states: Tensor,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor]:
        b, c, h, w = sample.shape
        timestep = t.expand(b).to(sample.dtype) / 1000
        if isinstance(kwargs.get("guidance"), float):
            kwargs["guidance"] = torch.full(
                [b], kwargs["guidance"], device=sample.device, dtype=torch.float32
            )
        out = self.model(
            hidden_states=FluxPipeline._pack_latents(sample, b, c, h, w),
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            return_dict=False,
            **kwargs,
        )[0]
        return (unpack(out, h, w),)


def unpack(packed: Tensor, height: int, width: int) -> Tensor:
    """FLUX's packed ``(B, H/2 * W/2, 4C)`` tokens as ``(B, C, H, W)`` latents (H, W in latent pixels)."""
    return FluxPipeline._unpack_latents(packed, height, width, vae_scale_factor=1)


def pack(latents: Tensor) -> Tensor:
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


class TransformerPair(ModelPair):
    """:class:`ModelPair` whose :meth:`use` hands out the role's transformer as a :class:`TransformerCall`."""

    def use(self, role: str) -> TransformerCall:  # type: ignore[override]
        model = super().use(role)
        return (FluxCall if isinstance(model, FluxTransformer2DModel) else TransformerCall)(model)


class FlowScheduler:
    """A flow-matching scheduler with the ``scale_model_input`` the sampler calls (the identity there)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def scale_model_input(self, sample: Tensor, t: Tensor) -> Tensor:
        return sample

    def step(self, *args: Any, **kwargs: Any) -> Any:
        return self.scheduler.step(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> FlowScheduler:
        return FlowScheduler(copy.deepcopy(self.scheduler, memo))


class MMDiTSampler(DreamBlendSampler):
    """The shared sampler with the MMDiT processors installed on G and E instead of the UNet ones."""

    @contextmanager
    def session(self) -> Iterator[MMDiTSampler]:
        with ExitStack() as stack:
            stack.enter_context(self.pair.session())
            for model in self.pair.distinct_unets():
                stack.enter_context(attach(model, self.store))
            yield self


class MMDiTBlendMixin:
    """Loading and pairing G, and the DreamBlend loop, for pipelines with a ``transformer``."""

    def _load_guidance(self, spec: Any) -> nn.Module | None:
        """G's transformer from a transformer, a pipeline sharing this one's components, or a folder."""
        cls = type(self.transformer)
        if spec is None or isinstance(spec, cls):
            return spec
        if isinstance(spec, DiffusionPipeline):
            check_shares_components(self, spec)
            if not isinstance(getattr(spec, "transformer", None), cls):
                raise TypeError(f"{type(spec).__name__} has no {cls.__name__} to use as the guidance model")
            return spec.transformer
        if isinstance(spec, (str, os.PathLike)):
            subfolder = "transformer" if os.path.isdir(os.path.join(spec, "transformer")) else None
            model = cls.from_pretrained(spec, subfolder=subfolder, torch_dtype=self.transformer.dtype)
            return model if model.device == self.transformer.device else model.to(self.transformer.device)
        raise TypeError(
            f"guidance_transformer must be a {cls.__name__}, a pipeline with one or a diffusers folder, "
            f"got {type(spec).__name__}"
        )

    def _model_pair(self, guidance_adapter: AdapterSpec, edit_adapter: AdapterSpec) -> TransformerPair:
        try:
            return TransformerPair.resolve(
                self.transformer,
                self.guidance_transformer,
                guidance_adapter,
                edit_adapter,
                text_width=None,
                latent_channels=self.transformer.config.in_channels,
            )
        except ValueError as exc:
            # The shared pairing speaks of UNets; here the models and the argument are transformers.
            message = (
                str(exc).replace("guidance_unet=", "guidance_transformer=").replace("UNet", "transformer")
            )
            raise ValueError(message) from None

    def _step_callback(
        self, callback: Callable | None, tensor_inputs: Any, i: int, t: Tensor, latents: Tensor
    ) -> Tensor:
        return step_callback(self, callback, tensor_inputs, i, t, latents)

    def _run(
        self,
        sampler: MMDiTSampler,
        timesteps: Tensor,
        latents: Tensor,
        schedule: str,
        callback: Callable | None,
        tensor_inputs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Algorithm 1 from ``latents``: E's final latents and G's (see ``DreamBlendMixin._blend``)."""
        g_latents, refs = latents, {}
        phases = ("guidance", "edit") if schedule == "two_phase" else ("lockstep",)
        with sampler.session(), self.progress_bar(total=len(timesteps) * len(phases)) as progress_bar:
            for phase in phases:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    if phase != "edit" and sampler.runs_guidance(i):
                        # G: one step; at guided steps its conditional maps are E's reference
                        g_latents, refs[i] = sampler.guidance_step(i, t, g_latents)
                    if phase != "guidance":
                        # E: one gradient step toward G's maps, then its own step at the new latent
                        latents = sampler.edit_step(i, t, latents, refs.pop(i, None))
                        latents = self._step_callback(callback, tensor_inputs, i, t, latents)
                    progress_bar.update()
        sampler.finish()
        return latents, g_latents
