"""DreamBlendPipeline: cross-attention guided blending of two SD1.x/2.x checkpoints (Algorithm 1)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

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
from dreamblend.tokens import token_embeddings


class DreamBlendPipeline(DreamBlendMixin, StableDiffusionPipeline):
    """Stable Diffusion 1.x/2.x pipeline that samples an edit checkpoint E under a guidance checkpoint G.

    G is ``guidance_unet`` (a UNet, a pipeline, a diffusers folder or a hub id), or ``unet`` itself
    under other LoRA adapters (``guidance_adapter=``/``edit_adapter=`` at call time; by default G is
    the base model with adapters off). E is ``unet``. Both share the VAE, text encoder and tokenizer.
    Everything else (``from_pretrained``, ``from_pipe``, LoRA loading, offloading) is
    :class:`~diffusers.StableDiffusionPipeline`'s.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->guidance_unet->unet->vae"
    _optional_components = [*StableDiffusionPipeline._optional_components, "guidance_unet"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        requires_safety_checker: bool = True,
        guidance_unet: UNet2DConditionModel | str | os.PathLike | None = None,
    ) -> None:
        super().__init__(
            vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder,
            requires_safety_checker,
        )  # fmt: skip
        self.register_modules(guidance_unet=self._guidance_unet(guidance_unet))

    def _text_width(self) -> int | None:
        return None if self.text_encoder is None else self.text_encoder.config.hidden_size

    def _token_scope(self, embeddings: Mapping[str, torch.Tensor] | None) -> AbstractContextManager:
        return token_embeddings(self.tokenizer, self.text_encoder, embeddings)

    def _conditioning(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        guidance_scale: float,
        num_images_per_prompt: int,
        device: torch.device,
        height: int,
        width: int,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
    ) -> Conditioning:
        do_cfg = guidance_scale > 1.0
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            do_cfg,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            clip_skip=clip_skip,
        )
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
        return Conditioning(embeds, guidance_scale)

    def _decode(
        self, latents: torch.Tensor, output_type: str, device: torch.device, dtype: torch.dtype
    ) -> tuple[Any, list[bool] | None]:
        if output_type == "latent":
            return latents, None
        image = vae_decode(self.vae, latents)
        image, nsfw = self.run_safety_checker(image, device, dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not x for x in nsfw]
        return self.image_processor.postprocess(
            image, output_type=output_type, do_denormalize=denormalize
        ), nsfw

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        cross_attention_guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance_steps: GuidanceSteps = None,
        attention_layers: LayerSpec | list[LayerSpec] | None = None,
        attention_tokens: list[int | str] | None = None,
        head_mean: bool = False,
        attention_backend: str = "auto",
        schedule: str = "lockstep",
        guidance_adapter: AdapterSpec = None,
        edit_adapter: AdapterSpec = None,
        guidance_token_embeddings: Mapping[str, torch.Tensor] | None = None,
        return_reference: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
        attention_callback: AttentionCallback | None = None,
    ) -> DreamBlendPipelineOutput | tuple:
        """Generate with E under G's cross-attention guidance.

        Args beyond :class:`~diffusers.StableDiffusionPipeline`'s:
            guidance_scale: classifier-free guidance of both G and E (paper: 3.0 for an edit checkpoint
                at fine-tuning step 100, 2.0 at step 200).
            cross_attention_guidance_scale: alpha, the step size of the latent update (paper: 0.1 and
                0.07); default 0.1, or 0.01 for v-prediction models. 0 samples E alone.
            guidance_steps: which steps are guided: a ``(start, end)`` fraction range of floats or a list
                of step indices; default all.
            attention_layers, attention_tokens, head_mean, attention_backend: what the guidance loss
                compares, see :class:`dreamblend.AttentionStore` (default: every cross-attention layer,
                all tokens, per head). ``attention_tokens`` takes token indices or words of the prompt
                (``["sks", "dog"]``; a word in several pieces selects all of them).
            schedule: "lockstep" (G and E advance together; one step of maps in memory) or "two_phase"
                (all of G first, as in the paper). Both give the same images (pass a generator when
                the scheduler draws noise, e.g. DDIM with ``eta > 0``).
            guidance_adapter, edit_adapter: LoRA adapter name(s) (or ``{name: weight}``) for G and E.
                On a single UNet, G defaults to the base model (adapters off), E to the active adapters.
            guidance_token_embeddings: ``{token: vector}`` that G's prompt is encoded with instead of the
                text encoder's rows, when G and E learned different vectors for one token (e.g. an
                AttnDreamBooth stage-1 checkpoint as G); the tokens must exist in the tokenizer.
                :func:`dreamblend.checkpoints.load_dreamblend` returns them for checkpoint folders.
            return_reference: also decode G's image into ``reference_images``.
            callback_on_step_end: called after each of E's steps with E's ``latents`` (the only tensor
                input), which it may replace.
            attention_callback: ``f(role, step_index, maps)`` with the conditional branch's maps
                ``{layer: map}`` of each CFG step of G (role "guidance") and E ("edit"), selected like the
                guidance maps; G then runs all steps. The maps are read-only (G's are E's reference at
                guided steps). For analysis, e.g. :mod:`dreamblend.analysis.maps`.

        Returns:
            :class:`DreamBlendPipelineOutput`, or ``(images, reference_images, nsfw_content_detected)``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(
            prompt,
            height,
            width,
            None,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        alpha = resolve_alpha(cross_attention_guidance_scale, self.scheduler.config.prediction_type)
        check_schedule(schedule)
        pair = self._model_pair(guidance_adapter, edit_adapter)
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = None
        self._interrupt = False
        device = self._execution_device

        # 1. Text conditioning, shared by G and E unless G has its own token vectors
        cond, guidance_cond = self._role_conditioning(
            guidance_token_embeddings,
            prompt=prompt,
            negative_prompt=negative_prompt,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            device=device,
            height=height,
            width=width,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            clip_skip=clip_skip,
        )

        # 2. G and E from one start latent through Algorithm 1
        store = self._attention_store(
            prompt, attention_tokens, head_mean, attention_layers, attention_backend
        )
        latents, g_latents = self._blend(
            pair,
            cond,
            store,
            guidance_cond=guidance_cond,
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
        dtype = cond.embeds.dtype
        images, nsfw = self._decode(latents, output_type, device, dtype)
        reference = self._decode(g_latents, output_type, device, dtype)[0] if return_reference else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, reference, nsfw
        return DreamBlendPipelineOutput(images=images, reference_images=reference, nsfw_content_detected=nsfw)
