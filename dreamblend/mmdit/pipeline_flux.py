"""DreamBlendFluxPipeline: Algorithm 1 on FLUX.1 (flow matching, guidance-distilled, joint attention).

FLUX.1 [dev] is guidance-distilled: the guidance scale is an input of the model and there is no
unconditional batch, so G records and E is guided on the one conditional pass. Maps come from the
double- and single-stream blocks; their text tokens are T5's (``tokenizer_2``), which lead FLUX's
joint sequence. The sampling machinery is shared with the other pipelines (see
:mod:`dreamblend.mmdit.sampling`); latents stay unpacked ``(B, C, H, W)`` inside the loop and are
packed as ``FluxPipeline`` packs them wherever they leave it (``latents=``, callbacks, latent output).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from dreamblend.mmdit.sampling import MMDiTBlendMixin, attention_store, pack, unpack
from dreamblend.pipelines.blend import (
    AdapterSpec,
    AttentionCallback,
    Conditioning,
    DreamBlendPipelineOutput,
    GuidanceSteps,
)
from dreamblend.store import LayerSpec
from dreamblend.tokens import TextSegment


class DreamBlendFluxPipeline(MMDiTBlendMixin, FluxPipeline):
    """FLUX pipeline that samples an edit transformer E under a guidance transformer G's attention maps.

    Pairing as in :class:`~dreamblend.mmdit.DreamBlendSD3Pipeline`: ``guidance_transformer=``, or
    LoRA adapters on the one transformer (``pipe.load_lora_weights(path, adapter_name=...)``, e.g. the
    files diffusers' DreamBooth-LoRA FLUX script writes) named by ``guidance_adapter=`` /
    ``edit_adapter=``. True CFG (``true_cfg_scale`` with a negative prompt) is not supported.
    """

    model_cpu_offload_seq = (
        "text_encoder->text_encoder_2->image_encoder->guidance_transformer->transformer->vae"
    )
    _optional_components = [*FluxPipeline._optional_components, "guidance_transformer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
        image_encoder: Any = None,
        feature_extractor: Any = None,
        guidance_transformer: FluxTransformer2DModel | DiffusionPipeline | str | os.PathLike | None = None,
    ) -> None:
        super().__init__(
            scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer, image_encoder,
            feature_extractor,
        )  # fmt: skip
        self.register_modules(guidance_transformer=self._load_guidance(guidance_transformer))

    def _step_callback(
        self, callback: Callable | None, tensor_inputs: Sequence[str], i: int, t: Tensor, latents: Tensor
    ) -> Tensor:
        """Callbacks see packed latents, as ``FluxPipeline``'s do."""
        if callback is None:
            return latents
        h, w = latents.shape[-2:]
        return unpack(super()._step_callback(callback, tensor_inputs, i, t, pack(latents)), h, w)

    def _timesteps(self, num_inference_steps: int, sigmas: Sequence[float] | None, num_tokens: int) -> Tensor:
        """The stock pipeline's schedule: linear sigmas shifted by the image's token count."""
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if self.scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        mu = self._resolution_shift(num_tokens, 1.15)
        timesteps, _ = retrieve_timesteps(
            self.scheduler, num_inference_steps, self._execution_device, sigmas=sigmas, mu=mu
        )
        self.scheduler.set_begin_index(0)
        return timesteps

    def _decode(self, latents: Tensor, output_type: str) -> Any:
        """Latent output is packed, as ``FluxPipeline``'s is."""
        return pack(latents) if output_type == "latent" else super()._decode(latents, output_type)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        cross_attention_guidance_scale: float | None = None,
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
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
        max_sequence_length: int = 512,
        attention_callback: AttentionCallback | None = None,
    ) -> DreamBlendPipelineOutput | tuple:
        """Generate with E under G's joint-attention guidance (Algorithm 1 on FLUX).

        DreamBlend arguments as in :meth:`dreamblend.DreamBlendPipeline.__call__`
        (``cross_attention_guidance_scale`` is alpha; 0 gives the stock pipeline's images with E);
        ``attention_tokens`` words resolve in the T5 tokenization of ``prompt_2`` (default ``prompt``),
        and integers are positions in it (``pipe.tokenizer_2(prompt).input_ids``: no start token).
        ``guidance_scale`` is FLUX's distilled guidance input. The default alpha is the SD1.5 paper's,
        not calibrated for FLUX.

        Returns:
            :class:`~dreamblend.DreamBlendPipelineOutput`, or ``(images, reference_images)``.
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
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        pair, alpha = self._start_call(
            guidance_scale, cross_attention_guidance_scale, schedule, guidance_adapter, edit_adapter
        )
        self._current_timestep = None
        device = self._execution_device

        # 1. Text: CLIP's pooled embedding and T5's sequence, shared by G and E (no CFG batch)
        embeds, pooled, text_ids = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
        )
        batch_size = embeds.shape[0]

        # 2. The start latent l_T (float32, unpacked, shared by G and E), its ids and the timesteps
        channels = self.transformer.config.in_channels // 4
        packed, image_ids = self.prepare_latents(
            batch_size, channels, height, width, embeds.dtype, device, generator, latents
        )
        cell = self.vae_scale_factor * 2  # latents are 2x2-patch tokens of the VAE's grid
        latents = unpack(packed, 2 * (int(height) // cell), 2 * (int(width) // cell)).float()
        timesteps = self._timesteps(num_inference_steps, sigmas, packed.shape[1])
        kwargs: dict[str, Any] = {"pooled_projections": pooled, "txt_ids": text_ids, "img_ids": image_ids}
        if self.transformer.config.guidance_embeds:
            kwargs["guidance"] = float(guidance_scale)  # a float32 tensor once in the model call
        # guidance_scale 1.0 keeps the Conditioning's CFG batch off; FLUX's own guidance rides in kwargs
        cond = Conditioning(embeds, 1.0, kwargs)

        # 3. G records reference maps, E follows them (DESIGN §2); E's image (and G's reference) decoded
        # FLUX's text block is T5's tokens alone (CLIP gives only the pooled embedding).
        segments = None if prompt is None else [
            TextSegment(self.tokenizer_2, prompt_2 or prompt, 0, max_sequence_length)
        ]  # fmt: skip
        store = attention_store(segments, attention_tokens, head_mean, attention_layers, attention_backend)
        return self._flow_sample(
            pair, cond, store, timesteps, latents, alpha=alpha, guidance_steps=guidance_steps,
            schedule=schedule, return_reference=return_reference, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            attention_callback=attention_callback, output_type=output_type, return_dict=return_dict,
        )  # fmt: skip
