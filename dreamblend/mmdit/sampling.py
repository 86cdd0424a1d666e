"""What the MMDiT pipelines (SD3, FLUX) share: G/E pairing, the model call, the word positions, the
call's set-up, timestep shift, flow-matching loop and decoding.

The machinery of :mod:`dreamblend.pipelines.blend` (model pairing, the CFG step, the guided update,
the sampler and its loop, :class:`~dreamblend.pipelines.blend.BlendLoop`) is written against the
UNet calling convention ``model(sample, t, encoder_hidden_states=..., **kwargs)`` on ``(B, C, H, W)``
latents. :class:`TransformerCall` puts a transformer behind that convention (FLUX's packing of 2x2
patches included: the loop keeps latents unpacked, which the elementwise flow-matching step does not
notice), :class:`FlowScheduler` gives the flow-matching scheduler the identity ``scale_model_input``
the sampler calls, and :class:`MMDiTSampler` installs the joint-attention processors, so the MMDiT
pipelines reuse that code instead of copying it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor, nn

from dreamblend.mmdit.processors import attach
from dreamblend.pipelines.blend import (
    AdapterSpec,
    BlendLoop,
    Conditioning,
    DreamBlendPipelineOutput,
    DreamBlendSampler,
    ModelPair,
    check_schedule,
    check_shares_components,
    resolve_alpha,
)
from dreamblend.store import AttentionStore, LayerSpec
from dreamblend.tokens import TextSegment, TokenSelection, has_words, resolve_text_tokens


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

    noun = "transformer"
    guidance_argument = "guidance_transformer"

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

    install = staticmethod(attach)


def attention_store(
    segments: Sequence[TextSegment] | None,
    tokens: TokenSelection | None,
    head_mean: bool,
    layers: LayerSpec | Sequence[LayerSpec] | None,
    backend: str,
) -> AttentionStore:
    """The call's store; words in ``attention_tokens`` become positions in the joint text block here.

    ``segments``: the text encoders' parts of the text block and the prompts they read (None when the
    call got embeddings instead of prompts).
    """
    if has_words(tokens):
        if segments is None:
            raise ValueError(
                f"attention_tokens {list(tokens)} name words, but no prompt text was given "
                "(prompt_embeds); pass the prompt, or token indices"
            )
        tokens = resolve_text_tokens(segments, tokens)
    return AttentionStore(tokens, head_mean, layers, backend)


class MMDiTBlendMixin(BlendLoop):
    """Loading and pairing G, the call's set-up and the flow-matching loop for pipelines with a
    ``transformer``; the loop itself is :class:`BlendLoop`'s."""

    sampler_class = MMDiTSampler

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
        return TransformerPair.resolve(
            self.transformer,
            self.guidance_transformer,
            guidance_adapter,
            edit_adapter,
            text_width=None,
            latent_channels=self.transformer.config.in_channels,
        )

    def _start_call(
        self,
        guidance_scale: float,
        cross_attention_guidance_scale: float | None,
        schedule: str,
        guidance_adapter: AdapterSpec,
        edit_adapter: AdapterSpec,
    ) -> tuple[TransformerPair, float]:
        """G and E and alpha for the call (arguments checked), and the stock pipelines' call state."""
        alpha = resolve_alpha(cross_attention_guidance_scale, "epsilon")
        check_schedule(schedule)
        pair = self._model_pair(guidance_adapter, edit_adapter)
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = None
        self._interrupt = False
        return pair, alpha

    def _resolution_shift(self, num_tokens: int, max_shift: float) -> float:
        """The stock pipelines' timestep shift ``mu`` for an image of ``num_tokens`` tokens: linear from
        ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len`` (scheduler config;
        the pipelines' defaults where it has none: SD3's ``max_shift`` is 1.16, FLUX's 1.15)."""
        config = self.scheduler.config
        return calculate_shift(
            num_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", max_shift),
        )

    def _decode(self, latents: Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return latents
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)

    def _flow_sample(
        self,
        pair: TransformerPair,
        cond: Conditioning,
        store: AttentionStore,
        timesteps: Tensor,
        latents: Tensor,
        *,
        output_type: str,
        return_dict: bool,
        **loop: Any,
    ) -> DreamBlendPipelineOutput | tuple:
        """G and E through :meth:`BlendLoop._sample` (``loop``: its keyword arguments) with the flow-matching
        step, which takes no extra step arguments, then the call's decoded result."""
        latents, g_latents = self._sample(
            pair,
            cond,
            store,
            FlowScheduler(self.scheduler),
            timesteps,
            latents,
            edit_step_kwargs={},
            guidance_step_kwargs={},
            **loop,
        )
        return self._output(latents, g_latents, output_type, loop["return_reference"], return_dict)
