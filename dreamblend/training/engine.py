"""The training loop shared by DreamBooth and AttnDreamBooth.

A run is a list of phases (DreamBooth: one; AttnDreamBooth: its three stages), each with its own
trainable parameters, learning rate and regularizer weights, over one global step counter that the
checkpoint schedule refers to.

Determinism and resuming: every sample's image, latent draw, noise and timestep come from a
generator seeded by its global position (:func:`~dreamblend.training.data.sample_positions`), and
torch's global RNG is reseeded from ``(seed, step, rank)`` every step, so randomness is a function
of the step, not of history (and N processes with batch B draw what one process with batch N * B
draws). A training state (``OUT/state-{step}/``) therefore only needs the trained tensors, the
optimizer and LR-scheduler states (and the fp16 grad scaler); resuming from it reproduces the
uninterrupted run.

Several processes (``accelerate launch``): each takes its slice of the global batch and gradients
are averaged explicitly after the backward instead of through DDP, because DDP fixes the set of
trainable parameters when it wraps a model, while AttnDreamBooth changes it between stages (and its
first stage trains no UNet parameter at all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamblend.checkpoints import saved_without
from dreamblend.hub import DTYPE_KWARG, ModelUnavailableError, hub_errors
from dreamblend.training.data import (
    LatentBank,
    derive_seed,
    encode_images,
    image_at,
    list_images,
    sample_positions,
)
from dreamblend.training.errors import TrainingInputError
from dreamblend.training.schedule import parse_save_at
from dreamblend.training.trajectory import (
    MANIFEST_FILE,
    TRAJECTORY_FILE,
    TRAJECTORY_FORMAT,
    write_json_atomic,
)

LOG_FILE = "train_log.jsonl"
RUN_FILE = "run.json"
STATE_FILE = "state.pt"
_STATE_DIR = re.compile(r"^state-(\d+)$")
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# Settings that may change between an interrupted run and its resumption without changing results.
# The output folder itself may move: everything in it is addressed relative to it.
_RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "resume",
        "progress",
        "log_every",
        "state_every",
        "keep_states",
        "save_at",
        "gradient_checkpointing",
    }
)


@dataclass
class TrainConfig:
    """Settings every method shares. Paths may be str or Path."""

    pretrained_model: str
    instance_dir: str | Path
    output_dir: str | Path
    class_word: str
    token: str = "sks"
    resolution: int | None = None  # default: the UNet's sample size times the VAE scale factor
    batch_size: int = 1
    seed: int = 0
    save_at: str | Sequence[int] = "paper"
    mixed_precision: str | None = None  # "no" | "fp16" | "bf16"; None: accelerate's configured default
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0  # 0 disables clipping
    adam_weight_decay: float = 1e-2
    state_every: int = 100  # a resumable training state every N steps (and at the end)
    keep_states: int = 1
    resume: bool = False
    log_every: int = 1
    progress: bool = True


@dataclass(frozen=True)
class Phase:
    """A stretch of steps with one trainable set, learning rate and regularizer weights."""

    name: str
    steps: int
    learning_rate: float
    lambda_mu: float = 0.0
    lambda_sigma: float = 0.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0


@dataclass
class Conditioning:
    """Text conditioning of one prompt: ``embeds (1, N, C)``; SDXL, SD3 and FLUX add ``pooled (1, P)``."""

    embeds: Tensor
    pooled: Tensor | None = None


@dataclass
class Source:
    """Images drawn for one part of the batch (instance, or class images for prior preservation)."""

    bank: LatentBank
    conditioning: Conditioning | None  # None: computed per step by Trainer.condition


@dataclass
class Batch:
    """One process's samples; the first ``n_instance`` rows are instance images, the rest class images."""

    latents: Tensor
    noise: Tensor
    timesteps: Tensor
    embeds: Tensor
    added_cond: dict[str, Tensor] | None  # SDXL's pooled text embeds and time ids (MMDiT: its pooled embeds)
    n_instance: int


@dataclass
class TrainingResult:
    """A finished run: its folder, index, last step, and the pipeline holding the trained weights."""

    output_dir: Path
    trajectory: Path
    step: int
    pipeline: Any


def check_choice(value: str, choices: Sequence[str], flag: str) -> None:
    if value not in choices:
        raise TrainingInputError(f"{flag} must be one of {', '.join(choices)}; got {value!r}")


def fill_prompt(template: str, token: str, class_word: str) -> str:
    """``template`` with ``{token}`` and ``{class}`` substituted."""
    try:
        return template.format(token=token, **{"class": class_word})
    except (KeyError, IndexError) as exc:
        raise TrainingInputError(
            f"prompt template {template!r} has an unknown placeholder {exc}; use only {{token}} and {{class}}"
        ) from None


def encode_prompt(pipe, prompt: str, device: torch.device) -> Conditioning:
    """The conditioning the pipeline itself would compute for ``prompt`` (differentiable, no CFG)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

    if isinstance(pipe, StableDiffusion3Pipeline):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, None, None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning(embeds, pooled)
    if isinstance(pipe, FluxPipeline):  # its text ids are zeros, rebuilt from the sequence length
        embeds, pooled, _ = pipe.encode_prompt(prompt, None, device=device, num_images_per_prompt=1)
        return Conditioning(embeds, pooled)
    if isinstance(pipe, StableDiffusionXLPipeline):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning(embeds, pooled)
    embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
    return Conditioning(embeds)


class Trainer(ABC):
    """Template for a fine-tuning method; subclasses define phases, trainable sets and checkpoints."""

    method: ClassVar[str]

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.sources: list[Source] = []
        self.pipe = None
        self.phase_index = 0

    # ------------------------------------------------------------------ subclass interface
    @abstractmethod
    def phases(self) -> list[Phase]:
        """The run's phases, from the config alone (the schedule is checked before any model loads)."""

    @abstractmethod
    def phase_parameters(self, index: int) -> dict[str, nn.Parameter]:
        """Parameters trained in phase ``index``, by stable name."""

    @abstractmethod
    def write_checkpoint(self, directory: Path) -> dict[str, str | None]:
        """Write checkpoint files into ``directory``; return the manifest's unet/lora/embedding entries."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Trajectory metadata: ``mode``, ``token``, ``class``, ``prompt``."""

    def validate(self) -> None:
        """Check settings before anything loads (subclasses extend this)."""
        cfg = self.config
        for flag, value in (
            ("--batch-size", cfg.batch_size),
            ("--state-every", cfg.state_every),
            ("--keep-states", cfg.keep_states),
            ("--log-every", cfg.log_every),
        ):
            if value < 1:
                raise TrainingInputError(f"{flag} must be >= 1, got {value}")
        if cfg.mixed_precision is not None:
            check_choice(cfg.mixed_precision, ("no", "fp16", "bf16"), "--mixed-precision")

    @property
    def denoiser(self) -> nn.Module:
        """The network the run fine-tunes: the UNet here, an MMDiT trainer's transformer."""
        return self.unet

    def setup(self) -> None:
        """Load the model and data (subclasses extend this)."""
        self.load_pipeline()
        self.setup_denoiser()

    def load_pipeline(self) -> None:
        """The base pipeline in float32, frozen, on the CPU (the denoiser's setup moves it)."""
        from diffusers import DiffusionPipeline

        cfg = self.config
        try:
            with hub_errors(cfg.pretrained_model):
                # float32 masters whatever the files hold (transformers would keep a float16 text
                # encoder as stored); mixed precision casts the frozen parts later.
                self.pipe = DiffusionPipeline.from_pretrained(
                    cfg.pretrained_model,
                    **{DTYPE_KWARG: torch.float32},
                    **saved_without(cfg.pretrained_model),
                )
        except ModelUnavailableError as exc:
            raise TrainingInputError(str(exc)) from None
        except (OSError, ValueError) as exc:
            raise TrainingInputError(
                f"cannot load the base model {cfg.pretrained_model!r} ({exc}); pass --model a local "
                "diffusers pipeline folder (or a hub id when online)"
            ) from None
        self.pipe.set_progress_bar_config(disable=True)
        for module in self.pipe.components.values():
            if isinstance(module, nn.Module):
                module.requires_grad_(False)

    def setup_denoiser(self) -> None:
        """Check the pipeline is a UNet model this trainer handles; set up its noise schedule and size."""
        from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        cfg = self.config
        if not isinstance(self.pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
            raise TrainingInputError(
                f"{type(self.pipe).__name__} is not supported; train SD1.x/2.x (StableDiffusionPipeline) or "
                "SDXL (StableDiffusionXLPipeline) models"
            )
        self.unet = self.pipe.unet
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        prediction = self.noise_scheduler.config.prediction_type
        if prediction not in ("epsilon", "v_prediction"):
            raise TrainingInputError(
                f"prediction type {prediction!r} is not supported (epsilon, v_prediction)"
            )
        scale = int(self.pipe.vae_scale_factor)
        self.resolution = cfg.resolution or int(self.unet.config.sample_size) * scale
        multiple = scale * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if self.resolution % multiple:
            raise TrainingInputError(
                f"--resolution {self.resolution} does not fit this UNet; use a multiple of {multiple} "
                f"(its native size is {int(self.unet.config.sample_size) * scale})"
            )
        self.pipe.to(self.device)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def encode_images(self, paths: Sequence[Path]) -> LatentBank:
        return encode_images(paths, self.pipe.vae, self.resolution, self.device)

    def on_phase(self, index: int) -> None:  # noqa: B027 - optional hook
        """Called when phase ``index`` starts (also on resume); e.g. to cache conditioning."""

    def condition(self, source: int) -> Conditioning:
        conditioning = self.sources[source].conditioning
        assert conditioning is not None, "sources without cached conditioning need a condition() override"
        return conditioning

    def capture(self) -> contextlib.AbstractContextManager:
        """Context around forward and backward (AttnDreamBooth records attention maps in it)."""
        return contextlib.nullcontext()

    def losses(self, pred: Tensor, target: Tensor, batch: Batch) -> dict[str, Tensor]:
        """Named loss terms; ``"loss"`` is the one optimized. Default: the denoising MSE."""
        return {"loss": F.mse_loss(pred.float(), target.float())}

    def finish(self) -> None:  # noqa: B027 - optional hook
        """Called after the last step (e.g. to put a learned embedding into the text encoder)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Called when the run ends, also on errors (e.g. to remove hooks)."""

    # ------------------------------------------------------------------ the run
    def run(self) -> TrainingResult:
        from accelerate import Accelerator

        cfg = self.config
        self.validate()
        phases = self.phases()
        bounds = _phase_bounds(phases)
        total = bounds[-1][1]
        save_steps = set(parse_save_at(cfg.save_at, total))
        list_images(cfg.instance_dir, flag="--instance-dir")
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
        self.device = self.accelerator.device
        if self.accelerator.mixed_precision == "fp16" and self.device.type == "cpu":
            # accelerate leaves fp16 autocast off on CPU: the run would be silently fp32 (or fail for LoRA)
            raise TrainingInputError(
                "fp16 mixed precision needs a GPU (accelerate does not autocast fp16 on CPU); "
                "use --mixed-precision bf16 or no on CPU"
            )
        start_step, state = self._open_output_dir()
        torch.manual_seed(cfg.seed)
        try:
            step = self._train(phases, bounds, save_steps, start_step, state)
        finally:
            self.close()
        self.accelerator.wait_for_everyone()
        return TrainingResult(self.out, self.out / TRAJECTORY_FILE, step, self.pipe)

    def _train(
        self,
        phases: list[Phase],
        bounds: list[tuple[int, int]],
        save_steps: set[int],
        start_step: int,
        state: dict[str, Any] | None,
    ) -> int:
        """Set up, then run the phases from ``start_step``; returns the last step taken."""
        cfg, total = self.config, bounds[-1][1]
        self.setup()
        self.pipe.vae.to("cpu")  # latents are cached: the VAE is idle until the pipeline is used again
        meta = {
            "format": TRAJECTORY_FORMAT,
            "method": self.method,
            "base_model": _portable_model_id(cfg.pretrained_model),
            **self.describe(),
            "resolution": self.resolution,
            "max_steps": total,
        }
        trajectory = self._load_trajectory(meta, start_step)
        if state is not None:
            self._load_parameters(state, _phase_of(bounds, start_step))
        log = None
        if self.is_main:
            write_json_atomic(self.out / TRAJECTORY_FILE, trajectory)
            log = open(self.out / LOG_FILE, "a" if start_step else "w", encoding="utf-8")  # noqa: SIM115
            if start_step:
                log.write(json.dumps({"event": "resume", "step": start_step}) + "\n")
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total,
            initial=start_step,
            desc=self.method,
            disable=not (cfg.progress and self.accelerator.is_local_main_process),
        )
        step = start_step
        try:
            for index, (phase, (begin, end)) in enumerate(zip(phases, bounds, strict=True)):
                if end <= start_step:
                    continue
                optimizer, scheduler, params = self._enter_phase(index, phase)
                if state is not None and begin < start_step:
                    optimizer.load_state_dict(state["optimizer"])
                    scheduler.load_state_dict(state["lr_scheduler"])
                    if self.accelerator.scaler is not None and state.get("scaler") is not None:
                        self.accelerator.scaler.load_state_dict(state["scaler"])
                for step in range(max(begin, start_step) + 1, end + 1):
                    tick = time.perf_counter()
                    terms = self._train_step(step, params, optimizer, scheduler)
                    if log is not None and (step % cfg.log_every == 0 or step == end):
                        record = {"step": step, "stage": index + 1} if len(phases) > 1 else {"step": step}
                        record.update({k: float(v) for k, v in terms.items()})
                        record["time_s"] = round(time.perf_counter() - tick, 4)
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                        bar.set_postfix(loss=f"{record['loss']:.4f}", stage=index + 1)
                    bar.update(1)
                    if step in save_steps:
                        self._save_checkpoint(step, index, trajectory)
                    if step % cfg.state_every == 0 or step == total:
                        self._save_state(step, optimizer, scheduler)
            self.finish()
            self.pipe.to(self.device)
        finally:
            bar.close()
            if log is not None:
                log.close()
        return step

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def make_batch(self, step: int) -> Batch:
        """Clean latents, noise and timesteps of this process's samples, with their conditioning.

        Every sample draws its random numbers from a generator seeded by its global position.
        """
        cfg, acc = self.config, self.accelerator
        positions = sample_positions(step, cfg.batch_size, rank=acc.process_index, world=acc.num_processes)
        latents, noise, timesteps, embeds, pooled, time_ids = [], [], [], [], [], []
        for k, source in enumerate(self.sources):
            idx = [image_at(len(source.bank), pos, seed=derive_seed(cfg.seed, k)) for pos in positions]
            generators = [torch.Generator().manual_seed(derive_seed(cfg.seed, k, pos)) for pos in positions]
            latents.append(source.bank.sample(idx, generators))
            noise.append(torch.stack([torch.randn(latents[-1].shape[1:], generator=g) for g in generators]))
            timesteps.append(self.draw_timesteps(generators))
            cond = self.condition(k)
            embeds.append(cond.embeds.expand(len(idx), -1, -1))
            if cond.pooled is not None:
                pooled.append(cond.pooled.expand(len(idx), -1))
                time_ids.append(source.bank.time_ids[torch.as_tensor(idx, device=self.device)])
        added = {"text_embeds": torch.cat(pooled), "time_ids": torch.cat(time_ids)} if pooled else None
        return Batch(
            torch.cat(latents),
            torch.cat(noise).to(self.device),
            torch.cat(timesteps).to(self.device),
            torch.cat(embeds),
            added,
            cfg.batch_size,
        )

    def draw_timesteps(self, generators: Sequence[torch.Generator]) -> Tensor:
        """One training timestep per sample, sample ``i`` drawn from ``generators[i]``."""
        steps = self.noise_scheduler.config.num_train_timesteps
        return torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators])

    def predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The denoiser's prediction on the noised batch and its regression target (epsilon or v)."""
        noisy = self.noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
        if self.noise_scheduler.config.prediction_type == "epsilon":
            target = batch.noise
        else:
            target = self.noise_scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps)
        pred = self.unet(
            noisy,
            batch.timesteps,
            batch.embeds.to(self.unet.dtype),
            added_cond_kwargs=batch.added_cond,
        ).sample
        return pred, target

    def _train_step(self, step: int, params: list[nn.Parameter], optimizer, scheduler) -> dict[str, Tensor]:
        """One optimizer step; returns loss terms (averaged over processes), lr and grad norm as tensors."""
        acc, cfg = self.accelerator, self.config
        torch.manual_seed(derive_seed(cfg.seed, step, acc.process_index))  # for anything else that draws
        with self.capture():
            with acc.autocast():
                batch = self.make_batch(step)
                pred, target = self.predict(batch)
                terms = self.losses(pred, target, batch)
            acc.backward(terms["loss"])
        self._average_gradients(params)
        terms = {k: acc.reduce(v.detach(), reduction="mean") for k, v in terms.items()}
        if cfg.max_grad_norm > 0:
            if acc.scaler is not None:  # clip the true gradients, not the fp16-loss-scaled ones
                acc.scaler.unscale_(optimizer.optimizer)
            terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        terms["lr"] = torch.tensor(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return terms

    def _average_gradients(self, params: list[nn.Parameter], bucket_numel: int = 1 << 26) -> None:
        """All-reduce (mean) the gradients of ``params`` in flat buckets; a no-op on one process."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        bucket: list[Tensor] = []
        for i, grad in enumerate(grads):
            bucket.append(grad)
            if sum(g.numel() for g in bucket) >= bucket_numel or i == len(grads) - 1:
                flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in bucket]), reduction="mean")
                for g, synced in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                    g.copy_(synced.view_as(g))
                bucket = []

    def _enter_phase(self, index: int, phase: Phase):
        from diffusers.optimization import get_scheduler

        self.phase_index = index
        self.denoiser.train()
        trainable = self.phase_parameters(index)
        for name, param in self._all_trainable().items():
            param.requires_grad_(name in trainable)
        self.on_phase(index)
        params = list(trainable.values())
        optimizer = torch.optim.AdamW(
            params,
            lr=phase.learning_rate,
            betas=(0.9, 0.999),
            weight_decay=self.config.adam_weight_decay,
            eps=1e-8,
        )
        scheduler = get_scheduler(
            phase.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=phase.lr_warmup_steps,
            num_training_steps=phase.steps,
        )
        return self.accelerator.prepare(optimizer), scheduler, params

    def _all_trainable(self) -> dict[str, nn.Parameter]:
        return self._parameters_up_to(len(self.phases()) - 1)

    def _parameters_up_to(self, index: int) -> dict[str, nn.Parameter]:
        """Every parameter trained in phases ``0..index``: what a training state must hold."""
        params: dict[str, nn.Parameter] = {}
        for k in range(index + 1):
            params.update(self.phase_parameters(k))
        return params

    # ------------------------------------------------------------------ output folder
    def _run_settings(self) -> dict[str, Any]:
        settings = {}
        for key, value in dataclasses.asdict(self.config).items():
            if key in _RESUMABLE_CHANGES:
                continue
            if key in ("instance_dir", "class_dir") and value is not None:
                value = str(Path(value).resolve())
            settings[key] = list(value) if isinstance(value, tuple) else value
        return {"method": self.method, **json.loads(json.dumps(settings, default=str))}

    def _open_output_dir(self) -> tuple[int, dict[str, Any] | None]:
        """Check the output folder against ``--resume``; return the step to start from and its state."""
        cfg = self.config
        states = _numbered_dirs(self.out, _STATE_DIR)
        settings = self._run_settings()
        if not cfg.resume:
            if states or _numbered_dirs(self.out, _CHECKPOINT_DIR):
                raise TrainingInputError(
                    f"{self.out} already holds a training run; pass --resume to continue it, or choose a new "
                    "--output folder"
                )
            if self.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                write_json_atomic(self.out / RUN_FILE, settings)
            self.accelerator.wait_for_everyone()
            return 0, None
        if not states:
            raise TrainingInputError(
                f"--resume found no training state (state-STEP folders) in {self.out}; start without "
                "--resume (states are written every --state-every steps)"
            )
        previous = json.loads((self.out / RUN_FILE).read_text(encoding="utf-8"))
        # A setting added to the config after the run started counts as left at its default.
        defaults = {f.name: f.default for f in dataclasses.fields(self.config)}
        changed = sorted(
            k for k in set(previous) | set(settings) if previous.get(k, defaults.get(k)) != settings.get(k)
        )
        if changed:
            detail = ", ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise TrainingInputError(
                f"cannot resume {self.out}: settings differ from the interrupted run ({detail}); rerun "
                "with the original settings or start a new --output folder"
            )
        step, directory = states[-1]
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        if self.is_main:
            for ckpt_step, ckpt_dir in _numbered_dirs(self.out, _CHECKPOINT_DIR):
                if ckpt_step > step:  # written after the state: the resumed run writes it again
                    shutil.rmtree(ckpt_dir)
        self.accelerator.wait_for_everyone()
        return step, state

    def _load_trajectory(self, meta: dict[str, Any], start_step: int) -> dict[str, Any]:
        path = self.out / TRAJECTORY_FILE
        entries = []
        if start_step and path.exists():
            entries = [e for e in json.loads(path.read_text())["checkpoints"] if e["step"] <= start_step]
        return {**meta, "checkpoints": entries}

    def _save_checkpoint(self, step: int, index: int, trajectory: dict[str, Any]) -> None:
        if self.is_main:
            directory = self.out / f"checkpoint-{step}"
            if directory.exists():
                shutil.rmtree(directory)
            directory.mkdir(parents=True)
            entry: dict[str, Any] = {"step": step, **self.write_checkpoint(directory)}
            if len(self.phases()) > 1:
                entry["stage"] = index + 1
            meta = {k: v for k, v in trajectory.items() if k not in ("checkpoints", "format", "max_steps")}
            write_json_atomic(directory / MANIFEST_FILE, {**meta, **entry})
            trajectory["checkpoints"] = [e for e in trajectory["checkpoints"] if e["step"] != step]
            trajectory["checkpoints"].append({**entry, "path": directory.name})
            trajectory["checkpoints"].sort(key=lambda e: e["step"])
            write_json_atomic(self.out / TRAJECTORY_FILE, trajectory)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ training state
    def _save_state(self, step: int, optimizer, scheduler) -> None:
        if self.is_main:
            scaler = self.accelerator.scaler
            state = {
                "step": step,
                "params": {
                    name: p.detach().cpu() for name, p in self._parameters_up_to(self.phase_index).items()
                },
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict(),
            }
            final = self.out / f"state-{step}"
            tmp = self.out / f".state-{step}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            torch.save(state, tmp / STATE_FILE)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # a state folder exists only once it is complete
            for _, old in _numbered_dirs(self.out, _STATE_DIR)[: -max(self.config.keep_states, 1)]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()

    def _load_parameters(self, state: dict[str, Any], index: int) -> None:
        params = self._parameters_up_to(index)
        saved = state["params"]
        if set(saved) != set(params):
            raise TrainingInputError(
                f"the training state in {self.out} does not match this model ({len(saved)} saved tensors vs "
                f"{len(params)} expected); start a new --output folder"
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name])


def _phase_bounds(phases: Sequence[Phase]) -> list[tuple[int, int]]:
    """(first step - 1, last step) of each phase on the global step axis."""
    bounds, end = [], 0
    for phase in phases:
        if phase.steps < 1:
            raise TrainingInputError(f"phase {phase.name!r} has {phase.steps} steps; every phase needs >= 1")
        bounds.append((end, end + phase.steps))
        end += phase.steps
    return bounds


def _phase_of(bounds: Sequence[tuple[int, int]], step: int) -> int:
    """The phase in which (1-based) ``step`` was taken."""
    return next(i for i, (begin, end) in enumerate(bounds) if begin < step <= end)


def _numbered_dirs(folder: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := pattern.match(p.name))]
    return sorted(found)


def _portable_model_id(model: str) -> str:
    """Absolute path for a local folder (valid from any working directory), else the hub id."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else model
