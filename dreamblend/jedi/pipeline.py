"""JeDiPipeline: new images of a subject from 1-3 reference images and a prompt, without fine-tuning.

Each output image is generated as one member of an image set that also holds the references: the
references are known slots (mask 0, their latents as ``x0``), the image to generate is the unknown
slot (mask 1, ``x0`` zero), every slot has its caption, and self-attention is joint over the set
(:mod:`dreamblend.joint`), so the generated image can copy the subject's appearance from the
references. All slots start from noise and are denoised together; the references reach the model
only through ``x0`` (as an SD inpainting UNet sees the known region), so setting ``x0`` to zero
removes them completely, which the guidance needs.

Guidance (the supplement's eq. 1)::

    eps = eps0 + l1 * (eps1 - eps0) + l2 * (eps(x_t, x, M) - eps1)

``eps0`` has the text (every slot's caption) and the reference images null; ``eps1`` keeps one of the
two: the images for ``text_first`` (the supplement: "image conditioning to emphasize text alignment
... text first"), the text for ``image_first``. ``joint`` is plain classifier-free guidance with both
null in the unconditional branch (eq. 1 with ``l1 == l2``, no ``eps1`` pass). ``guidance_scale`` is
``l2`` (and the joint scale), ``partial_guidance_scale`` is ``l1``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, StableDiffusionMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from dreamblend.jedi.convert import check_jedi_unet, inpainting_input
from dreamblend.joint import ImageSet, attach_joint_attention

GUIDANCE_STRATEGIES = ("joint", "image_first", "text_first")


@dataclass
class JeDiPipelineOutput(BaseOutput):
    """``images``: the generated images; ``sets``: every slot of every set (references included) when
    ``return_sets=True``, set after set."""

    images: list[PIL.Image.Image] | np.ndarray | Tensor
    sets: list[PIL.Image.Image] | np.ndarray | Tensor | None = None


def combine_guidance(
    eps_null: Tensor, eps_partial: Tensor | None, eps_full: Tensor, scale: float, partial_scale: float
) -> Tensor:
    """Eq. 1: ``eps0 + l1 (eps1 - eps0) + l2 (eps - eps1)``; joint (no eps1): ``eps0 + l2 (eps - eps0)``."""
    if eps_partial is None:
        return eps_null + scale * (eps_full - eps_null)
    return eps_null + partial_scale * (eps_partial - eps_null) + scale * (eps_full - eps_partial)


class JeDiPipeline(DiffusionPipeline, StableDiffusionMixin, StableDiffusionLoraLoaderMixin):
    """Finetuning-free personalization with a joint-image (JeDi) UNet over SD1.x/2.x components.

    ``set_size`` is the number of images per set the UNet was trained on: a call uses at most
    ``set_size - 1`` references (one slot stays for the image to generate). Load a saved JeDi
    pipeline with ``from_pretrained``, or a training checkpoint with :func:`load_jedi_pipeline`.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        set_size: int = 4,
    ) -> None:
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )
        self.register_to_config(set_size=int(set_size))
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ inputs
    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """CLIP text embeddings ``(len(prompts), N, C)`` (the last hidden state, as SD conditions on)."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self._execution_device))[0]

    def check_references(
        self, images: Sequence[Any], captions: Sequence[str] | None, height: int | None, width: int | None
    ) -> tuple[int, int]:
        """Validate references and their captions; returns the (height, width) to generate at."""
        limit = int(self.config.set_size) - 1
        if not 1 <= len(images) <= limit:
            raise ValueError(
                f"got {len(images)} reference image(s); this model was trained on sets of "
                f"{self.config.set_size} images, so it takes 1 to {limit} references (one slot stays for "
                "the image to generate)"
            )
        if captions is None or len(captions) != len(images) or any(not str(c).strip() for c in captions):
            given = "none" if captions is None else f"{len(captions)} ({list(captions)!r})"
            raise ValueError(
                f"every reference image needs a caption describing it (reference_prompts): got {given} for "
                f"{len(images)} image(s), e.g. reference_prompts=['a photo of a dog on the grass']"
            )
        sizes = [self._size(image) for image in images]
        default = sizes[0] if height is None and width is None else None
        want = default or (
            height or int(self.unet.config.sample_size) * self.vae_scale_factor,
            width or int(self.unet.config.sample_size) * self.vae_scale_factor,
        )
        wrong = [(i, s) for i, s in enumerate(sizes) if s != want]
        if wrong:
            listed = ", ".join(f"#{i} is {w}x{h}" for i, (h, w) in wrong)
            raise ValueError(
                f"reference images must all be {want[1]}x{want[0]} (width x height), the size generated, "
                f"since they are denoised in one set: {listed}; resize or crop them to one size (or pass "
                "height/width matching them)"
            )
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if want[0] % multiple or want[1] % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {want[1]}x{want[0]}")
        return want

    @staticmethod
    def _size(image: Any) -> tuple[int, int]:
        if isinstance(image, PIL.Image.Image):
            return image.height, image.width
        if isinstance(image, (Tensor, np.ndarray)) and image.ndim >= 2:
            shape = tuple(image.shape)
            return (shape[-2], shape[-1]) if isinstance(image, Tensor) else (shape[0], shape[1])
        raise TypeError(f"reference images must be PIL images, tensors or arrays, got {type(image).__name__}")

    def encode_references(self, images: Sequence[Any], height: int, width: int) -> Tensor:
        """Scaled latents of the references (the posterior mean: the references are known exactly)."""
        pixels = self.image_processor.preprocess(list(images), height=height, width=width)
        pixels = pixels.to(device=self._execution_device, dtype=self.vae.dtype)
        return self.vae.encode(pixels).latent_dist.mode() * self.vae.config.scaling_factor

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        reference_images: Sequence[Any],
        reference_prompts: Sequence[str] | None = None,
        *,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance: str = "joint",
        guidance_scale: float = 5.0,
        partial_guidance_scale: float | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_sets: bool = False,
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, Tensor, dict[str, Any]], dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> JeDiPipelineOutput | tuple:
        """Generate ``num_images_per_prompt`` images of the references' subject for ``prompt``.

        Each image is its own set ``[references..., image]``, so images do not see each other.
        ``latents`` (optional) are the initial noise of every slot, ``(num_images * set, C, h, w)``.
        ``callback_on_step_end(pipe, i, t, {"latents": ...})`` may return replacement latents.
        """
        check_jedi_unet(self.unet)
        if not isinstance(prompt, str):
            raise TypeError("prompt must be one string; call the pipeline once per prompt")
        if guidance not in GUIDANCE_STRATEGIES:
            raise ValueError(f"guidance must be one of {', '.join(GUIDANCE_STRATEGIES)}, got {guidance!r}")
        if num_images_per_prompt < 1 or num_inference_steps < 1:
            raise ValueError("num_images_per_prompt and num_inference_steps must be at least 1")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback tensors {sorted(unknown)} are not available; use {self._callback_tensor_inputs}"
            )
        height, width = self.check_references(reference_images, reference_prompts, height, width)
        device, k = self._execution_device, len(reference_images)
        n, m = k + 1, num_images_per_prompt
        channels = int(self.unet.config.out_channels)
        shape = (m * n, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

        refs = self.encode_references(reference_images, height, width)
        known = torch.cat([refs, torch.zeros_like(refs[:1])]).repeat(m, 1, 1, 1)
        no_images = torch.zeros_like(known)
        mask = torch.tensor([0.0] * k + [1.0], device=device).repeat(m)
        text = self.encode_text([*reference_prompts, prompt]).repeat(m, 1, 1)
        no_text = self.encode_text([""]).expand(m * n, -1, -1)
        partial = (known, no_text) if guidance == "text_first" else (no_images, text)
        guided = guidance_scale > 1.0
        l1 = guidance_scale if partial_guidance_scale is None else partial_guidance_scale
        use_partial = guided and guidance != "joint"
        # Branch order in the batch: [null, (partial), full]; each holds whole sets, so sets never mix.
        branches = (
            [(no_images, no_text), *([partial] if use_partial else []), (known, text)]
            if guided
            else [(known, text)]
        )
        cond_known = torch.cat([b[0] for b in branches])
        cond_text = torch.cat([b[1] for b in branches]).to(self.unet.dtype)
        cond_mask = mask.repeat(len(branches))

        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"latents must have shape {shape} (images x set size, C, h, w), got {tuple(latents.shape)}"
            )
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents.to(device) * self.scheduler.init_noise_sigma
        step_kwargs = {}
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        if "eta" in accepted:
            step_kwargs["eta"] = eta
        if "generator" in accepted:
            step_kwargs["generator"] = generator

        timesteps = self.scheduler.timesteps
        with attach_joint_attention(self.unet, ImageSet(n)), self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                x = self.scheduler.scale_model_input(latents, t).repeat(len(branches), 1, 1, 1)
                model_input = inpainting_input(x, cond_known, cond_mask)
                eps = self.unet(model_input, t, encoder_hidden_states=cond_text).sample.chunk(len(branches))
                if guided:
                    noise = combine_guidance(
                        eps[0], eps[1] if use_partial else None, eps[-1], guidance_scale, l1
                    )
                else:
                    noise = eps[0]
                latents = self.scheduler.step(noise, t, latents, **step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    tensors = {
                        name: {"latents": latents}[name] for name in callback_on_step_end_tensor_inputs
                    }
                    latents = callback_on_step_end(self, i, t, tensors).get("latents", latents)
                bar.update()

        targets = latents[n - 1 :: n]
        images = self._decode(targets, output_type)
        sets = self._decode(latents, output_type) if return_sets else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, sets)
        return JeDiPipelineOutput(images=images, sets=sets)

    def _decode(self, latents: Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return latents
        pixels = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return self.image_processor.postprocess(pixels, output_type=output_type)


def load_jedi_pipeline(
    model: str | Path,
    checkpoint: str | Path | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> JeDiPipeline:
    """A :class:`JeDiPipeline` from a saved JeDi pipeline folder, or from a base model plus a training
    checkpoint (``OUT/checkpoint-STEP`` of ``dreamblend train jedi``, full or LoRA)."""
    from dreamblend.checkpoints import load_lora
    from dreamblend.hub import DTYPE_KWARG
    from dreamblend.jedi.convert import convert_unet
    from dreamblend.jedi.train import CONV_IN_FILE, SET_SIZE_KEY
    from dreamblend.training.trajectory import MANIFEST_FILE

    kwargs: dict[str, Any] = {DTYPE_KWARG: torch_dtype, "use_safetensors": None if allow_pickle else True}
    if checkpoint is None:
        pipe = JeDiPipeline.from_pretrained(str(model), **kwargs)
        check_jedi_unet(pipe.unet)
        return pipe
    folder = Path(checkpoint)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {MANIFEST_FILE}; pass a checkpoint folder written by 'dreamblend train jedi' "
            "(OUT/checkpoint-STEP)"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("method") != "jedi":
        raise ValueError(
            f"{folder} is a {manifest.get('method')!r} checkpoint, not a JeDi one ('dreamblend train jedi')"
        )
    set_size = int(manifest[SET_SIZE_KEY])
    if manifest.get("unet"):
        unet = UNet2DConditionModel.from_pretrained(folder / manifest["unet"], **kwargs)
        return JeDiPipeline.from_pretrained(str(model), unet=unet, set_size=set_size, **kwargs)
    from safetensors.torch import load_file

    base = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet", **kwargs)
    unet = convert_unet(base)
    unet.conv_in.load_state_dict(load_file(str(folder / CONV_IN_FILE)))
    pipe = JeDiPipeline.from_pretrained(str(model), unet=unet, set_size=set_size, **kwargs)
    load_lora(pipe, pipe.unet, folder / manifest["lora"], "jedi", allow_pickle=allow_pickle)
    return pipe
