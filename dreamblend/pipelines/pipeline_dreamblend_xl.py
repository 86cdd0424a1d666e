"""DreamBlendXLPipeline: cross-attention guided blending of two SDXL checkpoints (Algorithm 1)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from dreamblend.pipelines.blend import (
    AdapterSpec,
    AttentionCallback,
    Conditioning,
    DreamBlendMixin,
    DreamBlendPipelineOutput,
    GuidanceSteps,
    check_schedule,
    resolve_alpha,
    vae_decode,
)
from dreamblend.store import LayerSpec


class DreamBlendXLPipeline(DreamBlendMixin, StableDiffusionXLPipeline):
    """SDXL pipeline that samples an edit checkpoint E under a guidance checkpoint G.

    Models are paired as in :class:`~dreamblend.DreamBlendPipeline` (a second UNet, or LoRA adapters
    on one UNet, as the paper's SDXL experiments used); everything else is
    :class:`~diffusers.StableDiffusionXLPipeline`'s.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->guidance_unet->unet->vae"
    _optional_components = [*StableDiffusionXLPipeline._optional_components, "guidance_unet"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        guidance_unet: UNet2DConditionModel | str | os.PathLike | None = None,
    ) -> None:
        super().__init__(
            vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
            feature_extractor, force_zeros_for_empty_prompt, add_watermarker,
        )  # fmt: skip
        self.register_modules(guidance_unet=self._guidance_unet(guidance_unet))

    def _text_width(self) -> int | None:
        encoders = [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        return sum(e.config.hidden_size for e in encoders) if len(encoders) == 2 else None

    def _vae_upcast(self) -> bool:
        return self.vae.dtype == torch.float16 and self.vae.config.force_upcast

    def _conditioning(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        guidance_scale: float,
        num_images_per_prompt: int,
        device: torch.device,
        height: int,
        width: int,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
    ) -> Conditioning:
        """Text embeddings plus SDXL's pooled embedding and size/crop micro-conditioning."""
        do_cfg = guidance_scale > 1.0
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt,
            prompt_2,
            device,
            num_images_per_prompt,
            do_cfg,
            negative_prompt,
            negative_prompt_2,
            clip_skip=clip_skip,
        )
        projection_dim = (
            int(pooled.shape[-1])
            if self.text_encoder_2 is None
            else self.text_encoder_2.config.projection_dim
        )
        time_ids = self._get_add_time_ids(
            original_size or (height, width),
            crops_coords_top_left,
            target_size or (height, width),
            dtype=embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        )
        if do_cfg:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        added = {"text_embeds": pooled.to(device), "time_ids": time_ids.to(device).repeat(embeds.shape[0], 1)}
        return Conditioning(embeds.to(device), guidance_scale, {"added_cond_kwargs": added})

    def _decode(self, latents: torch.Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return latents
        image = vae_decode(self.vae, latents, upcast=self._vae_upcast())
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        cross_attention_guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
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
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
        attention_callback: AttentionCallback | None = None,
    ) -> DreamBlendPipelineOutput | tuple:
        """Generate with E under G's cross-attention guidance.

        DreamBlend arguments as in :meth:`DreamBlendPipeline.__call__`; SDXL arguments (``prompt_2``,
        micro-conditioning sizes) as in :class:`~diffusers.StableDiffusionXLPipeline`.

        Returns:
            :class:`DreamBlendPipelineOutput`, or ``(images, reference_images)``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            None,
            negative_prompt,
            negative_prompt_2,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        alpha = resolve_alpha(cross_attention_guidance_scale, self.scheduler.config.prediction_type)
        check_schedule(schedule)
        pair = self._model_pair(guidance_adapter, edit_adapter)
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = None
        self._denoising_end = None
        self._interrupt = False
        device = self._execution_device

        # 1. Text and micro-conditioning, shared by G and E
        cond = self._conditioning(
            prompt, negative_prompt, guidance_scale, num_images_per_prompt, device, height, width,
            prompt_2, negative_prompt_2, original_size, crops_coords_top_left, target_size, clip_skip,
        )  # fmt: skip

        # 2. G and E from one start latent through Algorithm 1
        store = self._attention_store(
            prompt, attention_tokens, head_mean, attention_layers, attention_backend
        )
        latents, g_latents = self._blend(
            pair,
            cond,
            store,
            guidance_cond=cond,
            alpha=alpha,
            num_inference_steps=num_inference_steps,
            height=height,
            width=width,
            eta=eta,
            generator=generator,
            latents=latents,
            guidance_steps=guidance_steps,
            schedule=schedule,
            return_reference=return_reference,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            attention_callback=attention_callback,
        )

        # 3. Decode E's image (and G's reference)
        return self._output(latents, g_latents, output_type, return_reference, return_dict)
