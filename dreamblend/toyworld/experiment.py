"""The toy-world DreamBlend experiment as one resumable command (paper Figs. 3, 7, 9, 10 and Table 1).

    python -m dreamblend.toyworld.experiment --out DIR [--smoke] [--subjects ...] [--seeds N] [--steps N]

For each subject: DreamBooth (LoRA or full) on its instance photos with the project's trainer, saving
a trajectory on the paper's checkpoint schedule (every 5 steps to 50, then every 25); every checkpoint
and the base model sampled alone on evaluation prompts whose settings the photos never show, with the
cross-attention maps of each image (attention collapse, Fig. 3); DreamBlend with the paper's pairs (E
at two late checkpoints, G at every earlier one and the base model) over an alpha grid, an alpha sweep
at one pair (Fig. 9) and the choice of G and E (Fig. 10); every image scored with the toy world's
metrics (subject and prompt fidelity, diversity).

Outputs in DIR: ``points.csv`` (images of all subjects pooled per operating point),
``points_by_subject.csv``, ``collapse.csv``, ``table.md``, ``run.json`` and ``figures/*.png``. The
heavy intermediates (instance photos, trajectories, images, per-image records and scores) go to
``DIR/work``, which ``DIR/.gitignore`` keeps out of commits; a rerun reuses every finished trajectory,
image and score, so a killed run continues where it stopped. A run prints its image count and a time
estimate measured on the machine first (``--dry-run`` stops there). The sampler's small models gain
little from a second thread: to use two cores, run two processes with ``--threads 1`` and disjoint
``--subjects`` on one ``--out`` (each subject's work is its own), then once with all subjects to write
the tables.

``--smoke`` runs the same code at toy scale (one subject, three checkpoints of three training steps,
one alpha, two sampling steps) for CI; when the shipped base model or metric weights are absent it uses
a tiny random pipeline over the world's vocabulary and a random world encoder, and says so in its
outputs. Its numbers mean nothing; its files have every column a full run writes.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import hashlib
import io
import itertools
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamblend.analysis.collapse import (
    CollapsePoint,
    attention_on_subject,
    plot_collapse,
    subject_region,
    suggest_checkpoints,
)
from dreamblend.analysis.figures import new_figure
from dreamblend.analysis.figures import save_png as save_figure
from dreamblend.analysis.maps import MapAverage, WordMaps, plot_word_maps, word_maps
from dreamblend.analysis.points import (
    OperatingPoint,
    best_by_f1,
    f1_score,
    pareto_front,
    plot_operating_points,
    plot_subjects,
)
from dreamblend.commands.generate import atomic_write, save_png
from dreamblend.cpu_info import cpu_model
from dreamblend.toyworld.subjects import SUBJECTS, Subject, evaluation_prompts, get_subject, instance_images
from dreamblend.toyworld.vocab import BACKGROUND_PHRASES, SUBJECT_TOKEN, parse_caption

CHECKPOINT, DREAMBLEND = "checkpoint", "dreamblend"
WEIGHTS = Path(__file__).resolve().parent / "weights"
DEFAULT_OUT = Path("benchmarks/results/toyworld")
METRIC_ROLES = ("subject", "prompt", "diversity")
# DreamBooth's rates (5e-6 full, 1e-4 LoRA) are SD's. Chosen on the 4000-step base snapshot (dotted_cube,
# 4 prompts x 2 seeds, 25 DDIM steps; README's toy-world section): LoRA at 1e-2 lost the prompt's
# setting within 25 steps and any cross-attention guidance then only lowered prompt fidelity; full
# fine-tuning at 5e-4 to 1e-3 barely learned the subject; LoRA at 3e-3 learned it over 200-400 steps
# and guidance moved E's images toward G's.
TOY_LEARNING_RATE = {"lora": 3e-3, "full": 5e-4}

# Every option's value in a full run and in --smoke; a value given on the command line wins over both.
FULL_DEFAULTS: dict[str, Any] = {
    "subjects": [s.name for s in SUBJECTS],
    "instances": 5,
    "prompts": None,
    "seeds": 2,
    "steps": 50,
    "mode": "lora",
    "max_steps": 400,
    "step_scale": 2,
    "save_steps": None,
    "learning_rate": None,
    "edit_steps": None,
    "edit_cfg": [3.0, 2.0],
    "alphas": [0.05, 0.1, 0.2],
    "sweep_alphas": [0.01, 0.02, 0.5, 1.0],
    "fixed_guidance": None,
    "fixed_alpha": None,
    "batch_size": 16,
    "threads": None,
}
SMOKE_DEFAULTS: dict[str, Any] = {
    **FULL_DEFAULTS,
    "subjects": [SUBJECTS[0].name],
    "instances": 4,
    "prompts": 2,
    "seeds": 2,
    "steps": 2,
    "max_steps": 3,
    "save_steps": [1, 2, 3],
    "edit_steps": [2, 3],
    "alphas": [0.1],
    "sweep_alphas": [],
    "fixed_guidance": 1,
    "batch_size": 8,
    "threads": 1,
}


class ExperimentError(Exception):
    """A setting or an output folder that the experiment cannot work with; the message says the fix."""


# ---------------------------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Every option of a run, resolved (see ``--help``)."""

    out: Path
    smoke: bool
    base: Path | None
    metrics_model: Path | None
    subjects: list[str]
    instances: int
    prompts: int | None
    seeds: int
    steps: int
    mode: str
    max_steps: int
    step_scale: int
    save_steps: list[int] | None
    learning_rate: float | None
    lora_rank: int
    train_batch_size: int
    train_seed: int
    edit_steps: list[int] | None
    edit_cfg: list[float]
    alphas: list[float]
    sweep_alphas: list[float]
    fixed_guidance: int | None
    fixed_alpha: float | None
    map_resolution: int
    map_steps: list[int] | None
    batch_size: int
    threads: int | None
    metrics: list[str]
    extra_metrics: list[str]
    dry_run: bool
    quiet: bool


def paper_steps(max_steps: int, scale: int = 1) -> list[int]:
    """The paper's checkpoint steps times ``scale`` up to ``max_steps``: every 5 to 50, then every 25."""
    steps = [*range(5, 51, 5), *range(75, max_steps // max(scale, 1) + 1, 25)]
    return [s * scale for s in steps if s * scale <= max_steps]


@dataclass(frozen=True)
class Plan:
    """The checkpoint steps and the fixed choices every figure refers to."""

    steps: tuple[int, ...]
    edit_steps: tuple[int, ...]
    edit_cfg: dict[int, float]
    fixed_guidance: int
    fixed_edit: int
    fixed_alpha: float

    def cfg_of(self, edit: int) -> float:
        """An edit step's CFG; any other step takes the nearest edit step's (ties: the earlier one)."""
        nearest = min(self.edit_steps, key=lambda e: (abs(e - edit), e))
        return self.edit_cfg[nearest]


def make_plan(s: Settings) -> Plan:
    """Check the step choices against the schedule; fail before anything is trained."""
    if s.save_steps:
        steps = sorted(set(s.save_steps))
        if steps[0] < 1 or steps[-1] > s.max_steps:
            raise ExperimentError(f"--save-steps must lie in [1, --max-steps={s.max_steps}], got {steps}")
    else:
        steps = paper_steps(s.max_steps, s.step_scale)
    edit = sorted(s.edit_steps or [e * s.step_scale for e in (100, 200)])
    if len(steps) < 2 or not set(edit) <= set(steps):
        raise ExperimentError(
            f"edit steps {edit} must be checkpoint steps {steps}; raise --max-steps or pass --edit-steps"
        )
    if len(s.edit_cfg) != len(edit):
        raise ExperimentError(f"--edit-cfg gives {len(s.edit_cfg)} values for {len(edit)} edit steps {edit}")
    guidance = 25 * s.step_scale if s.fixed_guidance is None else s.fixed_guidance
    if guidance not in (0, *steps) or guidance >= edit[-1]:
        raise ExperimentError(
            f"--fixed-guidance {guidance} must be 0 or a checkpoint step before the last edit step {edit[-1]}"
        )
    if not s.alphas or any(a <= 0 for a in (*s.alphas, *s.sweep_alphas)):
        raise ExperimentError(
            "alphas must be positive (alpha 0 is the edit checkpoint alone, sampled anyway)"
        )
    alpha = sorted(s.alphas)[len(s.alphas) // 2] if s.fixed_alpha is None else s.fixed_alpha
    if s.map_steps and not set(s.map_steps) <= {0, *steps}:
        raise ExperimentError(f"--map-steps must be 0 or checkpoint steps {steps}, got {s.map_steps}")
    return Plan(
        tuple(steps), tuple(edit), dict(zip(edit, s.edit_cfg, strict=True)), guidance, edit[-1], alpha
    )


# ---------------------------------------------------------------------------------------------- points


@dataclass(frozen=True)
class Point:
    """An operating point: a checkpoint (step 0: the base model) alone, or a DreamBlend G/E pair."""

    method: str
    guidance: int | None
    edit: int
    alpha: float | None
    cfg: float

    @property
    def slug(self) -> str:
        if self.method == CHECKPOINT:
            return f"checkpoint-{self.edit}-cfg{self.cfg:g}"
        return f"dreamblend-g{self.guidance}-e{self.edit}-alpha{self.alpha:g}-cfg{self.cfg:g}"


def plan_points(plan: Plan, s: Settings) -> list[Point]:
    """Checkpoints alone at every edit CFG; the paper's pairs x alphas; the Fig. 9 sweep; Fig. 10's pairs."""
    cfgs = list(dict.fromkeys(plan.edit_cfg.values()))
    points = [Point(CHECKPOINT, None, step, None, cfg) for cfg in cfgs for step in (0, *plan.steps)]
    for edit in plan.edit_steps:
        for guidance in (0, *(g for g in plan.steps if g < edit)):
            for alpha in sorted({*s.alphas, plan.fixed_alpha} if edit == plan.fixed_edit else s.alphas):
                points.append(Point(DREAMBLEND, guidance, edit, alpha, plan.edit_cfg[edit]))
    for alpha in sorted({*s.alphas, *s.sweep_alphas}):  # Fig. 9: alpha at the fixed pair
        points.append(
            Point(DREAMBLEND, plan.fixed_guidance, plan.fixed_edit, alpha, plan.cfg_of(plan.fixed_edit))
        )
    for edit in (e for e in plan.steps if e > plan.fixed_guidance):  # Fig. 10(b): E at the fixed G
        points.append(Point(DREAMBLEND, plan.fixed_guidance, edit, plan.fixed_alpha, plan.cfg_of(edit)))
    return list(dict.fromkeys(points))


@dataclass(frozen=True)
class Item:
    """One image: a subject's prompt and seed at an operating point; ``id`` hashes what sets its pixels."""

    subject: str
    point: Point
    prompt: str
    seed: int
    id: str

    @property
    def file(self) -> str:
        return f"{self.id}.png"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def subject_words(subject: Subject) -> list[str]:
    """The words whose attention marks the subject: the rare token and the class noun."""
    return [SUBJECT_TOKEN, subject.cls]


def background_words(prompt: str) -> list[str]:
    """The words naming a prompt's setting: its background phrase after the article ("brick wall")."""
    background = parse_caption(prompt).background
    if background is None:
        raise ExperimentError(f"prompt {prompt!r} names no setting; attention collapse needs one")
    words = BACKGROUND_PHRASES[background].split()
    article = max(i for i, w in enumerate(words) if w in ("a", "an", "the"))
    return words[article + 1 :]


# ---------------------------------------------------------------------------------------------- files


def _write_json(path: Path, value: Any) -> None:
    data = (json.dumps(value, indent=2, default=str) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    _write_text(path, text.getvalue())


def _chunks(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _generators(items: Sequence[Item]) -> list[torch.Generator]:
    """One generator per image seeded by its seed alone, so every checkpoint starts from the same latent."""
    return [torch.Generator().manual_seed(item.seed) for item in items]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- models


def smoke_base(folder: Path) -> Path:
    """The toy world's model with random weights, saved as the shipped one is (smoke runs only)."""
    from dreamblend.toyworld.model import (
        build_pipeline,
        build_text_encoder,
        build_tokenizer,
        build_unet,
        build_vae,
    )
    from dreamblend.toyworld.model import save_pipeline as save_model

    with tempfile.TemporaryDirectory() as words:
        tokenizer = build_tokenizer(words)
    return save_model(
        build_pipeline(build_unet(), build_vae(), build_text_encoder(tokenizer), tokenizer), folder
    )


def smoke_metrics_model(folder: Path) -> Path:
    """A random world encoder: finite, meaningless scores for smoke runs without trained metric weights."""
    from dreamblend.toyworld.metrics import WorldEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        WorldEncoder().save(folder)
    return folder


class Models:
    """The base pipeline and one subject's trajectory as UNets in memory, swapped in per operating point.

    Nothing is reloaded between points. A LoRA checkpoint is fused into its own copy of the base UNet
    once per subject instead of being one of many adapters on a shared UNet: PEFT walks every module
    at each adapter switch, twice per DreamBlend step, which made a call with 16 adapters loaded 45%
    slower than with 2 (measured on the toy model), while a toy UNet copy takes 6 MB.
    """

    def __init__(self, base: Path) -> None:
        from diffusers import StableDiffusionPipeline

        from dreamblend.checkpoints import load_pipeline

        self.pipe = load_pipeline(base, torch_dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        self.base_unet = self.pipe.unet
        parts = {k: v for k, v in self.pipe.components.items() if k != "guidance_unet"}
        self.plain = StableDiffusionPipeline(**{**parts, "requires_safety_checker": False})
        self.plain.set_progress_bar_config(disable=True)
        self.unets: dict[int, Any] = {0: self.base_unet}

    @property
    def latent_size(self) -> tuple[int, int]:
        size = int(self.base_unet.config.sample_size)
        return size, size

    def load(self, checkpoints: Sequence[Any]) -> None:
        """Make every checkpoint of a trajectory (``CheckpointInfo``: full UNet or LoRA) available by step."""
        from dreamblend.checkpoints import load_unet

        self.unets = {0: self.base_unet}
        for info in checkpoints:
            if info.lora is not None:
                self.unets[info.step] = self._fused(info.lora)
            else:
                self.unets[info.step] = load_unet(info.unet, torch_dtype=torch.float32)

    def _fused(self, lora: Path) -> Any:
        from dreamblend.checkpoints import load_lora

        unet = copy.deepcopy(self.base_unet)
        load_lora(self.pipe, unet, lora, "checkpoint", allow_pickle=False)
        unet.fuse_lora()
        unet.unload_lora()
        return unet

    def alone(self, step: int) -> Any:
        """The plain SD pipeline sampling checkpoint ``step`` (0: the base model)."""
        self.plain.register_modules(unet=self.unets[step])
        return self.plain

    def pair(self, guidance: int, edit: int) -> Any:
        """The DreamBlend pipeline with checkpoint ``guidance`` as G and ``edit`` as E."""
        self.pipe.register_modules(unet=self.unets[edit], guidance_unet=self.unets[guidance])
        return self.pipe


def sample_with_maps(
    pipe: Any, prompts: list[str], generators: list[torch.Generator], cfg: float, steps: int, resolution: int
) -> tuple[list[Any], torch.Tensor]:
    """Sample with a plain SD pipeline, returning its images and each image's token maps
    ``(batch, tokens, r, r)``: the conditional branch's head-mean maps of the ``r x r`` cross-attention
    layers, averaged over layers and steps."""
    from dreamblend.custom_diffusion import attach_dreamblend
    from dreamblend.store import AttentionStore

    size = int(pipe.unet.config.sample_size)
    store = AttentionStore(head_mean=True, layers=[resolution])
    average = MapAverage((size, size))

    def collect(pipeline: Any, i: int, t: torch.Tensor, tensors: dict[str, Any]) -> dict[str, Any]:
        average.add(store.maps)
        return {}

    n = len(prompts)
    with attach_dreamblend(pipe.unet, store), store.record(rows=slice(n, 2 * n) if cfg > 1 else None):
        images = pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=cfg,
            generator=generators,
            callback_on_step_end=collect,
        ).images
    return images, average.mean((resolution, resolution))


def measure_costs(models: Models, s: Settings, prompts: list[str]) -> dict[str, float]:
    """Seconds per image alone and per DreamBlend image at ``--steps``, and per training step, timed here.

    Each sampler runs as the experiment runs it (maps recorded for checkpoints alone; G a second UNet),
    on the base model with one point's batch of ``prompts`` x seeds, timed at one and three steps and
    extrapolated linearly (fixed cost: text encoding, decoding, PNG conversion); the training step is a
    forward and backward of the UNet.
    """
    from dreamblend.pipelines import DreamBlendPipeline

    batch = min(s.batch_size, len(prompts) * s.seeds)
    prompts = [p for p in prompts for _ in range(s.seeds)][:batch]
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(batch)]
    parts = {k: v for k, v in models.pipe.components.items() if k != "guidance_unet"}
    blend = DreamBlendPipeline(
        **parts, guidance_unet=copy.deepcopy(models.base_unet), requires_safety_checker=False
    )
    blend.set_progress_bar_config(disable=True)
    calls: dict[str, Callable[[int], Any]] = {
        "alone": lambda k: sample_with_maps(models.alone(0), prompts, generators(), 3.0, k, s.map_resolution),
        "dreamblend": lambda k: blend(
            prompts,
            num_inference_steps=k,
            guidance_scale=3.0,
            cross_attention_guidance_scale=0.1,
            generator=generators(),
        ),
    }
    costs = {}
    for name, call in calls.items():
        call(1)  # warm-up
        seconds = []
        for k in (1, 3):
            start = time.perf_counter()
            call(k)
            seconds.append(time.perf_counter() - start)
        per_step = max(seconds[1] - seconds[0], 0.0) / 2
        costs[f"{name}_image_s"] = (seconds[0] - per_step + per_step * s.steps) / batch
    unet = copy.deepcopy(models.base_unet).train()
    size = models.latent_size
    latents = torch.randn(s.train_batch_size, unet.config.in_channels, *size)
    context = torch.randn(s.train_batch_size, 77, unet.config.cross_attention_dim)
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        unet(latents, torch.tensor([500]), context).sample.square().mean().backward()
        seconds.append(time.perf_counter() - start)
    costs["train_step_s"] = min(seconds[1:])
    return costs


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class Counts:
    """Work a run still has to do, and has done."""

    train_steps: int = 0
    trajectories_done: int = 0
    alone: int = 0
    blend: int = 0
    done: int = 0


class Experiment:
    """One run: settings, plan and folders, and the stages that fill them."""

    def __init__(self, s: Settings, argv: Sequence[str] = ()) -> None:
        self.s = s
        self.argv = list(argv)
        self.plan = make_plan(s)
        self.points = plan_points(self.plan, s)
        self.subjects = [get_subject(name) for name in s.subjects]
        self.work = s.out / "work"
        self.figures = s.out / "figures"
        self.base: Path | None = None
        self.base_digest = ""
        self.metrics_model: Path | None = None
        self.notes: list[str] = []
        self.seconds: dict[str, float] = {"train": 0.0, "generate": 0.0, "score": 0.0, "report": 0.0}
        self.generated = 0

    def say(self, text: str) -> None:
        if not self.s.quiet:
            print(text, flush=True)

    # ------------------------------------------------------------------ naming
    def folder(self, subject: Subject, *parts: str) -> Path:
        return self.work.joinpath(subject.name, *parts)

    def prompts(self, subject: Subject) -> list[str]:
        return evaluation_prompts(subject)[: self.s.prompts]

    def map_prompt(self, subject: Subject) -> str:
        """Fig. 3's prompt: the paper's cobblestone street unless the subject lives there, else the first."""
        prompts = self.prompts(subject)
        return next((p for p in prompts if parse_caption(p).background == "street"), prompts[0])

    def train_key(self, subject: Subject) -> dict[str, Any]:
        s = self.s
        return {
            "base": self.base_digest,
            "subject": subject.name,
            "instances": s.instances,
            "mode": s.mode,
            "learning_rate": s.learning_rate,
            "lora_rank": s.lora_rank,
            "batch_size": s.train_batch_size,
            "seed": s.train_seed,
            "max_steps": s.max_steps,
            "save_steps": list(self.plan.steps),
        }

    def items(self, subject: Subject, point: Point) -> list[Item]:
        shared = {"train": _digest(self.train_key(subject)), "steps": self.s.steps, "point": asdict(point)}
        if point.method == CHECKPOINT:
            shared["map_resolution"] = self.s.map_resolution
        return [
            Item(subject.name, point, prompt, seed, _digest({**shared, "prompt": prompt, "seed": seed}))
            for prompt in self.prompts(subject)
            for seed in range(self.s.seeds)
        ]

    def is_done(self, item: Item) -> bool:
        subject = get_subject(item.subject)
        record = self.folder(subject, "records", f"{item.id}.json")
        return record.is_file() and self.folder(subject, "images", item.file).is_file()

    # ------------------------------------------------------------------ models
    def resolve_base(self) -> None:
        """The base model: given, shipped, or (smoke only) the toy architecture with random weights."""
        s = self.s
        base = s.base or WEIGHTS / "base"
        if not (base / "model_index.json").is_file():
            if s.base is not None or not s.smoke:
                raise ExperimentError(
                    f"no base model at {base}: train the toy world's model (python -m "
                    "dreamblend.toyworld.train) or pass --base FOLDER (a diffusers Stable Diffusion folder)"
                )
            base = self.work / "base"
            if not (base / "model_index.json").is_file():
                smoke_base(base)
            self.notes.append("base model: the toy model's architecture with random weights (smoke stand-in)")
        self.base = base
        self.base_digest = _file_digest(base / "unet" / "diffusion_pytorch_model.safetensors")

    def resolve_metrics_model(self) -> None:
        """The world encoder the toy metrics read images with: given, shipped, or (smoke only) random."""
        s = self.s
        metrics = s.metrics_model or WEIGHTS / "metrics"
        if not (metrics / "model.safetensors").is_file():
            if s.metrics_model is not None or not s.smoke:
                raise ExperimentError(
                    f"no world-encoder weights at {metrics}: train them (python -m "
                    "dreamblend.toyworld.train_metrics) or pass --metrics-model FOLDER"
                )
            metrics = self.work / "metrics-model"
            if not (metrics / "model.safetensors").is_file():
                smoke_metrics_model(metrics)
            self.notes.append("metrics: random world encoder (smoke stand-in); the scores mean nothing")
        self.metrics_model = metrics

    def build_metrics(self) -> list[Any]:
        """The subject, prompt and diversity metrics (in that order), then the extra ones."""
        try:
            import dreamblend.toyworld.metrics  # noqa: F401 - registers the toy metrics
        except ImportError as exc:
            raise ExperimentError(f"the toy world's metrics are unavailable ({exc})") from None
        from dreamblend.metrics import build_metrics

        names = [*self.s.metrics, *self.s.extra_metrics]
        metrics = build_metrics(names, device="cpu", models={"toy_world": str(self.metrics_model)})
        for metric, role in zip(metrics, METRIC_ROLES, strict=False):
            if metric.role != role:
                raise ExperimentError(f"--metrics: {metric.name} measures {metric.role}, not {role}")
        return metrics

    # ------------------------------------------------------------------ counting
    def count(self) -> Counts:
        counts = Counts()
        for subject in self.subjects:
            if self.trained(subject):
                counts.trajectories_done += 1
            else:
                counts.train_steps += self.s.max_steps
            for point in self.points:
                for item in self.items(subject, point):
                    if self.is_done(item):
                        counts.done += 1
                    elif point.method == CHECKPOINT:
                        counts.alone += 1
                    else:
                        counts.blend += 1
        return counts

    def describe_plan(self, counts: Counts) -> list[str]:
        s, plan = self.s, self.plan
        per_point = sum(len(self.prompts(subject)) for subject in self.subjects) * s.seeds
        alone = [p for p in self.points if p.method == CHECKPOINT]
        total = counts.alone + counts.blend + counts.done
        return [
            f"{len(self.subjects)} subject(s), {per_point // s.seeds} prompts in all x {s.seeds} seed(s) = "
            f"{per_point} images per operating point, {s.steps} DDIM steps",
            f"trajectories: {s.mode}, {s.max_steps} steps, checkpoints at {_span(plan.steps)}; "
            f"{counts.trajectories_done} of {len(self.subjects)} trained",
            f"operating points: {len(alone)} checkpoints alone (steps 0..{plan.steps[-1]} at CFG "
            f"{', '.join(f'{c:g}' for c in dict.fromkeys(plan.edit_cfg.values()))}), "
            f"{len(self.points) - len(alone)} DreamBlend (E at {list(plan.edit_steps)})",
            f"images: {total} ({counts.done} done; to make: {counts.alone} alone, {counts.blend} DreamBlend)",
        ]

    # ------------------------------------------------------------------ training
    def trained(self, subject: Subject) -> bool:
        marker = self.folder(subject, "trained.json")
        if not marker.is_file():
            return False
        done = json.loads(marker.read_text())
        if done["key"] != self.train_key(subject):
            raise ExperimentError(
                f"{self.folder(subject)} was trained with other settings ({done['key']}); choose a new --out "
                "or delete that folder to retrain"
            )
        return True

    def train(self, subject: Subject) -> list[Any]:
        """The subject's trajectory, trained (or resumed) unless a finished one is there."""
        from dreamblend.training import DreamBoothConfig, read_trajectory, train_dreambooth

        trajectory = self.folder(subject, "trajectory")
        if self.trained(subject):
            return read_trajectory(trajectory)
        instances = self.folder(subject, "instances")
        instances.mkdir(parents=True, exist_ok=True)
        for i, sample in enumerate(instance_images(subject, self.s.instances)):
            path = instances / f"{i:02d}.png"
            if not path.is_file():
                save_png(Image.fromarray(sample.rendered.image), path)
        resume = any(trajectory.glob("state-*"))
        self.say(
            f"[{subject.name}] DreamBooth {self.s.mode}: {self.s.max_steps} steps" + (" (resumed)" * resume)
        )
        start = time.perf_counter()
        train_dreambooth(
            DreamBoothConfig(
                pretrained_model=str(self.base),
                instance_dir=instances,
                output_dir=trajectory,
                class_word=subject.cls,
                token=SUBJECT_TOKEN,
                instance_prompt=subject.instance_prompt,
                mode=self.s.mode,
                learning_rate=self.s.learning_rate,
                lora_rank=self.s.lora_rank,
                max_steps=self.s.max_steps,
                batch_size=self.s.train_batch_size,
                seed=self.s.train_seed,
                save_at=list(self.plan.steps),
                mixed_precision="no",
                resume=resume,
                progress=not self.s.quiet,
            )
        )
        seconds = time.perf_counter() - start
        self.seconds["train"] += seconds
        _write_json(
            self.folder(subject, "trained.json"), {"key": self.train_key(subject), "seconds": seconds}
        )
        return read_trajectory(trajectory)

    # ------------------------------------------------------------------ sampling
    def generate(self, subject: Subject, models: Models) -> None:
        for folder in ("images", "records", "maps"):
            self.folder(subject, folder).mkdir(parents=True, exist_ok=True)
        for point in sorted((p for p in self.points if p.method == CHECKPOINT), key=lambda p: p.edit):
            self._run_point(subject, point, functools.partial(self._alone, models, subject))
        blends = sorted(
            (p for p in self.points if p.method == DREAMBLEND), key=lambda p: (p.edit, p.guidance)
        )
        for (guidance, edit), group in itertools.groupby(blends, key=lambda p: (p.guidance, p.edit)):
            points = list(group)
            if any(not self.is_done(i) for p in points for i in self.items(subject, p)):
                sample = functools.partial(self._blend, models.pair(guidance, edit))
                for point in points:
                    self._run_point(subject, point, sample)
        self._cag_maps(subject, models)

    def _run_point(self, subject: Subject, point: Point, sample: Callable[[list[Item], Point], None]) -> None:
        todo = [item for item in self.items(subject, point) if not self.is_done(item)]
        if not todo:
            return
        start = time.perf_counter()
        for chunk in _chunks(todo, self.s.batch_size):
            sample(chunk, point)
        seconds = time.perf_counter() - start
        self.seconds["generate"] += seconds
        self.generated += len(todo)
        self.say(f"[{subject.name}] {point.slug}: {len(todo)} images in {seconds:.1f} s")

    def _alone(self, models: Models, subject: Subject, items: list[Item], point: Point) -> None:
        """Sample one checkpoint, recording each image's word maps at ``--map-resolution``."""
        pipe = models.alone(point.edit)
        start = time.perf_counter()
        prompts, generators = [item.prompt for item in items], _generators(items)
        images, token_maps = sample_with_maps(
            pipe, prompts, generators, point.cfg, self.s.steps, self.s.map_resolution
        )
        seconds = (time.perf_counter() - start) / len(items)
        for row, (item, image) in enumerate(zip(items, images, strict=True)):
            own = subject_words(subject)
            words = [*own, *background_words(item.prompt)]
            maps = torch.stack(
                [token_maps[row, _positions(pipe.tokenizer, item.prompt, w)].mean(dim=0) for w in words]
            )
            region = subject_region(maps[: len(own)].mean(dim=0))
            shares = attention_on_subject(maps[len(own) :], region).tolist()
            collapse = {
                "collapse": float(np.mean(shares)),
                "region_share": float(region.float().mean()),
                "shares": dict(zip(words[len(own) :], shares, strict=True)),
            }
            if item.prompt == self.map_prompt(subject) and item.seed == 0:
                self._save_maps(subject, item.id, words, maps)
            self._write(item, image, seconds, {"attention": collapse})

    def _blend(self, pipe: Any, items: list[Item], point: Point) -> None:
        n = len(items)
        start = time.perf_counter()
        images = pipe(
            [item.prompt for item in items],
            num_inference_steps=self.s.steps,
            guidance_scale=point.cfg,
            cross_attention_guidance_scale=point.alpha,
            generator=_generators(items),
        ).images
        seconds = (time.perf_counter() - start) / n
        for item, image in zip(items, images, strict=True):
            self._write(item, image, seconds, {})

    def _write(self, item: Item, image: Image.Image, seconds: float, extra: dict[str, Any]) -> None:
        """PNG first, then the record that marks the image finished (both atomic)."""
        subject = get_subject(item.subject)
        save_png(image, self.folder(subject, "images", item.file))
        point = item.point
        record = {
            "id": item.id,
            "file": item.file,
            "subject": item.subject,
            "method": point.method,
            "guidance_step": point.guidance,
            "edit_step": point.edit,
            "alpha": point.alpha,
            "cfg": point.cfg,
            "prompt": item.prompt,
            "seed": item.seed,
            "steps": self.s.steps,
            "time_s": round(seconds, 4),
            **extra,
        }
        _write_json(self.folder(subject, "records", f"{item.id}.json"), record)

    def _save_maps(self, subject: Subject, name: str, words: Sequence[str], maps: torch.Tensor) -> None:
        from safetensors.torch import save

        data = save({"maps": maps.contiguous()}, metadata={"words": json.dumps(list(words))})
        atomic_write(self.folder(subject, "maps", f"{name}.safetensors"), lambda f: f.write(data))

    def _load_maps(self, subject: Subject, name: str) -> tuple[list[str], torch.Tensor] | None:
        from safetensors import safe_open

        path = self.folder(subject, "maps", f"{name}.safetensors")
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as handle:
            return json.loads(handle.metadata()["words"]), handle.get_tensor("maps")

    def cag_name(self, subject: Subject, edit: int) -> str:
        """File stem of Fig. 3's "E + cross-attention guidance" row for edit step ``edit``."""
        plan = self.plan
        key = {
            "train": _digest(self.train_key(subject)),
            "steps": self.s.steps,
            "prompt": self.map_prompt(subject),
            "pair": (plan.fixed_guidance, edit, plan.fixed_alpha, plan.cfg_of(edit)),
            "map_resolution": self.s.map_resolution,
        }
        return f"cag-e{edit}-{_digest(key)}"

    def _cag_maps(self, subject: Subject, models: Models) -> None:
        """Fig. 3's guided rows: each edit checkpoint under the fixed G, maps recorded as for checkpoints."""
        plan, prompt = self.plan, self.map_prompt(subject)
        words = [*subject_words(subject), *background_words(prompt)]
        size = (self.s.map_resolution, self.s.map_resolution)
        for edit in plan.edit_steps:
            name = self.cag_name(subject, edit)
            if self._load_maps(subject, name) is not None:
                continue
            average = MapAverage(models.latent_size)

            def collect(
                role: str, i: int, maps: dict[str, torch.Tensor], average: MapAverage = average
            ) -> None:
                if role == "edit":
                    average.add(maps)

            pipe = models.pair(plan.fixed_guidance, edit)
            out = pipe(
                prompt,
                num_inference_steps=self.s.steps,
                guidance_scale=plan.cfg_of(edit),
                cross_attention_guidance_scale=plan.fixed_alpha,
                generator=torch.Generator().manual_seed(0),
                attention_callback=collect,
            )
            save_png(out.images[0], self.folder(subject, "maps", f"{name}.png"))
            self._save_maps(subject, name, words, word_maps(average, pipe.tokenizer, prompt, words, size))

    # ------------------------------------------------------------------ scoring
    def score(self, subject: Subject, metrics: Sequence[Any]) -> None:
        """Score every point's images once all exist; a point's scores are kept in ``scores/<point>.json``."""
        folder = self.folder(subject, "scores")
        folder.mkdir(parents=True, exist_ok=True)
        references = [
            Image.open(p).convert("RGB") for p in sorted(self.folder(subject, "instances").glob("*.png"))
        ]
        for point in self.points:
            items = self.items(subject, point)
            path = folder / f"{point.slug}.json"
            if path.is_file() and json.loads(path.read_text())["ids"] == [i.id for i in items]:
                continue
            start = time.perf_counter()
            images = [Image.open(self.folder(subject, "images", i.file)).convert("RGB") for i in items]
            prompts = [i.prompt for i in items]
            scores: dict[str, list[float | None]] = {}
            for metric in metrics:
                values = np.full(len(items), np.nan)
                if metric.role == "diversity":  # within the images of one prompt
                    for prompt in dict.fromkeys(prompts):
                        rows = [k for k, p in enumerate(prompts) if p == prompt]
                        values[rows] = metric.score(
                            [images[k] for k in rows], [prompt] * len(rows), references
                        )
                else:
                    values[:] = metric.score(images, prompts, references)
                scores[metric.name] = [float(v) if math.isfinite(v) else None for v in values]
            seconds = time.perf_counter() - start
            self.seconds["score"] += seconds
            by_item = {
                item.id: {name: values[k] for name, values in scores.items()} for k, item in enumerate(items)
            }
            _write_json(path, {"ids": [i.id for i in items], "scores": by_item, "seconds": round(seconds, 4)})

    # ------------------------------------------------------------------ whole run
    def run(self) -> int:
        start = time.perf_counter()
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.work.mkdir(parents=True, exist_ok=True)
        _write_text(self.s.out / ".gitignore", "work/\n")
        self.resolve_base()
        metrics = []
        if not self.s.dry_run:  # missing metric weights fail a run before any work
            self.resolve_metrics_model()
            metrics = self.build_metrics()
        counts = self.count()
        for line in self.describe_plan(counts):
            self.say(line)
        models = Models(self.base)
        estimate = None
        if counts.alone + counts.blend or self.s.dry_run:
            costs = measure_costs(models, self.s, self.prompts(self.subjects[0]))
            estimate = _estimate(costs, counts)
            self.say(
                f"estimate on this machine ({torch.get_num_threads()} thread(s)): training "
                f"{_duration(estimate['train_s'])}, alone {_duration(estimate['alone_s'])}, DreamBlend "
                f"{_duration(estimate['dreamblend_s'])}, total {_duration(estimate['total_s'])} (per image "
                f"{costs['alone_image_s']:.3f} s alone, {costs['dreamblend_image_s']:.3f} s DreamBlend; "
                f"{costs['train_step_s']:.3f} s per training step)"
            )
        if self.s.dry_run:
            return 0
        for subject in self.subjects:
            models.load(self.train(subject))
            self.generate(subject, models)
            self.score(subject, metrics)
        report = time.perf_counter()
        self.report(metrics)
        self.seconds["report"] = time.perf_counter() - report
        self.seconds["total"] = time.perf_counter() - start
        self.write_run_json(started, counts, estimate)
        self.say(
            f"done in {self.seconds['total']:.1f} s ({self.generated} images made); results in {self.s.out}"
        )
        return 0

    # ------------------------------------------------------------------ report
    def image_rows(self, subject: Subject, point: Point) -> list[dict[str, Any]]:
        """One dict per image of a point: its record (attention for checkpoints) and scores."""
        items = self.items(subject, point)
        scores = json.loads(self.folder(subject, "scores", f"{point.slug}.json").read_text())["scores"]
        rows = []
        for item in items:
            record = json.loads(self.folder(subject, "records", f"{item.id}.json").read_text())
            rows.append({**record, **scores[item.id]})
        return rows

    def report(self, metrics: Sequence[Any]) -> None:
        names = [m.name for m in metrics]
        per_subject = {(s.name, p): self.image_rows(s, p) for s in self.subjects for p in self.points}
        pooled = {p: [r for s in self.subjects for r in per_subject[(s.name, p)]] for p in self.points}
        all_rows = summarize(self.points, pooled, names)
        subject_rows = []
        for subject in self.subjects:
            rows = summarize(self.points, {p: per_subject[(subject.name, p)] for p in self.points}, names)
            subject_rows += [{"subject": subject.name, **row} for row in rows]
        columns = point_columns(names[3:])
        _write_csv(self.s.out / "points.csv", all_rows, columns)
        _write_csv(self.s.out / "points_by_subject.csv", subject_rows, ["subject", *columns])
        collapse = collapse_rows(self.subjects, self.points, per_subject)
        words = sorted({k for row in collapse for k in row if k.startswith("share_")})
        base_columns = ["subject", "step", "cfg", "collapse", "collapse_se", "region_share", "n_images"]
        _write_csv(self.s.out / "collapse.csv", collapse, [*base_columns, *words])
        self.figures.mkdir(parents=True, exist_ok=True)
        labels = {"x_label": f"prompt fidelity ({names[1]})", "y_label": f"subject fidelity ({names[0]})"}
        plot_operating_points(
            [as_operating_point(r) for r in all_rows],
            self.figures / "pareto.png",
            title=f"all subjects ({len(self.subjects)}), pooled over images",
            **labels,
        )
        plot_subjects([as_operating_point(r) for r in subject_rows], self.figures / "subjects", **labels)
        suggestion = self.plot_collapse(collapse)
        for subject in self.subjects:
            self.plot_maps(subject)
        plot_alpha_sweep(all_rows, self.plan, self.figures / "fig9_alpha.png", names)
        plot_checkpoint_choice(all_rows, self.plan, self.figures / "fig10_checkpoints.png", names)
        _write_text(self.s.out / "table.md", self.table(all_rows, collapse, suggestion, names))

    def plot_collapse(self, rows: Sequence[dict[str, Any]]) -> Any:
        """Collapse over steps for all subjects at the first CFG, with the G/E it suggests."""
        cfg = next(iter(self.plan.edit_cfg.values()))
        mine = sorted((r for r in rows if r["subject"] == "all" and r["cfg"] == cfg), key=lambda r: r["step"])
        points = [
            CollapsePoint(
                r["step"],
                None if r["step"] == 0 else Path(f"checkpoint-{r['step']}"),
                r["collapse"],
                {
                    k.removeprefix("share_"): v
                    for k, v in r.items()
                    if k.startswith("share_") and v is not None
                },
                r["region_share"],
            )
            for r in mine
        ]
        suggestion = suggest_checkpoints(points)
        plot_collapse(
            points,
            self.figures / "collapse.png",
            suggestion=suggestion,
            title=f"attention collapse, {len(self.subjects)} subject(s), CFG {cfg:g}",
        )
        return suggestion

    def plot_maps(self, subject: Subject) -> None:
        """Fig. 3: the map prompt's image and word maps at chosen checkpoints, then each E under guidance."""
        plan, prompt = self.plan, self.map_prompt(subject)
        cfg = next(iter(plan.edit_cfg.values()))
        steps = self.s.map_steps or sorted(
            {0, plan.steps[0], plan.fixed_guidance, *plan.edit_steps, plan.steps[-1]}
        )
        rows = []
        for step in steps:
            point = Point(CHECKPOINT, None, step, None, cfg)
            item = next(i for i in self.items(subject, point) if i.prompt == prompt and i.seed == 0)
            words, maps = self._load_maps(subject, item.id)
            image = np.asarray(Image.open(self.folder(subject, "images", item.file)).convert("RGB"))
            rows.append(WordMaps("base model" if step == 0 else f"step {step}", image, tuple(words), maps))
        for edit in plan.edit_steps:
            name = self.cag_name(subject, edit)
            words, maps = self._load_maps(subject, name)
            image = np.asarray(Image.open(self.folder(subject, "maps", f"{name}.png")).convert("RGB"))
            label = f"step {edit} + CAG (G {plan.fixed_guidance})"
            rows.append(WordMaps(label, image, tuple(words), maps))
        plot_word_maps(rows, self.figures / f"fig3_{subject.name}.png", title=f"{prompt!r}, seed 0")

    def table(
        self,
        rows: Sequence[dict[str, Any]],
        collapse: Sequence[dict[str, Any]],
        suggestion: Any,
        names: list[str],
    ) -> str:
        return render_table(self, rows, collapse, suggestion, names)

    def write_run_json(self, started: str, counts: Counts, estimate: dict[str, float] | None) -> None:
        import diffusers
        import transformers

        versions = {"python": platform.python_version(), "torch": torch.__version__}
        versions.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
        for name in ("peft", "accelerate", "numpy"):
            try:
                versions[name] = __import__(name).__version__
            except ImportError:
                versions[name] = None
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.s).items()}
        _write_json(
            self.s.out / "run.json",
            {
                "command": ["python", "-m", "dreamblend.toyworld.experiment", *self.argv],
                "started": started,
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "device": device_name(),
                "threads": torch.get_num_threads(),
                "versions": versions,
                "options": options,
                "plan": {**asdict(self.plan), "points": len(self.points)},
                "notes": self.notes,
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
                "compute_seconds": self.compute_seconds(),
                "images_made_this_run": self.generated,
                "work_at_start": asdict(counts),
                "estimate": estimate,
            },
        )

    def compute_seconds(self) -> dict[str, float]:
        """Time every finished piece of work took, summed over the runs that made it (resumes included)."""
        train = generate = score = 0.0
        for subject in self.subjects:
            train += json.loads(self.folder(subject, "trained.json").read_text())["seconds"]
            for record in self.folder(subject, "records").glob("*.json"):
                generate += json.loads(record.read_text())["time_s"]
            for scores in self.folder(subject, "scores").glob("*.json"):
                score += json.loads(scores.read_text())["seconds"]
        return {"train": round(train, 1), "generate": round(generate, 1), "score": round(score, 1)}


def _positions(tokenizer: Any, prompt: str, word: str) -> list[int]:
    from dreamblend.tokens import word_positions

    return word_positions(tokenizer, prompt, word)


def _span(steps: Sequence[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 6 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"


def _estimate(costs: dict[str, float], counts: Counts) -> dict[str, float]:
    estimate = {
        "train_s": costs["train_step_s"] * counts.train_steps,
        "alone_s": costs["alone_image_s"] * counts.alone,
        "dreamblend_s": costs["dreamblend_image_s"] * counts.blend,
    }
    estimate["total_s"] = sum(estimate.values())
    return {**{k: round(v, 1) for k, v in estimate.items()}, **{k: round(v, 4) for k, v in costs.items()}}


def device_name() -> str:
    """The CPU's model name and core count (the runs are CPU runs)."""
    return f"{cpu_model()} ({os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------- tables


def _stats(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, standard error (sample std / sqrt n; None below two values) and count of the finite values."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if not finite.size:
        return None, None, 0
    se = float(finite.std(ddof=1) / math.sqrt(finite.size)) if finite.size > 1 else None
    return float(finite.mean()), se, int(finite.size)


def point_columns(extra: Sequence[str]) -> list[str]:
    return [
        "method",
        "guidance_step",
        "edit_step",
        "alpha",
        "cfg",
        "subject_fidelity",
        "subject_fidelity_se",
        "prompt_fidelity",
        "prompt_fidelity_se",
        "diversity",
        "diversity_se",
        "f1",
        "n_images",
        "front_margin",
        "beyond_checkpoint_front",
        *(c for name in extra for c in (name, f"{name}_se")),
    ]


def summarize(
    points: Sequence[Point], images: dict[Point, list[dict[str, Any]]], names: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per point: mean and standard error over its images of every metric, F1, and for DreamBlend
    points how far they lie beyond the checkpoints' Pareto front."""
    rows = []
    for point in points:
        members = images[point]
        row: dict[str, Any] = {
            "method": point.method,
            "guidance_step": point.guidance,
            "edit_step": point.edit,
            "alpha": point.alpha,
            "cfg": point.cfg,
            "n_images": len(members),
        }
        for column, name in zip(("subject_fidelity", "prompt_fidelity", "diversity"), names, strict=False):
            row[column], row[f"{column}_se"], _ = _stats([m.get(name) for m in members])
        for name in names[3:]:
            row[name], row[f"{name}_se"], _ = _stats([m.get(name) for m in members])
        row["f1"] = f1_score(row["prompt_fidelity"] or 0.0, row["subject_fidelity"] or 0.0)
        rows.append(row)
    checkpoints = [r for r in rows if r["method"] == CHECKPOINT]
    for row in rows:
        if row["method"] == DREAMBLEND:
            row["front_margin"] = front_margin(row, checkpoints)
            row["beyond_checkpoint_front"] = row["front_margin"] > 0
    return rows


def front_margin(row: dict[str, Any], checkpoints: Sequence[dict[str, Any]]) -> float:
    """How far a point lies beyond the checkpoints' Pareto front: the least, over checkpoints, of the
    larger amount by which it beats that checkpoint on either fidelity. Positive: no checkpoint is at
    least as good on both; negative: the distance to leave the dominated region."""
    return min(
        max(row["subject_fidelity"] - c["subject_fidelity"], row["prompt_fidelity"] - c["prompt_fidelity"])
        for c in checkpoints
    )


def as_operating_point(row: dict[str, Any]) -> OperatingPoint:
    """A table row for the analysis plots; checkpoints are grouped per CFG so each CFG draws its own line."""
    method = f"checkpoint, CFG {row['cfg']:g}" if row["method"] == CHECKPOINT else "DreamBlend"
    return OperatingPoint(
        method=method,
        subject_fidelity=row["subject_fidelity"],
        prompt_fidelity=row["prompt_fidelity"],
        guidance_step=row["guidance_step"],
        edit_step=row["edit_step"],
        alpha=row["alpha"],
        cfg=row["cfg"],
        subject_fidelity_se=row["subject_fidelity_se"],
        prompt_fidelity_se=row["prompt_fidelity_se"],
        subject=row.get("subject"),
    )


def collapse_rows(
    subjects: Sequence[Subject],
    points: Sequence[Point],
    images: dict[tuple[str, Point], list[dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Per subject (and "all", pooled) and checkpoint: mean collapse score with its standard error, the
    subject region's share of the map (a uniform word's score), and each background word's share."""
    rows = []
    groups = [(s.name, [s.name]) for s in subjects] + [("all", [s.name for s in subjects])]
    for label, names in groups:
        for point in (p for p in points if p.method == CHECKPOINT):
            members = [r["attention"] for name in names for r in images[(name, point)]]
            mean, se, n = _stats([m["collapse"] for m in members])
            row = {
                "subject": label,
                "step": point.edit,
                "cfg": point.cfg,
                "collapse": mean,
                "collapse_se": se,
            }
            row["region_share"], _, _ = _stats([m["region_share"] for m in members])
            row["n_images"] = n
            for word in dict.fromkeys(w for m in members for w in m["shares"]):
                row[f"share_{word}"] = _stats([m["shares"].get(word) for m in members])[0]
            rows.append(row)
    return rows


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def _fmt(mean: float | None, se: float | None = None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f}" if se is None else f"{mean:.3f} ± {se:.3f}"


def render_table(
    run: Experiment,
    rows: Sequence[dict[str, Any]],
    collapse: Sequence[dict[str, Any]],
    suggestion: Any,
    names: list[str],
) -> str:
    """``table.md``: Table 1 for the toy world (best point of each method by F1, base model, each E alone)
    with device, time and sample sizes, the Pareto verdict and the collapse summary."""
    s, plan = run.s, run.plan
    images = rows[0]["n_images"]
    compute = run.compute_seconds()
    total = sum(compute.values())
    best = {
        m: best_by_f1([as_operating_point(r) for r in rows if r["method"] == m])
        for m in (CHECKPOINT, DREAMBLEND)
    }

    def find(point: OperatingPoint, method: str) -> dict[str, Any]:
        return next(
            r for r in rows
            if r["method"] == method and (r["guidance_step"], r["edit_step"], r["alpha"], r["cfg"])
            == (point.guidance_step, point.edit_step, point.alpha, point.cfg)
        )  # fmt: skip

    shown = [("best checkpoint by F1", find(best[CHECKPOINT], CHECKPOINT))]
    shown.append(("best DreamBlend by F1", find(best[DREAMBLEND], DREAMBLEND)))
    cfg0 = next(iter(plan.edit_cfg.values()))
    shown.append(
        (
            "base model",
            next(r for r in rows if r["method"] == CHECKPOINT and r["edit_step"] == 0 and r["cfg"] == cfg0),
        )
    )
    for edit in plan.edit_steps:
        alone = next(
            r
            for r in rows
            if r["method"] == CHECKPOINT and r["edit_step"] == edit and r["cfg"] == plan.cfg_of(edit)
        )
        shown.append((f"E {edit} alone", alone))
    lines = [
        "## Toy world: DreamBlend against its fine-tuning checkpoints",
        "",
        f"Device: {device_name()}, {torch.get_num_threads()} torch thread(s); compute {_duration(total)} "
        f"(training {_duration(compute['train'])}, sampling {_duration(compute['generate'])}, scoring "
        f"{_duration(compute['score'])}). DreamBooth {s.mode}, {s.max_steps} steps, "
        f"{len(plan.steps)} checkpoints; DDIM {s.steps} steps.",
        f"Sample: {len(run.subjects)} subject(s) x their evaluation prompts (settings never in the instance "
        f"photos) x {s.seeds} seed(s) = {images} images per operating point.",
        "Mean ± standard error over images (all subjects and prompts pooled, images treated as independent). "
        f"Subject fidelity: `{names[0]}`; prompt fidelity: `{names[1]}`; diversity: `{names[2]}`. "
        "F1 of the two fidelities picks each method's best point, as in the paper.",
        *(f"Note: {note}." for note in run.notes),
        "",
        "| operating point | G | E | alpha | CFG | subject fidelity | prompt fidelity | diversity | F1 "
        "| images |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in shown:
        g = "" if r["guidance_step"] is None else r["guidance_step"]
        a = "" if r["alpha"] is None else f"{r['alpha']:g}"
        lines.append(
            f"| {label} | {g} | {r['edit_step']} | {a} | {r['cfg']:g} | "
            f"{_fmt(r['subject_fidelity'], r['subject_fidelity_se'])} | "
            f"{_fmt(r['prompt_fidelity'], r['prompt_fidelity_se'])} | "
            f"{_fmt(r['diversity'], r['diversity_se'])} | "
            f"{r['f1']:.3f} | {r['n_images']} |"
        )
    blends = [r for r in rows if r["method"] == DREAMBLEND]
    beyond = [r for r in blends if r["beyond_checkpoint_front"]]
    front = pareto_front([as_operating_point(r) for r in rows if r["method"] == CHECKPOINT])
    lines += ["", f"Checkpoints' Pareto front: {', '.join(f'step {p.step} (CFG {p.cfg:g})' for p in front)}."]
    if beyond:
        top = max(beyond, key=lambda r: r["front_margin"])
        se = max(top["subject_fidelity_se"] or 0.0, top["prompt_fidelity_se"] or 0.0)
        lines.append(
            f"{len(beyond)} of {len(blends)} DreamBlend points lie beyond it; the farthest, "
            f"G {top['guidance_step']} / E {top['edit_step']} / alpha {top['alpha']:g}, by "
            f"{top['front_margin']:.3f} (its larger standard error: {se:.3f})."
        )
    else:
        lines.append(f"None of the {len(blends)} DreamBlend points lies beyond it.")
    pooled = sorted(
        (r for r in collapse if r["subject"] == "all" and r["cfg"] == cfg0), key=lambda r: r["step"]
    )
    shown_steps = [r for r in pooled if r["step"] in {0, *plan.edit_steps, plan.steps[-1]}]
    lines += [
        "",
        "Attention collapse (share of the background words' attention inside the subject token's region; "
        f"CFG {cfg0:g}): "
        + ", ".join(f"step {r['step']} {_fmt(r['collapse'], r['collapse_se'])}" for r in shown_steps)
        + f". Suggested by collapse: G = {suggestion.guidance.name}, E = {suggestion.edit.name}.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- figures

_PANELS = (
    ("subject_fidelity", "subject fidelity"),
    ("prompt_fidelity", "prompt fidelity"),
    ("diversity", "diversity"),
)


def _panel(ax: Any, xs: Sequence[float], rows: Sequence[dict[str, Any]], column: str, **style: Any) -> None:
    y = [np.nan if r[column] is None else r[column] for r in rows]
    err = [0.0 if r[f"{column}_se"] is None else r[f"{column}_se"] for r in rows]
    ax.errorbar(xs, y, yerr=err, marker="o", capsize=3, **style)


def _reference(ax: Any, row: dict[str, Any] | None, column: str, label: str, color: str) -> None:
    if row is not None and row[column] is not None:
        ax.axhline(row[column], color=color, linestyle="--", linewidth=1, label=label)


def _alone(rows: Sequence[dict[str, Any]], step: int, cfg: float) -> dict[str, Any] | None:
    return next(
        (r for r in rows if r["method"] == CHECKPOINT and r["edit_step"] == step and r["cfg"] == cfg), None
    )


def plot_alpha_sweep(rows: Sequence[dict[str, Any]], plan: Plan, path: Path, names: Sequence[str]) -> Path:
    """Fig. 9: each fidelity and diversity against alpha at the fixed pair; alpha 0 is E alone."""
    g, e, cfg = plan.fixed_guidance, plan.fixed_edit, plan.cfg_of(plan.fixed_edit)
    sweep = sorted(
        (
            r
            for r in rows
            if r["method"] == DREAMBLEND and (r["guidance_step"], r["edit_step"], r["cfg"]) == (g, e, cfg)
        ),
        key=lambda r: r["alpha"],
    )
    edit_alone = _alone(rows, e, cfg)
    series = ([edit_alone] if edit_alone else []) + sweep
    xs = [0.0 if r["method"] == CHECKPOINT else r["alpha"] for r in series]
    figure = new_figure(11, 3.4)
    for ax, (column, label), name in zip(figure.subplots(1, 3), _PANELS, names, strict=False):
        _panel(ax, range(len(xs)), series, column, color="C2", label="DreamBlend")
        _reference(ax, _alone(rows, g, cfg), column, f"G (step {g}) alone", "C0")
        _reference(ax, edit_alone, column, f"E (step {e}) alone", "C3")
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        ax.set(xlabel="cross-attention guidance scale alpha", ylabel=f"{label} ({name})")
        ax.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=7)
    figure.suptitle(f"Fig. 9: alpha at G {g} / E {e}, CFG {cfg:g} (mean ± SE over images)")
    return save_figure(figure, path)


def plot_checkpoint_choice(
    rows: Sequence[dict[str, Any]], plan: Plan, path: Path, names: Sequence[str]
) -> Path:
    """Fig. 10: (a) every G with the fixed E, (b) every E with the fixed G, at the fixed alpha."""
    g, e, alpha = plan.fixed_guidance, plan.fixed_edit, plan.fixed_alpha
    blends = [r for r in rows if r["method"] == DREAMBLEND and r["alpha"] == alpha]
    by_g = sorted(
        (r for r in blends if r["edit_step"] == e and r["cfg"] == plan.cfg_of(e)),
        key=lambda r: r["guidance_step"],
    )
    by_e = sorted(
        (r for r in blends if r["guidance_step"] == g and r["cfg"] == plan.cfg_of(r["edit_step"])),
        key=lambda r: r["edit_step"],
    )
    figure = new_figure(11, 6.4)
    axes = figure.subplots(2, 3)
    for row_axes, series, key, title in (
        (axes[0], by_g, "guidance_step", f"(a) guidance step, E = {e}"),
        (axes[1], by_e, "edit_step", f"(b) edit step, G = {g}"),
    ):
        for ax, (column, label), name in zip(row_axes, _PANELS, names, strict=False):
            steps = [r[key] for r in series]
            _panel(ax, steps, series, column, color="C2", label="DreamBlend")
            if key == "edit_step":  # the edit checkpoints alone, each at its CFG
                alone = [_alone(rows, r["edit_step"], r["cfg"]) for r in series]
                _panel(ax, steps, alone, column, color="C7", label="E alone")
            else:
                _reference(ax, _alone(rows, e, plan.cfg_of(e)), column, f"E (step {e}) alone", "C3")
            ax.set(xlabel=title, ylabel=f"{label} ({name})")
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=7)
    figure.suptitle(f"Fig. 10: choice of G and E at alpha {alpha:g} (mean ± SE over images)")
    return save_figure(figure, path)


# ---------------------------------------------------------------------------------------------- command line


def _default(name: str) -> str:
    """An option's defaults as help text: "(default 2; smoke 1)"."""

    def show(value: Any) -> str:
        return (" ".join(map(str, value)) or "none") if isinstance(value, list) else str(value)

    full, smoke = FULL_DEFAULTS[name], SMOKE_DEFAULTS[name]
    return f"(default {show(full)})" if full == smoke else f"(default {show(full)}; smoke {show(smoke)})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dreamblend.toyworld.experiment",
        description=__doc__.split("\n\n")[0],
        epilog="Outputs, resuming and the use of two cores: the module's docstring.",
    )
    add = parser.add_argument
    add("--out", type=Path, metavar="DIR", help=f"output folder (default {DEFAULT_OUT}; --smoke needs one)")
    add("--smoke", action="store_true", help="toy-scale run for CI; options given here override its values")
    add("--dry-run", action="store_true", help="print the plan and the time estimate, then stop")
    add("--base", type=Path, metavar="DIR", help="base model folder (default: the shipped toy model)")
    add(
        "--metrics-model",
        type=Path,
        metavar="DIR",
        help="world encoder of the toy metrics (default: shipped)",
    )
    subjects = [s.name for s in SUBJECTS]
    add(
        "--subjects",
        nargs="+",
        choices=subjects,
        metavar="NAME",
        help=f"of {', '.join(subjects)} (default all)",
    )
    add("--instances", type=int, metavar="N", help=f"instance photos per subject {_default('instances')}")
    add("--prompts", type=int, metavar="N", help="evaluation prompts per subject (default all; smoke 2)")
    add("--seeds", type=int, metavar="N", help=f"seeds per prompt and operating point {_default('seeds')}")
    add("--steps", type=int, metavar="N", help=f"DDIM sampling steps {_default('steps')}")
    add("--batch-size", type=int, metavar="N", help=f"images per pipeline call {_default('batch_size')}")
    add("--threads", type=int, metavar="N", help="torch CPU threads (default torch's; smoke 1)")
    train = parser.add_argument_group("fine-tuning").add_argument
    train("--mode", choices=("lora", "full"), help="DreamBooth with LoRA or on the full UNet (default lora)")
    train("--max-steps", type=int, metavar="N", help=f"training steps {_default('max_steps')}")
    train(
        "--step-scale",
        type=int,
        metavar="K",
        help="multiply the paper's checkpoint and edit steps (default 1)",
    )
    train("--save-steps", type=int, nargs="+", metavar="STEP", help="checkpoint steps instead of the paper's")
    rates = ", ".join(f"{mode} {rate:g}" for mode, rate in TOY_LEARNING_RATE.items())
    train("--learning-rate", type=float, metavar="LR", help=f"(default by mode: {rates})")
    train("--lora-rank", type=int, default=4, metavar="R", help="(default 4)")
    train("--train-batch-size", type=int, default=1, metavar="N", help="(default 1)")
    train("--train-seed", type=int, default=0, metavar="N", help="(default 0)")
    blend = parser.add_argument_group("DreamBlend points").add_argument
    blend(
        "--edit-steps",
        type=int,
        nargs="+",
        metavar="STEP",
        help="edit checkpoints E (default the paper's 100 200, scaled; smoke 2 3)",
    )
    blend(
        "--edit-cfg",
        type=float,
        nargs="+",
        metavar="CFG",
        help=f"CFG of each edit step; other steps take the nearest one's {_default('edit_cfg')}",
    )
    blend(
        "--alphas",
        type=float,
        nargs="+",
        metavar="A",
        help=f"alpha grid of every G/E pair {_default('alphas')}",
    )
    blend(
        "--sweep-alphas",
        type=float,
        nargs="*",
        metavar="A",
        help=f"more alphas at the fixed pair, Fig. 9 {_default('sweep_alphas')}",
    )
    blend(
        "--fixed-guidance",
        type=int,
        metavar="STEP",
        help="G of Figs. 9 and 10, whose E is the last edit step (default 25, scaled; smoke 1)",
    )
    blend("--fixed-alpha", type=float, metavar="A", help="alpha of Fig. 10 (default the middle of --alphas)")
    analysis = parser.add_argument_group("analysis").add_argument
    analysis(
        "--map-resolution",
        type=int,
        default=8,
        metavar="R",
        help="cross-attention maps read: R x R layers (default 8)",
    )
    analysis(
        "--map-steps",
        type=int,
        nargs="+",
        metavar="STEP",
        help="checkpoints in Fig. 3 (default 0, first, fixed G, edit steps, last)",
    )
    analysis(
        "--metrics",
        nargs=3,
        default=["toy_subject", "toy_prompt", "toy_diversity"],
        metavar=("SUBJECT", "PROMPT", "DIVERSITY"),
        help="registered metrics of the three roles (default toy_subject toy_prompt toy_diversity)",
    )
    analysis(
        "--extra-metrics",
        nargs="*",
        default=["toy_class", "toy_background"],
        metavar="NAME",
        help="more columns (default toy_class toy_background)",
    )
    add("--quiet", action="store_true", help="print nothing but errors")
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    args = _parser().parse_args(argv)
    defaults = SMOKE_DEFAULTS if args.smoke else FULL_DEFAULTS
    values = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    for name, default in defaults.items():
        if values[name] is None:
            values[name] = copy.deepcopy(default)
    if values["out"] is None:
        if args.smoke:
            raise ExperimentError("--smoke needs --out DIR")
        values["out"] = DEFAULT_OUT
    for name in ("instances", "seeds", "steps", "batch_size", "max_steps", "step_scale", "lora_rank"):
        if values[name] < 1:
            raise ExperimentError(f"--{name.replace('_', '-')} must be at least 1, got {values[name]}")
    if values["learning_rate"] is None:
        values["learning_rate"] = TOY_LEARNING_RATE[values["mode"]]
    if values["prompts"] is not None and values["prompts"] < 1:
        raise ExperimentError(f"--prompts must be at least 1, got {values['prompts']}")
    return Settings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        return Experiment(settings, sys.argv[1:] if argv is None else argv).run()
    except ExperimentError as exc:
        print(f"experiment: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
