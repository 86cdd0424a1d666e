"""DreamBlendSD3Pipeline: Algorithm 1 on Stable Diffusion 3 / 3.5 (flow matching, joint attention).

G and E are two ``SD3Transformer2DModel`` checkpoints, or LoRA adapters on one transformer; the
sampling machinery is shared with the UNet pipelines (see :mod:`dreamblend.mmdit.sampling`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps
from torch import Tensor
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from dreamblend.mmdit.sampling import MMDiTBlendMixin, attention_store
from dreamblend.pipelines.blend import (
    AdapterSpec,
    AttentionCallback,
    Conditioning,
    DreamBlendPipelineOutput,
    GuidanceSteps,
)
from dreamblend.store import LayerSpec
from dreamblend.tokens import TextSegment


class DreamBlendSD3Pipeline(MMDiTBlendMixin, StableDiffusion3Pipeline):
    """SD3 pipeline that samples an edit transformer E under a guidance transformer G's attention maps.

    Pair the models with ``guidance_transformer=`` (a second checkpoint: a transformer, a pipeline
    sharing this one's VAE and text encoders, or a diffusers folder), or load LoRA adapters on the
    one transformer (``pipe.load_lora_weights(path, adapter_name=...)``) and name them with
    ``guidance_adapter=`` / ``edit_adapter=`` in the call. Maps are the image-query x text-key block of
    each joint attention (text tokens: CLIP's 77, then T5's, as SD3 concatenates them), captured
    from G's conditional branch and followed by E through one gradient step on the latent per step.
    A word in ``attention_tokens`` selects its CLIP positions and, with a T5 encoder, its T5 ones.
    """

    model_cpu_offload_seq = (
        "text_encoder->text_encoder_2->text_encoder_3->image_encoder->guidance_transformer->transformer->vae"
    )
    _optional_components = [*StableDiffusion3Pipeline._optional_components, "guidance_transformer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel | None,
        tokenizer_3: T5TokenizerFast | None,
        image_encoder: Any = None,
        feature_extractor: Any = None,
        guidance_transformer: SD3Transformer2DModel | DiffusionPipeline | str | os.PathLike | None = None,
    ) -> None:
        super().__init__(
            transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3,
            tokenizer_3, image_encoder, feature_extractor,
        )  # fmt: skip
        self.register_modules(guidance_transformer=self._load_guidance(guidance_transformer))

    def _timesteps(
        self, num_inference_steps: int, sigmas: list[float] | None, mu: float | None, latents: Tensor
    ) -> Tensor:
        """The stock pipeline's timesteps (with its resolution-dependent shift when configured)."""
        kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            patch = self.transformer.config.patch_size
            mu = self._resolution_shift((latents.shape[-2] // patch) * (latents.shape[-1] // patch), 1.16)
        if mu is not None:
            kwargs["mu"] = mu
        timesteps, _ = retrieve_timesteps(
            self.scheduler, num_inference_steps, latents.device, sigmas=sigmas, **kwargs
        )
        return timesteps

    def _text_segments(
        self, prompt: str | list[str] | None, prompt_3: str | list[str] | None, max_sequence_length: int
    ) -> list[TextSegment] | None:
        """SD3's text block: CLIP's tokens of ``prompt`` (CLIP-L's positions; CLIP-G's lie alongside in
        the channels), then T5's of ``prompt_3`` (default ``prompt``) when there is a T5 encoder."""
        if prompt is None:
            return None
        clip = self.tokenizer_max_length
        segments = [TextSegment(self.tokenizer, prompt, 0, clip)]
        if self.text_encoder_3 is not None:
            segments.append(TextSegment(self.tokenizer_3, prompt_3 or prompt, clip, max_sequence_length))
        return segments

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        cross_attention_guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        guidance_steps: GuidanceSteps = None,
        attention_layers: LayerSpec | list[LayerSpec] | None = None,
        attention_tokens: list[int | str] | None = None,
        head_mean: bool = False,
        attention_backend: str = "auto",
        schedule: str = "lockstep",
        guidance_adapter: AdapterSpec = None,
        edit_adapter: AdapterSpec = None,
        return_reference: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
        max_sequence_length: int = 256,
        mu: float | None = None,
        attention_callback: AttentionCallback | None = None,
    ) -> DreamBlendPipelineOutput | tuple:
        """Generate with E under G's joint-attention guidance (Algorithm 1 on flow matching).

        DreamBlend arguments as in :meth:`dreamblend.DreamBlendPipeline.__call__`
        (``cross_attention_guidance_scale`` is alpha; 0 gives the stock pipeline's images with E);
        the rest as in :class:`~diffusers.StableDiffusion3Pipeline`. The default alpha is the
        SD1.5 paper's and has not been calibrated for flow-matching models.

        Returns:
            :class:`~dreamblend.DreamBlendPipelineOutput`, or ``(images, reference_images)``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(
            prompt, prompt_2, prompt_3, height, width, negative_prompt, negative_prompt_2, negative_prompt_3,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )  # fmt: skip
        pair, alpha = self._start_call(
            guidance_scale, cross_attention_guidance_scale, schedule, guidance_adapter, edit_adapter
        )
        self._clip_skip = clip_skip
        device = self._execution_device

        # 1. Text: CLIP-L, CLIP-G and T5, shared by G and E; CFG batch [uncond; cond]
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_3=prompt_3,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            device=device,
            clip_skip=clip_skip,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
        )
        if self.do_classifier_free_guidance:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        cond = Conditioning(embeds, guidance_scale, {"pooled_projections": pooled})
        batch_size = embeds.shape[0] // (2 if cond.do_cfg else 1)

        # 2. The start latent l_T (float32, shared by G and E) and the flow-matching timesteps
        latents = self.prepare_latents(
            batch_size, self.transformer.config.in_channels, height, width, embeds.dtype, device, generator,
            latents,
        ).float()  # fmt: skip
        timesteps = self._timesteps(num_inference_steps, sigmas, mu, latents)

        # 3. G records reference maps, E follows them (DESIGN §2); E's image (and G's reference) decoded
        segments = self._text_segments(prompt, prompt_3, max_sequence_length)
        store = attention_store(segments, attention_tokens, head_mean, attention_layers, attention_backend)
        return self._flow_sample(
            pair, cond, store, timesteps, latents, alpha=alpha, guidance_steps=guidance_steps,
            schedule=schedule, return_reference=return_reference, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            attention_callback=attention_callback, output_type=output_type, return_dict=return_dict,
        )  # fmt: skip
