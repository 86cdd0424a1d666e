"""JeDi in the toy world: trained from the toy base on same-subject sets, against DreamBooth and DreamBlend.

    python -m dreamblend.toyworld.jedi_experiment --out benchmarks/results/jedi [--smoke] [--threads 1]

Stages, each resumable (intermediates in ``DIR/work``, kept out of commits by ``DIR/.gitignore``):

1. **sets**: ``--sets`` same-subject training sets of ``--set-size`` (:mod:`~dreamblend.toyworld.jedi_sets`;
   no training subject shares class, colour and pattern with an evaluation subject).
2. **train**: ``train jedi`` from the toy base (full fine-tuning, ``--train-steps`` steps of
   ``--train-batch`` sets), a resumable state every ``--state-every`` steps: a killed run continues.
3. **sample**: for each evaluation subject (by default the subjects of the DreamBooth/DreamBlend run in
   ``--baseline``), its first 1 and 3 DreamBooth instance photos (the photos DreamBooth trained on) as
   references, the same evaluation prompts, seeds and DDIM steps as that run.
4. **score**: the toy metrics against all instance photos, as the DreamBooth experiment scores, plus
   the masked subject similarity (JeDi's MDINO idea): every pixel outside the object's box, which the
   world encoder's layout head locates (mean error 0.013 of the side on rendered subjects), is set to
   grey on both the image and the references, so the setting cannot count as the subject.
5. **compare**: the best DreamBooth checkpoint and the best DreamBlend point by F1 from ``--baseline``'s
   ``points.csv``, their masked scores from its ``work`` images when present; ``table.md``,
   ``results.csv``, ``figures/jedi_samples.png``, ``figures/jedi_points.png``.
6. **cost** (the supplement's Table 6): seconds per denoising step of the base model's guided step (one
   image) and of JeDi's at growing set sizes, on this machine (``cost.csv``).

``--cost-only`` runs stage 6 alone (``cost.csv``, ``cost.md``): a step's compute does not depend on the
weights, so it times the converted base. ``--smoke`` runs every stage at toy scale for CI (a random
toy-architecture base and world encoder when the shipped weights are absent, a few sets, two training
steps, one subject and prompt, two sampling steps); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamblend.analysis.figures import new_figure
from dreamblend.analysis.figures import save_png as save_figure
from dreamblend.analysis.points import best_by_f1, f1_score
from dreamblend.commands.generate import save_png
from dreamblend.toyworld.experiment import (
    CHECKPOINT,
    DREAMBLEND,
    WEIGHTS,
    _file_digest,
    _fmt,
    _stats,
    _write_csv,
    _write_json,
    _write_text,
    as_operating_point,
    device_name,
    smoke_base,
    smoke_metrics_model,
)
from dreamblend.toyworld.jedi_sets import write_training_sets
from dreamblend.toyworld.subjects import Subject, evaluation_prompts, get_subject, instance_images

DEFAULT_OUT = Path("benchmarks/results/jedi")
DEFAULT_BASELINE = Path("benchmarks/results/toyworld")
METRICS = ("toy_subject", "toy_prompt", "toy_diversity", "toy_class", "toy_background")
MASKED = "toy_subject_masked"
# sample_pose's ranges: x U(0.32, 0.68), y U(0.46, 0.64), size U(0.18, 0.28); the world encoder's layout
# head was trained on (x, y, size) standardized by these moments of its render pool.
LAYOUT_MEAN = np.array([0.5, 0.55, 0.23])
LAYOUT_STD = np.array([0.36, 0.18, 0.10]) / math.sqrt(12)
GREY = (128, 128, 128)

FULL: dict[str, Any] = {
    "sets": 4000,
    "set_size": 4,
    "train_steps": 6000,
    "train_batch": 8,
    "learning_rate": 2e-4,
    "state_every": 250,
    "subjects": None,
    "references": [1, 3],
    "prompts": 4,
    "seeds": 2,
    "steps": 25,
    "cfg": 3.0,
    "cost_sizes": [1, 2, 3, 4, 6, 8],
}
SMOKE: dict[str, Any] = {
    **FULL,
    "sets": 3,
    "set_size": 3,
    "train_steps": 2,
    "train_batch": 2,
    "state_every": 1,
    "subjects": ["dotted_cube"],
    "references": [1, 2],
    "prompts": 1,
    "seeds": 2,
    "steps": 2,
    "cost_sizes": [1, 2],
}


class JeDiExperimentError(Exception):
    """A setting or input the experiment cannot work with; the message says the fix."""


@dataclass
class Settings:
    out: Path
    smoke: bool
    base: Path | None
    metrics_model: Path | None
    baseline: Path
    sets: int
    set_size: int
    train_steps: int
    train_batch: int
    learning_rate: float
    state_every: int
    subjects: list[str] | None
    references: list[int]
    prompts: int
    seeds: int
    steps: int
    cfg: float
    cost_sizes: list[int]
    threads: int | None
    cost_only: bool = False
    instances: int = 5


def score_images(
    metrics: Sequence[Any], images: list[Image.Image], prompts: list[str], references: list[Image.Image]
) -> list[dict[str, float | None]]:
    """Per image, every metric (diversity within the images of one prompt) and the masked subject score."""
    scores: dict[str, np.ndarray] = {}
    for metric in metrics:
        values = np.full(len(images), np.nan)
        if metric.role == "diversity":
            for prompt in dict.fromkeys(prompts):
                rows = [k for k, p in enumerate(prompts) if p == prompt]
                values[rows] = metric.score([images[k] for k in rows], [prompt] * len(rows), references)
        else:
            values[:] = metric.score(images, prompts, references)
        scores[metric.name] = values
    subject = next(m for m in metrics if m.name == "toy_subject")
    encoder = subject.model.encoder
    scores[MASKED] = np.asarray(
        subject.score(object_boxes(encoder, images), prompts, object_boxes(encoder, references))
    )
    return [
        {name: float(v[k]) if math.isfinite(v[k]) else None for name, v in scores.items()}
        for k in range(len(images))
    ]


@torch.no_grad()
def object_boxes(encoder: Any, images: Sequence[Image.Image]) -> list[Image.Image]:
    """Each image with everything outside the object's box (from the layout head, plus a margin) grey."""
    from dreamblend.toyworld.metrics import images_to_tensor

    layout = encoder(images_to_tensor(images))["layout"].double().numpy() * LAYOUT_STD + LAYOUT_MEAN
    out = []
    for image, (x, y, size) in zip(images, layout, strict=True):
        pixels = np.asarray(image.convert("RGB")).copy()
        side = pixels.shape[0]
        half = 1.15 * size  # every solid fits the disc of radius `size`; the margin absorbs the head's error
        x0, x1 = int(max(0, (x - half) * side)), int(min(side, math.ceil((x + half) * side)))
        y0, y1 = int(max(0, (y - half) * side)), int(min(side, math.ceil((y + half) * side)))
        keep = np.zeros(pixels.shape[:2], bool)
        keep[y0:y1, x0:x1] = True
        pixels[~keep] = GREY
        out.append(Image.fromarray(pixels))
    return out


class JeDiExperiment:
    def __init__(self, s: Settings, argv: Sequence[str]) -> None:
        self.s, self.argv = s, list(argv)
        self.work = s.out / "work"
        self.notes: list[str] = []
        self.seconds: dict[str, float] = {}

    def say(self, text: str) -> None:
        print(text, flush=True)

    # ------------------------------------------------------------------ inputs
    def resolve(self) -> None:
        s = self.s
        self.base = s.base or WEIGHTS / "base"
        if not (self.base / "model_index.json").is_file():
            if not s.smoke or s.base is not None:
                raise JeDiExperimentError(
                    f"no base model at {self.base}: pass --base FOLDER (a toy-world model)"
                )
            self.base = self.work / "base"
            if not (self.base / "model_index.json").is_file():
                smoke_base(self.base)
            self.notes.append("base model: random weights of the toy architecture (smoke stand-in)")
        self.metrics_model = s.metrics_model or WEIGHTS / "metrics"
        if not (self.metrics_model / "model.safetensors").is_file():
            if not s.smoke or s.metrics_model is not None:
                raise JeDiExperimentError(
                    f"no world-encoder weights at {self.metrics_model}; pass --metrics-model"
                )
            self.metrics_model = self.work / "metrics-model"
            if not (self.metrics_model / "model.safetensors").is_file():
                smoke_metrics_model(self.metrics_model)
            self.notes.append("metrics: random world encoder (smoke stand-in); the scores mean nothing")
        self.baseline_run = self._read_baseline_run()
        names = s.subjects or (self.baseline_run or {}).get("options", {}).get("subjects")
        if not names:
            raise JeDiExperimentError(f"no --subjects given and no baseline run.json in {s.baseline}")
        self.subjects = [get_subject(name) for name in names]
        if max(s.references) >= s.set_size:
            raise JeDiExperimentError(
                f"--references {s.references}: sets of {s.set_size} take at most {s.set_size - 1} references"
            )

    def _read_baseline_run(self) -> dict[str, Any] | None:
        path = self.s.baseline / "run.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def metrics(self) -> list[Any]:
        import dreamblend.toyworld.metrics  # noqa: F401 - registers the toy metrics
        from dreamblend.metrics import build_metrics

        return build_metrics(list(METRICS), device="cpu", models={"toy_world": str(self.metrics_model)})

    # ------------------------------------------------------------------ stages
    def train_key(self) -> dict[str, Any]:
        s = self.s
        return {
            "base": _file_digest(self.base / "unet" / "diffusion_pytorch_model.safetensors"),
            **{k: getattr(s, k) for k in ("sets", "set_size", "train_steps", "train_batch", "learning_rate")},
        }

    def train(self) -> Path:
        """The trained JeDi checkpoint: made from the sets (resuming a killed run), unless already done."""
        from dreamblend.jedi.train import JeDiConfig, train_jedi

        s, run = self.s, self.work / "train"
        checkpoint = run / f"checkpoint-{s.train_steps}"
        marker = self.work / "trained.json"
        if marker.is_file():
            if json.loads(marker.read_text())["key"] != self.train_key():
                raise JeDiExperimentError(f"{self.work} was trained with other settings; choose a new --out")
            return checkpoint
        start = time.perf_counter()
        sets = self.work / "sets"
        write_training_sets(sets, s.sets, s.set_size)
        self.seconds["sets"] = time.perf_counter() - start
        self.say(f"training JeDi: {s.train_steps} steps of {s.train_batch} sets of {s.set_size}")
        start = time.perf_counter()
        train_jedi(
            JeDiConfig(
                pretrained_model=str(self.base),
                instance_dir=sets,
                output_dir=run,
                set_size=s.set_size,
                max_steps=s.train_steps,
                batch_size=s.train_batch,
                learning_rate=s.learning_rate,
                lr_scheduler="constant_with_warmup",
                lr_warmup_steps=min(100, s.train_steps // 10),
                state_every=s.state_every,
                log_every=10,
                mixed_precision="no",
                resume=any(run.glob("state-*")),
                progress=not s.smoke,
            )
        )
        self.seconds["train"] = time.perf_counter() - start
        _write_json(marker, {"key": self.train_key(), "seconds": self.seconds["train"]})
        return checkpoint

    def sample(self, checkpoint: Path) -> dict[tuple[str, int], list[dict[str, Any]]]:
        """JeDi's images per (subject, reference count), one file and record each; finished ones are kept."""
        from dreamblend.jedi.pipeline import load_jedi_pipeline

        s = self.s
        pipe = load_jedi_pipeline(self.base, checkpoint, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        records: dict[tuple[str, int], list[dict[str, Any]]] = {}
        start, made = time.perf_counter(), 0
        for subject in self.subjects:
            photos = self.instances(subject)
            folder = self.work / "images" / subject.name
            folder.mkdir(parents=True, exist_ok=True)
            for k in s.references:
                rows = []
                for prompt in evaluation_prompts(subject)[: s.prompts]:
                    for seed in range(s.seeds):
                        name = f"refs{k}-{prompt.replace(' ', '_')}-seed{seed}.png"
                        path = folder / name
                        if not path.is_file():
                            image = pipe(
                                prompt,
                                photos[:k],
                                [subject.instance_prompt] * k,
                                num_inference_steps=s.steps,
                                guidance_scale=s.cfg,
                                generator=torch.Generator().manual_seed(seed),
                            ).images[0]
                            save_png(image, path)
                            made += 1
                        rows.append(
                            {
                                "subject": subject.name,
                                "references": k,
                                "prompt": prompt,
                                "seed": seed,
                                "file": str(path.relative_to(self.work)),
                            }
                        )
                records[(subject.name, k)] = rows
        self.seconds["sample"] = time.perf_counter() - start
        self.say(f"sampled {made} JeDi images in {self.seconds['sample']:.1f} s")
        return records

    def instances(self, subject: Subject) -> list[Image.Image]:
        """The DreamBooth experiment's instance photos of ``subject`` (same generator, same seed)."""
        return [Image.fromarray(p.rendered.image) for p in instance_images(subject, self.s.instances)]

    # ------------------------------------------------------------------ comparison
    def jedi_rows(
        self, records: dict[tuple[str, int], list[dict[str, Any]]], metrics: list[Any]
    ) -> list[dict]:
        rows = []
        for k in self.s.references:
            scored = []
            for subject in self.subjects:
                items = records[(subject.name, k)]
                images = [Image.open(self.work / r["file"]).convert("RGB") for r in items]
                scored += score_images(metrics, images, [r["prompt"] for r in items], self.instances(subject))
            rows.append(summary(f"JeDi, {k} reference{'s' * (k > 1)}", scored))
        return rows

    def baseline_rows(self, metrics: list[Any]) -> list[dict]:
        """Best DreamBooth checkpoint and best DreamBlend point by F1 (and the base model) of the baseline."""
        path = self.s.baseline / "points.csv"
        if not path.is_file():
            self.notes.append(
                f"no baseline points.csv in {self.s.baseline}: DreamBooth/DreamBlend rows left out"
            )
            return []
        options = (self.baseline_run or {}).get("options", {})
        same = {
            "subjects": [s.name for s in self.subjects],
            "prompts": self.s.prompts,
            "seeds": self.s.seeds,
            "steps": self.s.steps,
        }
        differ = [k for k, v in same.items() if options.get(k) != v]
        if differ:
            self.notes.append(
                f"the baseline run differs in {', '.join(differ)} ({[options.get(k) for k in differ]} vs "
                f"{[same[k] for k in differ]}): its rows are not a like-for-like comparison"
            )
        with path.open() as handle:
            table = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]
        rows = []
        for label, method in (
            ("DreamBooth, best checkpoint by F1", CHECKPOINT),
            ("DreamBlend, best by F1", DREAMBLEND),
        ):
            candidates = [
                r for r in table if r["method"] == method and (method == DREAMBLEND or r["edit_step"])
            ]
            best = best_by_f1([as_operating_point(r) for r in candidates])
            row = next(r for r in candidates if as_operating_point(r) == best)
            rows.append({**self._baseline_summary(label, row), **self._baseline_masked(row, metrics)})
        base = next((r for r in table if r["method"] == CHECKPOINT and r["edit_step"] == 0), None)
        if base is not None:
            rows.append(
                {
                    **self._baseline_summary("base model (no subject)", base),
                    **self._baseline_masked(base, metrics),
                }
            )
        return rows

    @staticmethod
    def _baseline_summary(label: str, row: dict[str, Any]) -> dict[str, Any]:
        where = (
            f"step {row['edit_step']}"
            if row["method"] == CHECKPOINT
            else (f"G {row['guidance_step']}, E {row['edit_step']}, alpha {row['alpha']:g}")
        )
        out = {
            "method": label,
            "point": f"{where}, CFG {row['cfg']:g}",
            "n_images": row["n_images"],
            "f1": row["f1"],
        }
        for column, name in (
            ("subject_fidelity", "toy_subject"),
            ("prompt_fidelity", "toy_prompt"),
            ("diversity", "toy_diversity"),
            ("toy_class", "toy_class"),
            ("toy_background", "toy_background"),
        ):
            out[name], out[f"{name}_se"] = row.get(column), row.get(f"{column}_se")
        return out

    def _baseline_masked(self, row: dict[str, Any], metrics: list[Any]) -> dict[str, Any]:
        """The masked subject score of a baseline point, from its images in the baseline's work folder."""
        key = ("method", "guidance_step", "edit_step", "alpha", "cfg")
        scored = []
        for subject in self.subjects:
            folder = self.s.baseline / "work" / subject.name
            records = [json.loads(p.read_text()) for p in sorted((folder / "records").glob("*.json"))]
            mine = [r for r in records if all(_same(r.get(k), row.get(k)) for k in key)]
            mine = [r for r in mine if r["seed"] < self.s.seeds]
            if not mine:
                return {MASKED: None, f"{MASKED}_se": None}
            images = [Image.open(folder / "images" / r["file"]).convert("RGB") for r in mine]
            scored += score_images(metrics, images, [r["prompt"] for r in mine], self.instances(subject))
        mean, se, _ = _stats([r[MASKED] for r in scored])
        return {MASKED: mean, f"{MASKED}_se": se}

    # ------------------------------------------------------------------ cost (Table 6)
    def cost(self) -> list[dict[str, Any]]:
        """Median seconds per guided denoising step: the base model on one image vs JeDi on a set of n.

        The JeDi UNet is the converted base: a step's compute does not depend on the weights, so the
        cost needs no trained model (``--cost-only`` measures it alone).
        """
        from diffusers import UNet2DConditionModel

        from dreamblend.hub import DTYPE_KWARG
        from dreamblend.jedi.convert import convert_unet, inpainting_input
        from dreamblend.joint import ImageSet, attach_joint_attention

        base = UNet2DConditionModel.from_pretrained(
            self.base, subfolder="unet", **{DTYPE_KWARG: torch.float32}
        ).eval()
        jedi = convert_unet(base)
        size = int(base.config.sample_size)
        context = torch.randn(1, 77, base.config.cross_attention_dim)
        repeats = 3 if self.s.smoke else 15

        def clock(call: Any) -> float:
            start = time.perf_counter()
            call()
            return time.perf_counter() - start

        t = torch.tensor(500)
        x1 = torch.randn(2, 4, size, size)
        plain = lambda: base(x1, t, context.expand(2, -1, -1))
        plain_seconds: list[float] = []
        rows = []
        with torch.no_grad():
            for n in self.s.cost_sizes:
                for branches, label in ((2, "JeDi, joint guidance"), (3, "JeDi, image/text first")):
                    batch = branches * n
                    x = inpainting_input(
                        torch.randn(batch, 4, size, size),
                        torch.zeros(batch, 4, size, size),
                        torch.ones(batch),
                    )
                    step = lambda x=x, b=batch: jedi(x, t, context.expand(b, -1, -1))
                    with attach_joint_attention(jedi, ImageSet(n)):
                        step(), plain()  # warm-up
                        # A plain step next to every JeDi step: on a shared machine the load drifts, and
                        # the ratio of neighbours cancels it where two separate medians would not.
                        pairs = [(clock(plain), clock(step)) for _ in range(repeats)]
                    plain_seconds += [p for p, _ in pairs]
                    rows.append(
                        {
                            "model": label,
                            "set_size": n,
                            "seconds": statistics.median(q for _, q in pairs),
                            "ratio": statistics.median(q / p for p, q in pairs),
                        }
                    )
        base_row = {"model": "base model (plain step, 1 image)", "set_size": 1, "ratio": 1.0}
        return [{**base_row, "seconds": statistics.median(plain_seconds)}, *rows]

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        s = self.s
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        s.out.mkdir(parents=True, exist_ok=True)
        _write_text(s.out / ".gitignore", "work/\n")
        self.resolve()
        if s.cost_only:
            return self.run_cost_only(started)
        metrics = self.metrics()
        checkpoint = self.train()
        records = self.sample(checkpoint)
        start = time.perf_counter()
        rows = [*self.jedi_rows(records, metrics), *self.baseline_rows(metrics)]
        self.seconds["score"] = time.perf_counter() - start
        costs = self.cost()
        columns = [
            "method",
            "point",
            "n_images",
            "f1",
            *(c for m in (*METRICS, MASKED) for c in (m, f"{m}_se")),
        ]
        _write_csv(s.out / "results.csv", rows, columns)
        _write_csv(s.out / "cost.csv", costs, ["model", "set_size", "seconds", "ratio"])
        figures = s.out / "figures"
        self.plot_samples(records, figures / "jedi_samples.png")
        self.plot_points(rows, figures / "jedi_points.png")
        _write_text(s.out / "table.md", self.table(rows, costs))
        _write_json(
            s.out / "run.json",
            {
                "command": ["python", "-m", "dreamblend.toyworld.jedi_experiment", *self.argv],
                "started": started,
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "device": device_name(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
                "subjects": [x.name for x in self.subjects],
                "notes": self.notes,
                "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            },
        )
        self.say(f"results in {s.out}")
        return 0

    def run_cost_only(self, started: str) -> int:
        """Table 6 alone: ``cost.csv`` and ``cost.md``, no training."""
        costs = self.cost()
        _write_csv(self.s.out / "cost.csv", costs, ["model", "set_size", "seconds", "ratio"])
        header = [
            "## Toy world: JeDi's cost per denoising step",
            "",
            f"Device: {device_name()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
            f"float32, toy UNet at {self.base}; measured {started}.",
            "",
        ]
        _write_text(self.s.out / "cost.md", "\n".join([*header, *cost_table(costs)]) + "\n")
        self.say(f"cost table in {self.s.out / 'cost.md'}")
        return 0

    def plot_points(self, rows: list[dict[str, Any]], path: Path) -> None:
        """Subject fidelity (plain and masked) against prompt fidelity, one marker per method."""
        fig = new_figure(6.4, 4.6)
        ax = fig.subplots()
        for k, r in enumerate(rows):
            color = f"C{k}"
            x, xe = r["toy_prompt"] or 0.0, r["toy_prompt_se"]
            ax.errorbar(x, r["toy_subject"] or 0.0, xerr=xe, yerr=r["toy_subject_se"], fmt="o", color=color,
                        capsize=2, label=f"{r['method']} ({r['point']})")  # fmt: skip
            if r[MASKED] is not None:
                ax.errorbar(x, r[MASKED], yerr=r[f"{MASKED}_se"], fmt="x", color=color, capsize=2, alpha=0.6)
        ax.set_xlabel("prompt fidelity (toy_prompt)")
        ax.set_ylabel("subject fidelity (toy_subject o, masked x)")
        ax.set_title(f"JeDi vs fine-tuning on {len(self.subjects)} subject(s) JeDi never saw", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
        save_figure(fig, path, dpi=130)

    def plot_samples(self, records: dict[tuple[str, int], list[dict[str, Any]]], path: Path) -> None:
        """Per subject: its references, then JeDi's seed-0 image of each prompt for each reference count."""
        s = self.s
        prompts = s.prompts
        cols = max(s.references) + len(s.references) * prompts
        fig = new_figure(1.1 * cols, 1.25 * len(self.subjects) + 0.3)
        axes = fig.subplots(len(self.subjects), cols, squeeze=False)
        for i, subject in enumerate(self.subjects):
            panels = [(im, "reference") for im in self.instances(subject)[: max(s.references)]]
            for k in s.references:
                for r in (r for r in records[(subject.name, k)] if r["seed"] == 0):
                    words = r["prompt"].split(" ", 3)[-1]
                    panels.append((Image.open(self.work / r["file"]), f"{k} ref: {words}"))
            for ax, (image, title) in zip(axes[i], panels, strict=False):
                ax.imshow(image)
                ax.set_title(title, fontsize=5)
            for ax in axes[i]:
                ax.axis("off")
        fig.suptitle("JeDi on subjects it never saw (toy world); seed 0", fontsize=8)
        save_figure(fig, path, dpi=130)

    def table(self, rows: list[dict[str, Any]], costs: list[dict[str, Any]]) -> str:
        s = self.s
        lines = [
            "## Toy world: JeDi (no fine-tuning) against DreamBooth and DreamBlend",
            "",
            f"Device: {device_name()}, {torch.get_num_threads()} torch thread(s). JeDi: full fine-tuning of "
            "the "
            f"toy base for {s.train_steps} steps on {s.sets} same-subject sets of {s.set_size}, batch "
            f"{s.train_batch} sets; evaluated on {len(self.subjects)} subject(s) it never saw "
            f"({', '.join(x.name for x in self.subjects)}), {s.prompts} prompt(s) x {s.seeds} seed(s), DDIM "
            f"{s.steps} steps, joint guidance {s.cfg:g}; references: the subjects' first DreamBooth instance "
            "photos.",
            "",
            "| method | operating point | subject (toy_subject) | masked subject | prompt (toy_prompt) | "
            "diversity | background correct | F1 | images |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['method']} | {r.get('point') or '–'} | "
                f"{_fmt(r['toy_subject'], r['toy_subject_se'])} | "
                f"{_fmt(r[MASKED], r[f'{MASKED}_se'])} | {_fmt(r['toy_prompt'], r['toy_prompt_se'])} | "
                f"{_fmt(r['toy_diversity'], r['toy_diversity_se'])} | "
                f"{_fmt(r['toy_background'], r['toy_background_se'])} | {_fmt(r['f1'])} | {r['n_images']} |"
            )
        lines += [
            "",
            "Mean ± standard error over images. F1: harmonic mean of subject and prompt fidelity. Masked "
            "subject: "
            "toy_subject with everything outside the object's box grey on both sides.",
            "",
            *cost_table(costs),
        ]
        if self.notes:
            lines += ["", *(f"Note: {n}" for n in self.notes)]
        return "\n".join(lines) + "\n"


def cost_table(costs: list[dict[str, Any]]) -> list[str]:
    """The Table 6 lines of ``table.md`` and ``cost.md``."""
    return [
        "Inference cost per denoising step (the supplement's Table 6): median of repeated UNet calls with "
        "classifier-free guidance (2 branches; image-first and text-first guidance: 3), one image per call "
        'for the base model, a set of n for JeDi. "vs plain step" is the median of paired ratios (each '
        "JeDi call timed next to a plain call, which cancels load drift on a shared machine), so it need "
        "not equal the ratio of the two medians:",
        "",
        "| model | set size | seconds per step | vs plain step |",
        "|---|---|---|---|",
        *(f"| {c['model']} | {c['set_size']} | {c['seconds']:.4f} | {c['ratio']:.2f}x |" for c in costs),
    ]


def summary(label: str, scored: list[dict[str, float | None]]) -> dict[str, Any]:
    row: dict[str, Any] = {"method": label, "point": "no fine-tuning", "n_images": len(scored)}
    for name in (*METRICS, MASKED):
        row[name], row[f"{name}_se"], _ = _stats([r[name] for r in scored])
    row["f1"] = f1_score(row["toy_prompt"] or 0.0, row["toy_subject"] or 0.0)
    return row


def _number(text: str) -> Any:
    if text in ("", None):
        return None
    try:
        value = float(text)
    except ValueError:
        return {"True": True, "False": False}.get(text, text)
    return int(value) if value.is_integer() and "." not in text else value


def _same(a: Any, b: Any) -> bool:
    """Equal record and table values: numbers to rounding (CSV text round trip), anything else exactly."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b))
    return a == b


def parse_settings(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})"
    )
    parser.add_argument("--smoke", action="store_true", help="every stage at toy scale (CI)")
    parser.add_argument("--base", type=Path, help="base model folder (default: the shipped toy base)")
    parser.add_argument("--metrics-model", type=Path, help="world-encoder folder (default: the shipped one)")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=DEFAULT_BASELINE,
        help=f"DreamBooth/DreamBlend experiment folder (default {DEFAULT_BASELINE})",
    )
    parser.add_argument("--sets", type=int, help=f"training sets (default {FULL['sets']})")
    parser.add_argument("--set-size", type=int, help=f"images per set (default {FULL['set_size']})")
    parser.add_argument("--train-steps", type=int, help=f"(default {FULL['train_steps']})")
    parser.add_argument("--train-batch", type=int, help=f"sets per step (default {FULL['train_batch']})")
    parser.add_argument("--learning-rate", type=float, help=f"(default {FULL['learning_rate']})")
    parser.add_argument(
        "--state-every", type=int, help=f"steps between resumable states ({FULL['state_every']})"
    )
    parser.add_argument("--subjects", nargs="+", help="evaluation subjects (default: the baseline run's)")
    parser.add_argument("--references", type=int, nargs="+", help="reference counts (default 1 3)")
    parser.add_argument(
        "--prompts", type=int, help=f"evaluation prompts per subject (default {FULL['prompts']})"
    )
    parser.add_argument("--seeds", type=int, help=f"(default {FULL['seeds']})")
    parser.add_argument("--steps", type=int, help=f"DDIM steps (default {FULL['steps']})")
    parser.add_argument("--cfg", type=float, help=f"joint guidance scale (default {FULL['cfg']})")
    parser.add_argument("--cost-sizes", type=int, nargs="+", help="set sizes timed (default 1 2 3 4 6 8)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--cost-only", action="store_true", help="only time the steps (Table 6), no training")
    args = parser.parse_args(argv)
    defaults = SMOKE if args.smoke else FULL
    values = {k: defaults[k] if getattr(args, k, None) is None else getattr(args, k) for k in defaults}
    return Settings(
        out=args.out,
        smoke=args.smoke,
        base=args.base,
        metrics_model=args.metrics_model,
        baseline=args.baseline,
        threads=args.threads,
        cost_only=args.cost_only,
        **values,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = parse_settings(argv)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return JeDiExperiment(settings, argv).run()
    except (JeDiExperimentError, ValueError) as exc:
        print(f"jedi_experiment: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
