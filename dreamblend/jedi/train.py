"""``dreamblend train jedi``: train a joint-image (JeDi) UNet on image sets of one subject each.

The run is DreamBooth's engine (accelerate, deterministic resumable states, checkpoints, full or LoRA
fine-tuning) with JeDi's data: a step draws ``--batch-size`` sets of ``--set-size`` images, their
self-attention is joint within each set (:mod:`dreamblend.joint`), and the UNet input is the inpainting
triple ``[x_t, x0 * (1 - mask), mask]`` (:mod:`dreamblend.jedi.convert`; a base text-to-image model is
converted on load). The mask follows the supplement: one Bernoulli draw per image (probability
``--mask-probability``, 0.5: "every bit set to zero or one with equal probability"), replicated over
height and width; an image with mask 1 is to be generated, one with mask 0 is given as ``x0``. The
supplement's loss is the plain denoising loss of the whole batch, known images included (its code
masks only the input), which is ``--loss-on all``; ``--loss-on unknown`` averages over mask-1 images.

Two additions the supplement does not spell out, both needed by its guidance (eq. 1): a set's
captions are dropped together with probability ``--caption-dropout`` (the text-null branch), and its
known images are zeroed with ``--image-dropout`` while the mask stays (``eps(x_t, 0, M)``, the
image-null branch). All images of a set share one timestep, as they do when sampling.

LoRA mode trains LoRA adapters plus the whole ``conv_in`` (its new x0 and mask channels start at zero
and must be learned); a LoRA checkpoint therefore holds ``pytorch_lora_weights.safetensors`` and
``jedi_conv_in.safetensors``. SD1.x/2.x models only (the pipeline has no SDXL variant).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamblend.jedi.convert import convert_unet, inpainting_input, is_jedi_unet
from dreamblend.jedi.data import EncodedSets, encode_sets, find_image_sets
from dreamblend.joint import ImageSet, install_joint_attention
from dreamblend.training.data import derive_seed, image_at, sample_positions
from dreamblend.training.dreambooth import DreamBoothConfig, DreamBoothTrainer
from dreamblend.training.engine import Batch, Trainer, TrainingInputError, TrainingResult, check_choice

CONV_IN_FILE = "jedi_conv_in.safetensors"
SET_SIZE_KEY = "set_size"


@dataclass
class JeDiConfig(DreamBoothConfig):
    """JeDi settings. ``instance_dir`` is the data folder of image sets (see :mod:`dreamblend.jedi.data`)."""

    class_word: str = ""  # unused: JeDi learns no subject word
    set_size: int | None = None  # images per set in training; default: the smallest set in the data
    mask_probability: float = 0.5
    caption_dropout: float = 0.1
    image_dropout: float = 0.1
    loss_on: str = "all"  # "all" (the supplement) | "unknown"
    save_at: Any = None  # default: the last step only (JeDi needs no checkpoint trajectory)


@dataclass
class JeDiBatch(Batch):
    """A batch of whole sets: rows ``[k * n, (k + 1) * n)`` are set ``k``; ``known`` is x0 (zeros where
    dropped), ``mask`` one value per row (1: unknown)."""

    known: Tensor = field(default_factory=lambda: torch.empty(0))
    mask: Tensor = field(default_factory=lambda: torch.empty(0))


class JeDiTrainer(DreamBoothTrainer):
    method = "jedi"

    def __init__(self, config: JeDiConfig) -> None:
        super().__init__(config)
        self.config: JeDiConfig = config
        self.data: EncodedSets | None = None
        self.image_set = ImageSet()
        self._batch: JeDiBatch | None = None
        self._hook: Any = None
        self._processors: dict[str, Any] | None = None

    @property
    def set_size(self) -> int:
        return self.image_set.size

    def validate(self) -> None:
        cfg = self.config
        data_dir = Path(cfg.instance_dir)
        self.sets = find_image_sets(data_dir, flag="--data")
        smallest = min(s.size for s in self.sets)
        size = smallest if cfg.set_size is None else cfg.set_size
        if size < 2:
            raise TrainingInputError(
                f"--set-size must be >= 2 (a set of one has nothing to attend to jointly), got {size}"
                + ("; the data's smallest set has 1 image" if cfg.set_size is None else "")
            )
        if size > smallest:
            small = [s.path.name for s in self.sets if s.size < size][:3]
            raise TrainingInputError(
                f"--set-size {size} exceeds the smallest set's {smallest} images (e.g. {small}); lower "
                "--set-size or remove the small sets"
            )
        self.image_set.size = size
        for flag, value in (
            ("--mask-probability", cfg.mask_probability),
            ("--caption-dropout", cfg.caption_dropout),
            ("--image-dropout", cfg.image_dropout),
        ):
            if not 0.0 <= value <= 1.0:
                raise TrainingInputError(f"{flag} must lie in [0, 1], got {value}")
        check_choice(cfg.loss_on, ("all", "unknown"), "--loss-on")
        if cfg.prior_preservation:
            raise TrainingInputError("JeDi has no prior preservation; drop --with-prior-preservation")
        if cfg.save_at is None:
            cfg.save_at = [cfg.max_steps]
        super().validate()
        # The engine checks that instance_dir holds images; a data folder of set folders holds none itself.
        if not any(s.stacked for s in self.sets):
            cfg.instance_dir = self.sets[0].path

    def setup(self) -> None:
        from diffusers import StableDiffusionXLPipeline

        Trainer.setup(self)
        cfg, pipe = self.config, self.pipe
        if isinstance(pipe, StableDiffusionXLPipeline):
            raise TrainingInputError("JeDi trains SD1.x/2.x models; SDXL is not supported")
        if not is_jedi_unet(pipe.unet):
            pipe.register_modules(unet=convert_unet(pipe.unet).requires_grad_(False))
            self.unet = pipe.unet
            if cfg.gradient_checkpointing:
                self.unet.enable_gradient_checkpointing()
        self._processors = install_joint_attention(self.unet, self.image_set)
        self.data = encode_sets(self.sets, pipe.vae, self.resolution, self.device)
        self._hook = self.unet.register_forward_pre_hook(self._inpainting_input, with_kwargs=True)
        if cfg.mode == "lora":
            self._add_lora()

    def _inpainting_input(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The engine calls ``unet(x_t, t, text)``; JeDi's UNet also takes this batch's x0 and mask."""
        assert self._batch is not None, "the JeDi UNet was called outside a training step"
        sample, *rest = args
        return (inpainting_input(sample, self._batch.known, self._batch.mask), *rest), kwargs

    def close(self) -> None:
        """Leave the returned pipeline's UNet plain: no input hook, its own attention processors."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._processors is not None:
            self.unet.set_attn_processor(self._processors)
            self._processors = None

    def phase_parameters(self, index: int) -> dict[str, nn.Parameter]:
        if self._trainable is None:
            params = dict(super().phase_parameters(index))
            if self.config.mode == "lora":  # the new input channels must be learned too
                params.update({n: p for n, p in self.unet.named_parameters() if n.startswith("conv_in.")})
            self._trainable = params
        return self._trainable

    def make_batch(self, step: int) -> JeDiBatch:
        """``--batch-size`` whole sets, each drawn from a generator seeded by its global position."""
        cfg, acc, data = self.config, self.accelerator, self.data
        assert data is not None
        n = self.set_size
        positions = sample_positions(step, cfg.batch_size, rank=acc.process_index, world=acc.num_processes)
        steps = self.noise_scheduler.config.num_train_timesteps
        latents, noise, timesteps, known, mask, captions = [], [], [], [], [], []
        for pos in positions:
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, 0, pos))
            members = data.members[image_at(len(data.members), pos, seed=derive_seed(cfg.seed, 0))]
            rows = [members[i] for i in torch.randperm(len(members), generator=g)[:n].tolist()]
            x0 = data.bank.sample(rows, [g] * n)
            latents.append(x0)
            noise.append(torch.randn(x0.shape, generator=g))
            timesteps.append(torch.randint(0, steps, (1,), generator=g).expand(n))
            mask.append((torch.rand(n, generator=g) < cfg.mask_probability).float())
            drop_text, drop_image = (
                torch.rand(2, generator=g) < torch.tensor([cfg.caption_dropout, cfg.image_dropout])
            ).tolist()
            known.append(torch.zeros_like(x0) if drop_image else x0)
            captions.extend("" if drop_text else data.captions[r] for r in rows)
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(captions, self.device, 1, False)
        self._batch = JeDiBatch(
            torch.cat(latents),
            torch.cat(noise).to(self.device),
            torch.cat(timesteps).to(self.device),
            embeds,
            None,
            n * len(positions),
            torch.cat(known),
            torch.cat(mask).to(self.device),
        )
        return self._batch

    def losses(self, pred: Tensor, target: Tensor, batch: Batch) -> dict[str, Tensor]:
        """The supplement's loss over every image (``all``), or over the images to generate (``unknown``)."""
        if self.config.loss_on == "all":
            return Trainer.losses(self, pred, target, batch)
        assert isinstance(batch, JeDiBatch)
        per_image = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
        weight = batch.mask.float()
        return {"loss": (per_image * weight).sum() / weight.sum().clamp(min=1.0)}

    def write_checkpoint(self, directory: Path) -> dict[str, str | None]:
        entry = super().write_checkpoint(directory)
        if self.config.mode == "lora":
            from safetensors.torch import save_file

            conv_in = {
                n: p.detach().float().cpu().contiguous() for n, p in self.unet.conv_in.named_parameters()
            }
            save_file(conv_in, str(directory / CONV_IN_FILE))
        return entry

    def describe(self) -> dict[str, Any]:
        return {"mode": self.config.mode, "token": "", "class": "", "prompt": "", SET_SIZE_KEY: self.set_size}


def train_jedi(config: JeDiConfig) -> TrainingResult:
    """Train a JeDi model; checkpoints land in ``config.output_dir`` (see module docs)."""
    return JeDiTrainer(config).run()
