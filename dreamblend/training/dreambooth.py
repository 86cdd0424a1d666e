"""DreamBooth fine-tuning (full UNet or LoRA; LoRA on SD3/FLUX transformers) that writes a dense trajectory.

DreamBlend needs an underfit guidance checkpoint and an overfit edit checkpoint of the same run, so
the run saves many points (``--save-at paper``: 48 points over 1000 steps) rather than one result.
Defaults follow the DreamBlend paper (full fine-tuning, lr 5e-6, rare token "sks") and diffusers'
LoRA recipe (rank 4, lr 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamblend.training.data import ensure_class_images, list_images
from dreamblend.training.engine import (
    Batch,
    Phase,
    Source,
    TrainConfig,
    Trainer,
    TrainingInputError,
    TrainingResult,
    check_choice,
    encode_prompt,
    fill_prompt,
)

DEFAULT_LEARNING_RATE = {"full": 5e-6, "lora": 1e-4}
LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass
class DreamBoothConfig(TrainConfig):
    """DreamBooth settings; ``learning_rate=None`` picks the mode's default."""

    mode: str = "full"  # "full" | "lora"
    learning_rate: float | None = None
    max_steps: int = 1000
    lora_rank: int = 4
    lora_alpha: float | None = None  # default: the rank (scale 1)
    instance_prompt: str = "a photo of {token} {class}"
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    prior_preservation: bool = False
    class_dir: str | Path | None = None
    num_class_images: int = 100
    class_prompt: str = "a photo of {class}"
    prior_loss_weight: float = 1.0
    class_inference_steps: int = 50
    class_batch_size: int = 4
    # SD3 / FLUX (flow matching) only
    weighting_scheme: str = "none"  # timestep density or loss weighting (see dreamblend.training.mmdit)
    guidance_scale: float = 1.0  # the guidance input of guidance-distilled FLUX models during training


class DreamBoothTrainer(Trainer):
    method = "dreambooth"
    lora_targets: tuple[str, ...] = LORA_TARGET_MODULES
    lora_component = "unet"  # the pipeline component the LoRA file's keys name
    flow_matching = False

    def __init__(self, config: DreamBoothConfig) -> None:
        super().__init__(config)
        self.config: DreamBoothConfig = config
        self._trainable: dict[str, nn.Parameter] | None = None

    @property
    def prompt(self) -> str:
        return fill_prompt(self.config.instance_prompt, self.config.token, self.config.class_word)

    def validate(self) -> None:
        from diffusers.optimization import SchedulerType

        super().validate()
        cfg = self.config
        check_choice(cfg.mode, ("full", "lora"), "--mode")
        check_choice(cfg.lr_scheduler, [t.value for t in SchedulerType], "--lr-scheduler")
        if cfg.max_steps < 1:
            raise TrainingInputError(f"--max-steps must be >= 1, got {cfg.max_steps}")
        if cfg.mode == "lora" and cfg.lora_rank < 1:
            raise TrainingInputError(f"--lora-rank must be >= 1, got {cfg.lora_rank}")
        if cfg.prior_preservation and cfg.class_dir is None:
            raise TrainingInputError(
                "prior preservation needs --class-dir: a folder of class images (missing ones are generated "
                "with the base model, up to --num-class-images)"
            )
        if cfg.class_dir is not None and not cfg.prior_preservation:
            raise TrainingInputError("--class-dir is only used with --with-prior-preservation; add that flag")
        if not self.flow_matching and (cfg.weighting_scheme, cfg.guidance_scale) != ("none", 1.0):
            raise TrainingInputError(
                "--weighting-scheme and --guidance-scale apply to SD3/FLUX models only; drop them for this "
                "UNet model"
            )
        fill_prompt(cfg.class_prompt, cfg.token, cfg.class_word)  # fail early on bad templates
        fill_prompt(cfg.instance_prompt, cfg.token, cfg.class_word)

    def phases(self) -> list[Phase]:
        cfg = self.config
        lr = DEFAULT_LEARNING_RATE[cfg.mode] if cfg.learning_rate is None else cfg.learning_rate
        return [
            Phase(
                "dreambooth",
                cfg.max_steps,
                lr,
                lr_scheduler=cfg.lr_scheduler,
                lr_warmup_steps=cfg.lr_warmup_steps,
            )
        ]

    def setup(self) -> None:
        super().setup()
        cfg, pipe = self.config, self.pipe
        sources = [Source(self.encode_images(list_images(cfg.instance_dir, flag="--instance-dir")), None)]
        prompts = [self.prompt]
        if cfg.prior_preservation:
            class_prompt = fill_prompt(cfg.class_prompt, cfg.token, cfg.class_word)
            if self.is_main:
                ensure_class_images(
                    pipe,
                    cfg.class_dir,
                    class_prompt,
                    cfg.num_class_images,
                    num_inference_steps=cfg.class_inference_steps,
                    batch_size=cfg.class_batch_size,
                    seed=cfg.seed,
                )
            self.accelerator.wait_for_everyone()
            paths = list_images(cfg.class_dir, flag="--class-dir")[: cfg.num_class_images]
            sources.append(Source(self.encode_images(paths), None))
            prompts.append(class_prompt)
        with torch.no_grad():
            for source, prompt in zip(sources, prompts, strict=True):
                source.conditioning = encode_prompt(pipe, prompt, self.device)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            encoder = getattr(pipe, name, None)
            if encoder is not None:
                encoder.to("cpu")  # conditioning is cached; the encoders are idle during training
        self.sources = sources
        if cfg.mode == "lora":
            self._add_lora()

    def _add_lora(self) -> None:
        """LoRA adapters in fp32 on a denoiser kept in the mixed-precision dtype (its base weights frozen)."""
        from peft import LoraConfig

        cfg = self.config
        alpha = cfg.lora_rank if cfg.lora_alpha is None else cfg.lora_alpha
        self.denoiser.add_adapter(
            LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=alpha,
                init_lora_weights="gaussian",
                target_modules=list(self.lora_targets),
            )
        )
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision)
        if dtype is not None:  # nn.Module.to: diffusers' own `to` warns about fp32-kept modules needlessly
            nn.Module.to(self.denoiser, dtype=dtype)
        for param in self.phase_parameters(0).values():
            param.data = param.data.float()

    def phase_parameters(self, index: int) -> dict[str, nn.Parameter]:
        if self._trainable is None:
            named = self.denoiser.named_parameters()
            if self.config.mode == "lora":
                self._trainable = {n: p for n, p in named if "lora_" in n}
            else:
                self._trainable = dict(named)
        return self._trainable

    def losses(self, pred: Tensor, target: Tensor, batch: Batch) -> dict[str, Tensor]:
        """Instance MSE, plus the weighted MSE on the class images with prior preservation."""
        n = batch.n_instance
        if n == pred.shape[0]:
            return super().losses(pred, target, batch)
        instance = F.mse_loss(pred[:n].float(), target[:n].float())
        prior = F.mse_loss(pred[n:].float(), target[n:].float())
        loss = instance + self.config.prior_loss_weight * prior
        return {"loss": loss, "loss_instance": instance, "loss_prior": prior}

    def write_checkpoint(self, directory: Path) -> dict[str, str | None]:
        if self.config.mode == "full":
            self.unet.save_pretrained(directory / "unet", safe_serialization=True)
            return {"unet": "unet", "lora": None, "embedding": None}
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        model, part = self.denoiser, self.lora_component
        layers = get_peft_model_state_dict(model)
        # diffusers' UNet scripts write the older lora.down/up names, its transformer scripts PEFT's.
        if part == "unet":
            layers = convert_state_dict_to_diffusers(layers)
        # The pipeline's own writer: the file diffusers' DreamBooth-LoRA scripts write for this model.
        type(self.pipe).save_lora_weights(
            directory,
            weight_name=LORA_WEIGHTS,
            safe_serialization=True,
            **{
                f"{part}_lora_layers": layers,
                f"{part}_lora_adapter_metadata": model.peft_config["default"].to_dict(),
            },
        )
        return {"unet": None, "lora": LORA_WEIGHTS, "embedding": None}

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {"mode": cfg.mode, "token": cfg.token, "class": cfg.class_word, "prompt": self.prompt}


def train_dreambooth(config: DreamBoothConfig) -> TrainingResult:
    """Run DreamBooth fine-tuning; checkpoints land in ``config.output_dir`` (see module docs).

    SD3 and FLUX base models (LoRA only) go to :class:`~dreamblend.training.mmdit.MMDiTDreamBoothTrainer`.
    """
    from dreamblend.training.mmdit import MMDiTDreamBoothTrainer, is_mmdit_model

    trainer = MMDiTDreamBoothTrainer if is_mmdit_model(config.pretrained_model) else DreamBoothTrainer
    return trainer(config).run()
