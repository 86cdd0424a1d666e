"""DreamBooth-LoRA on MMDiT models (SD3 / SD3.5, FLUX.1) with the flow-matching loss.

The run is the UNet DreamBooth run (same data order, resuming, prior preservation, trajectory and
manifests); what changes is the model call and its loss, following the rectified-flow training that
``FlowMatchEulerDiscreteScheduler`` samples from:

- a sample's schedule position ``i`` comes from ``u`` (uniform, or SD3's logit-normal / mode density)
  as ``i = floor(u * num_train_timesteps)``; its noise level is the scheduler's ``sigmas[i]`` (shifted as
  the scheduler shifts them) and its timestep ``timesteps[i] = 1000 * sigmas[i]``;
- ``x_t = (1 - sigma) * x0 + sigma * noise`` and the transformer regresses the velocity ``noise - x0``,
  with SD3's optional per-sample weighting (``sigma_sqrt``, ``cosmap``) of the squared error;
- SD3 sees the latents as they are, the timestep in [0, 1000] and the pooled CLIP projections; FLUX sees
  2x2-packed latents with their image position ids, zero text ids, the timestep in [0, 1] and, for
  guidance-distilled models (FLUX.1 [dev]), the guidance value as an input.

Checkpoints are ``pytorch_lora_weights.safetensors`` with ``transformer.`` keys, written by the
pipeline's own ``save_lora_weights`` (what diffusers' DreamBooth-LoRA scripts write), so every point of
the trajectory loads with ``pipe.load_lora_weights`` into a stock or DreamBlend SD3/FLUX pipeline.
Full fine-tuning is refused: see :data:`FULL_FINETUNE_REFUSAL`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from dreamblend.training.dreambooth import DreamBoothTrainer
from dreamblend.training.engine import Batch, check_choice
from dreamblend.training.errors import TrainingInputError

# Both streams' projections of every attention layer (SD3.5's image-only ``attn2`` and FLUX's
# single-stream blocks included), the attention targets of diffusers' SD3/FLUX DreamBooth-LoRA scripts;
# feed-forward layers stay frozen (DreamBlend's guidance reads and steers attention).
MMDIT_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)  # fmt: skip
# Timestep densities (SD3 paper, section 3.1) and loss weightings, as diffusers' training utilities name them.
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
LOGIT_MEAN, LOGIT_STD, MODE_SCALE = 0.0, 1.0, 1.29
FULL_FINETUNE_REFUSAL = (
    "full fine-tuning of an SD3/FLUX transformer is not supported: it needs more GPU memory than one GPU "
    "has (AdamW keeps about 16 bytes per parameter in weights, gradients and two moments: ~32 GB for SD3's "
    "2B parameters, ~190 GB for FLUX.1's 12B, before activations); train LoRA adapters (--mode lora, or "
    "--lora), whose checkpoints DreamBlend pairs as G and E"
)
_MMDIT_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")


def is_mmdit_model(model: str | Path) -> bool:
    """Whether ``model`` (a pipeline folder or hub id) is an SD3 or FLUX pipeline, from its model index.

    Unreadable indexes answer False: the UNet trainer then reports the loading problem itself.
    """
    import diffusers
    from diffusers import DiffusionPipeline

    index = Path(model) / "model_index.json"
    try:
        if index.is_file():
            name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
        else:
            name = DiffusionPipeline.load_config(str(model)).get("_class_name")
    except (OSError, ValueError):
        return False
    cls = getattr(diffusers, str(name), None)
    if cls is None and str(name).startswith("DreamBlend"):
        import dreamblend.mmdit

        cls = getattr(dreamblend.mmdit, str(name), None)
    mmdit = tuple(getattr(diffusers, n) for n in _MMDIT_PIPELINES)
    return isinstance(cls, type) and issubclass(cls, mmdit)


def sample_schedule_index(
    weighting_scheme: str, num_train_timesteps: int, generator: torch.Generator
) -> Tensor:
    """One schedule position ``floor(u * num_train_timesteps)`` with ``u`` drawn from the scheme's density."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme, 1, LOGIT_MEAN, LOGIT_STD, MODE_SCALE, generator=generator
    )
    return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def flow_noising(latents: Tensor, noise: Tensor, sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_t, target)``: the rectified-flow interpolation at per-sample ``sigmas`` and its velocity."""
    sigma = sigmas.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
    return (1.0 - sigma) * latents + sigma * noise, noise - latents


@dataclass
class FlowBatch(Batch):
    """A batch with its flow-matching noise levels and per-sample loss weights."""

    sigmas: Tensor
    weights: Tensor


class MMDiTDreamBoothTrainer(DreamBoothTrainer):
    """DreamBooth-LoRA on an SD3 or FLUX transformer (see module docs)."""

    lora_targets = MMDIT_LORA_TARGETS
    lora_component = "transformer"
    flow_matching = True

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    @property
    def is_flux(self) -> bool:
        from diffusers import FluxPipeline

        return isinstance(self.pipe, FluxPipeline)

    def validate(self) -> None:
        super().validate()
        if self.config.mode == "full":
            raise TrainingInputError(FULL_FINETUNE_REFUSAL)
        check_choice(self.config.weighting_scheme, WEIGHTING_SCHEMES, "--weighting-scheme")

    def setup_denoiser(self) -> None:
        """The transformer, the training schedule (the pipeline scheduler's sigmas) and the resolution."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

        cfg, pipe = self.config, self.pipe
        if not isinstance(pipe, (StableDiffusion3Pipeline, FluxPipeline)):
            raise TrainingInputError(
                f"{type(pipe).__name__} is not an SD3 or FLUX pipeline; train those or SD1.x/2.x/SDXL models"
            )
        self.transformer = pipe.transformer
        # A fresh scheduler holds the full training schedule (sampling overwrites sigmas/timesteps).
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        scale = int(pipe.vae_scale_factor)
        patch = 2 if self.is_flux else int(self.transformer.config.patch_size)  # FLUX packs 2x2 latents
        native = int(pipe.default_sample_size) * scale
        self.resolution = cfg.resolution or native
        if self.resolution % (scale * patch):
            raise TrainingInputError(
                f"--resolution {self.resolution} does not fit this transformer; use a multiple of "
                f"{scale * patch} (its native size is {native})"
            )
        pipe.to(self.device)
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    def draw_timesteps(self, generators: Sequence[torch.Generator]) -> Tensor:
        """Schedule positions (indices into the scheduler's sigmas), one per sample."""
        steps = self.noise_scheduler.config.num_train_timesteps
        return torch.cat([sample_schedule_index(self.config.weighting_scheme, steps, g) for g in generators])

    def make_batch(self, step: int) -> FlowBatch:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        batch = super().make_batch(step)
        index = batch.timesteps.cpu()
        sigmas = self.noise_scheduler.sigmas[index].to(self.device)
        values = {f.name: getattr(batch, f.name) for f in fields(batch)}
        values["timesteps"] = self.noise_scheduler.timesteps[index].to(self.device)
        weights = compute_loss_weighting_for_sd3(self.config.weighting_scheme, sigmas)
        return FlowBatch(**values, sigmas=sigmas, weights=weights)

    def predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        assert isinstance(batch, FlowBatch)
        model = self.transformer
        noisy, target = flow_noising(batch.latents, batch.noise, batch.sigmas)
        embeds = batch.embeds.to(model.dtype)
        assert batch.added_cond is not None, "SD3 and FLUX prompts always have pooled embeddings"
        pooled = batch.added_cond["text_embeds"].to(model.dtype)
        if not self.is_flux:
            pred = model(
                hidden_states=noisy.to(model.dtype),
                timestep=batch.timesteps,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
            return pred, target
        n, channels, height, width = noisy.shape
        pipe = self.pipe
        packed = pipe._pack_latents(noisy.to(model.dtype), n, channels, height, width)
        image_ids = pipe._prepare_latent_image_ids(n, height // 2, width // 2, noisy.device, model.dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=model.dtype)
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((n,), self.config.guidance_scale, device=noisy.device, dtype=torch.float32)
        pred = model(
            hidden_states=packed,
            timestep=batch.timesteps / self.noise_scheduler.config.num_train_timesteps,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        scale = int(pipe.vae_scale_factor)
        return pipe._unpack_latents(pred, height * scale, width * scale, scale), target

    def losses(self, pred: Tensor, target: Tensor, batch: Batch) -> dict[str, Tensor]:
        """The (prior-preserving) MSE with each sample's squared error times its weight.

        Scaling prediction and target by ``sqrt(weight)`` gives exactly that (weights are 1 with the
        default scheme) and keeps the instance/prior split of the UNet trainer.
        """
        assert isinstance(batch, FlowBatch)
        root = batch.weights.float().sqrt().view(-1, *([1] * (pred.dim() - 1)))
        return super().losses(pred.float() * root, target.float() * root, batch)
