"""Train and validate the world encoder behind the toy world's metrics (``dreamblend.toyworld.metrics``).

    python -m dreamblend.toyworld.train_metrics --out dreamblend/toyworld/weights/metrics [--seed 0]
    python -m dreamblend.toyworld.train_metrics validate [--weights FOLDER] [--vae FOLDER] [--seed 1]

Training renders a fixed pool: plain objects of every class, colour and setting (the held-out
combinations included, since the metrics judge pictures of them), extra cubes and cylinders (the one
pair of classes told apart by a few pixels of edge), the subjects in every setting, and objects with
other patterns, so that identity rests on the exact pattern rather than on class and colour. Every
batch is mirrored, shifted by a few pixels and degraded the way generated images are: VAE-like blur
or down/up-sampling, noise, colour jitter, JPEG. One thread and a seed make it deterministic on a
given CPU; it takes about five minutes on one core.

Validation measures, on renders of a seed training never used, the class / colour / background
accuracy (base world, held-out combinations, subjects) and subject identification: whether each image
of a subject, or of a plain object of the same class and colour, scores highest with ``toy_subject``
against its own reference set among all of them. It repeats this after a VAE round trip when a trained
VAE is found, and after a 4x down/up-sampling that stands in for one until then.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import platform
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dreamblend.cpu_info import cpu_model
from dreamblend.toyworld.dataset import ToyWorldDataset
from dreamblend.toyworld.metrics import (
    DEFAULT_WEIGHTS,
    LABELS,
    OTHER_PATTERN,
    PLAIN,
    ToySubjectSimilarity,
    WorldEncoder,
    WorldModel,
)
from dreamblend.toyworld.scenes import HELD_OUT_COMBINATIONS, Scene, render, sample_pose, sample_scene
from dreamblend.toyworld.shapes import PATTERNS, Pattern
from dreamblend.toyworld.subjects import SUBJECTS, Subject, instance_images, subject_set
from dreamblend.toyworld.vocab import BACKGROUNDS, CLASSES, COLOURS

__all__ = [
    "DEFAULT_VAE",
    "THRESHOLD",
    "Pool",
    "TrainingConfig",
    "ValidationSizes",
    "degrade",
    "identity_of",
    "main",
    "render_pool",
    "simulated_round_trip",
    "train",
    "vae_round_trip",
    "validate",
]

THRESHOLD = 0.95
"""Every validation accuracy must reach this before the metrics are trusted."""
DEFAULT_VAE = Path(__file__).parent / "weights" / "base" / "vae"
"""Where the toy text-to-image model's trained VAE is committed, if it is."""

RoundTrip = Callable[[np.ndarray], np.ndarray]
"""uint8 images (N, H, W, 3) to degraded uint8 images of the same shape."""


# ------------------------------------------------------------------------------------------------ data


def _pattern_key(cls: str, colour: str, pattern: Pattern) -> tuple[Any, ...]:
    """What makes two patterned objects look alike: checks swap body and pattern colour freely."""
    colours: Any = (
        frozenset((colour, pattern.colour)) if pattern.kind == "checks" else (colour, pattern.colour)
    )
    return cls, pattern.kind, colours


_SUBJECT_KEYS = {_pattern_key(s.cls, s.colour, s.pattern): s.name for s in SUBJECTS}


def identity_of(scene: Scene) -> str:
    """The identity label of a scene: plain, the subject it shows, or another pattern."""
    if scene.pattern is None:
        return PLAIN
    return _SUBJECT_KEYS.get(_pattern_key(scene.cls, scene.colour, scene.pattern), OTHER_PATTERN)


def _distractor(rng: np.random.Generator) -> Scene:
    """A random patterned object that is no subject, anywhere: identity must rest on the exact pattern."""
    while True:
        cls, colour, kind = str(rng.choice(CLASSES)), str(rng.choice(COLOURS)), str(rng.choice(PATTERNS))
        pattern = Pattern(
            kind, str(rng.choice([c for c in COLOURS if c != colour])), float(rng.uniform(1, 3))
        )
        if _pattern_key(cls, colour, pattern) not in _SUBJECT_KEYS:
            break
    return Scene(
        cls,
        colour,
        str(rng.choice(BACKGROUNDS)),
        **sample_pose(rng),
        aspect=float(rng.uniform(0.8, 1.25)),
        brightness=float(rng.uniform(0.9, 1.1)),
        background_seed=int(rng.integers(2**31)),
        pattern=pattern,
    )


@dataclass
class Pool:
    """Rendered training images (uint8 N x 64 x 64 x 3) with a label per head (-1: not learned) and layout."""

    images: np.ndarray
    labels: dict[str, np.ndarray]
    layout: np.ndarray
    group: np.ndarray


def _labels(scene: Scene) -> dict[str, int]:
    checks = scene.pattern is not None and scene.pattern.kind == "checks"
    # Which colour is the body of a checkered object is a coin toss, except for the one known subject.
    ambiguous = checks and identity_of(scene) == OTHER_PATTERN
    return {
        "class": LABELS["class"].index(scene.cls),
        "colour": -1 if ambiguous else LABELS["colour"].index(scene.colour),
        "background": LABELS["background"].index(scene.background),
        "pattern": LABELS["pattern"].index(scene.pattern.kind if scene.pattern else "none"),
        "pattern_colour": -1
        if ambiguous
        else LABELS["pattern_colour"].index(scene.pattern.colour if scene.pattern else "none"),
        "identity": LABELS["identity"].index(identity_of(scene)),
    }


HARD_CLASSES = ("cube", "cylinder")
"""The classes that differ by a few pixels of edge (a square or a round top), drawn extra in training."""


def _plain(rng: np.random.Generator, cls: str | None = None) -> Scene:
    """A plain object of any class, colour and setting, held-out combinations included.

    The text-to-image model must never see those combinations, but the metrics must judge its
    pictures of them: without them a white cylinder on grass read as a cube half the time.
    """
    return sample_scene(
        rng,
        cls=cls or str(rng.choice(CLASSES)),
        colour=str(rng.choice(COLOURS)),
        background=str(rng.choice(BACKGROUNDS)),
    )


def render_pool(seed: int, base: int, per_subject: int, distractors: int, hard: int = 0) -> Pool:
    """``base`` plain objects plus ``hard`` extra plain cubes and cylinders (group 0), each subject in
    every setting (1), objects with other patterns (2)."""
    rng = np.random.default_rng([seed, zlib.crc32(b"plain")])
    scenes = [_plain(rng) for _ in range(base)]
    scenes += [_plain(rng, HARD_CLASSES[i % len(HARD_CLASSES)]) for i in range(hard)]
    groups = [0] * len(scenes)
    for subject in SUBJECTS:
        scenes += [s.scene for s in subject_set(subject, per_subject, seed)]
        groups += [1] * per_subject
    rng = np.random.default_rng([seed, zlib.crc32(b"distractors")])
    scenes += [_distractor(rng) for _ in range(distractors)]
    groups += [2] * distractors
    labels = [_labels(scene) for scene in scenes]
    return Pool(
        np.stack([render(scene).image for scene in scenes]),
        {head: np.array([row[head] for row in labels], np.int64) for head in LABELS},
        np.array([(s.x, s.y, s.size) for s in scenes], np.float32),
        np.array(groups, np.int64),
    )


# ---------------------------------------------------------------------------------------- augmentation


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of one CxHxW image, edges reflected."""
    radius = max(1, int(np.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)
    padded = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(3, 1, 1, -1), groups=3)
    return F.conv2d(rows, kernel.view(3, 1, -1, 1), groups=3)[0]


def _resample(image: torch.Tensor, factor: int, noise: float, rng: np.random.Generator) -> torch.Tensor:
    """Down by ``factor`` (area), noise at the low resolution, back up: a latent's loss of detail."""
    size = image.shape[-1]
    low = F.interpolate(image[None], scale_factor=1 / factor, mode="area")
    low = low + noise * torch.from_numpy(rng.standard_normal(low.shape, dtype=np.float32))
    mode = "bicubic" if rng.random() < 0.5 else "bilinear"
    return F.interpolate(low, size=(size, size), mode=mode, align_corners=False)[0]


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.array(Image.open(buffer).convert("RGB"))


def degrade(images: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Float (N, 3, H, W) in [0, 1]: each uint8 image as a generator might have drawn it.

    Colour jitter (brightness, contrast, saturation, a slight channel tint), then one of: nothing, a
    Gaussian blur, or a 2x / 4x down/up-sampling with noise at low resolution (what a 16x16 latent
    loses), then pixel noise, 8-bit rounding and, for some, JPEG.
    """
    out = []
    for array in images:
        image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255
        grey = image.mean(dim=0, keepdim=True)
        image = grey + rng.uniform(0.8, 1.2) * (image - grey)
        image = image.mean() + rng.uniform(0.85, 1.15) * (image - image.mean())
        gain = torch.from_numpy(rng.uniform(0.95, 1.05, 3).astype(np.float32)) * rng.uniform(0.85, 1.15)
        image = image * gain[:, None, None]
        kind = rng.random()
        if kind < 0.25:
            image = _gaussian_blur(image, float(rng.uniform(0.4, 1.0)))
        elif kind < 0.5:
            image = _resample(image, 2 if kind < 0.42 else 4, float(rng.uniform(0, 0.03)), rng)
        sigma = rng.uniform(0, 0.03)
        image = image + sigma * torch.from_numpy(rng.standard_normal(image.shape, dtype=np.float32))
        pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        if rng.random() < 0.4:
            pixels = _jpeg(pixels, int(rng.integers(50, 96)))
        out.append(torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1))
    return torch.stack(out).float() / 255


# -------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainingConfig:
    """Everything the trained weights depend on (with the CPU's arithmetic)."""

    seed: int = 0
    steps: int = 1500
    batch_size: int = 64
    base: int = 12000
    per_subject: int = 300
    distractors: int = 1500
    hard: int = 4000
    group_weights: tuple[float, float, float] = (0.55, 0.3, 0.15)
    class_weight: float = 3.0
    """The scene class loss counts this many times: telling cubes from cylinders is the slowest skill."""
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4


SHIFT = 3
"""Largest shift, in pixels, of a training image: positions the pool never drew, against overfitting."""


def _batch(
    pool: Pool, index: np.ndarray, rng: np.random.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Randomly mirrored, shifted and degraded images, with their labels and layout moved alike."""
    size = pool.images.shape[1]
    flip = rng.random(len(index)) < 0.5
    images = np.where(flip[:, None, None, None], pool.images[index][:, :, ::-1], pool.images[index])
    padded = np.pad(images, ((0, 0), (SHIFT, SHIFT), (SHIFT, SHIFT), (0, 0)), mode="edge")
    dx, dy = rng.integers(-SHIFT, SHIFT + 1, (2, len(index)))
    images = np.stack(
        [
            p[SHIFT - y : SHIFT - y + size, SHIFT - x : SHIFT - x + size]
            for p, x, y in zip(padded, dx, dy, strict=True)
        ]
    )
    layout = pool.layout[index].copy()
    layout[flip, 0] = 1 - layout[flip, 0]
    layout[:, 0] += dx / size
    layout[:, 1] += dy / size
    labels = {head: torch.from_numpy(values[index]) for head, values in pool.labels.items()}
    return degrade(images, rng), labels, torch.from_numpy(layout)


def train(config: TrainingConfig, log: Callable[[str], None] = print) -> tuple[WorldEncoder, dict[str, Any]]:
    """A world encoder trained from ``config``; also returns a record of the run for training.json."""
    start = time.perf_counter()
    pool = render_pool(config.seed, config.base, config.per_subject, config.distractors, config.hard)
    render_seconds = time.perf_counter() - start
    log(f"rendered {len(pool.images)} training images in {render_seconds:.0f} s")

    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, zlib.crc32(b"batches")])
    weights = np.asarray(config.group_weights)[pool.group] / np.bincount(pool.group, minlength=3)[pool.group]
    weights /= weights.sum()
    layout_mean, layout_std = pool.layout.mean(axis=0), pool.layout.std(axis=0) + 1e-6

    encoder = WorldEncoder().to(memory_format=torch.channels_last)  # a quarter faster on CPU
    optimizer = torch.optim.AdamW(
        encoder.parameters(), config.learning_rate, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=config.steps)
    encoder.train()
    losses: list[float] = []
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        index = rng.choice(len(pool.images), config.batch_size, replace=False, p=weights)
        images, labels, layout = _batch(pool, index, rng)
        out = encoder(images.contiguous(memory_format=torch.channels_last))
        target = (layout - torch.from_numpy(layout_mean)) / torch.from_numpy(layout_std)
        loss = F.mse_loss(out["layout"], target)
        for kind in ("scene", "object"):
            for head, logits in out[kind].items():
                weight = config.class_weight if (kind, head) == ("scene", "class") else 1.0
                loss = loss + weight * F.cross_entropy(logits, labels[head], ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == config.steps:
            history.append({"step": step, "loss": float(np.mean(losses[-100:]))})
            elapsed = time.perf_counter() - start
            log(f"step {step}/{config.steps}: loss {history[-1]['loss']:.3f} ({elapsed:.0f} s)")
    encoder = encoder.to(memory_format=torch.contiguous_format).eval()
    record = {
        "config": dataclasses.asdict(config),
        "training_images": len(pool.images),
        "parameters": sum(p.numel() for p in encoder.parameters()),
        "render_seconds": round(render_seconds, 1),
        "train_seconds": round(time.perf_counter() - start, 1),
        "loss_history": history,
    }
    return encoder, record


# ------------------------------------------------------------------------------------------ validation


@dataclass(frozen=True)
class ValidationSizes:
    """How many renders validation scores: base scenes, per held-out combination, per subject."""

    base: int = 1000
    per_held_out: int = 25
    per_subject: int = 40
    references: int = 5


def simulated_round_trip(images: np.ndarray) -> np.ndarray:
    """A stand-in for a 16x16-latent VAE's round trip: 4x area down-sampling, bilinear up-sampling."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    low = F.interpolate(x, scale_factor=0.25, mode="area")
    up = F.interpolate(low, size=images.shape[1:3], mode="bilinear", align_corners=False)
    return up.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def vae_round_trip(folder: str | Path, batch_size: int = 32) -> RoundTrip:
    """Encode to the latent mode and decode again with the diffusers ``AutoencoderKL`` in ``folder``."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(folder)).eval()

    @torch.no_grad()
    def round_trip(images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
            out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
        return np.concatenate(out)

    return round_trip


def _pil(images: np.ndarray, round_trip: RoundTrip | None) -> list[Image.Image]:
    images = images if round_trip is None else round_trip(images)
    return [Image.fromarray(image) for image in images]


def _attribute_accuracy(
    model: WorldModel, scenes: Sequence[Scene], round_trip: RoundTrip | None
) -> dict[str, Any]:
    readings = model.read(_pil(np.stack([render(s).image for s in scenes]), round_trip))
    figures: dict[str, Any] = {"n": len(scenes)}
    for head, field in (("class", "cls"), ("colour", "colour"), ("background", "background")):
        truth = [getattr(scene, field) for scene in scenes]
        figures[head] = float(np.mean([p == t for p, t in zip(readings.predicted(head), truth, strict=True)]))
    return figures


def _look_alike(subject: Subject, rng: np.random.Generator, background: str, room: int) -> Scene:
    """The subject's class, colour and shape, plain: what a model that missed the pattern draws."""
    return dataclasses.replace(subject.scene(rng, background, room), pattern=None)


def _identification(
    model: WorldModel, seed: int, sizes: ValidationSizes, round_trip: RoundTrip | None
) -> dict[str, Any]:
    """Nearest reference set by toy_subject among every subject's and every plain look-alike's.

    Test images are each subject in every setting and its plain look-alike in every setting; the
    look-alikes' references are shot like the subject's instance photos, in its home rooms.
    """
    reference_sets: list[list[Image.Image]] = []
    tests: list[np.ndarray] = []
    for subject in SUBJECTS:
        references = instance_images(subject, sizes.references, seed)
        reference_sets.append([Image.fromarray(s.rendered.image) for s in references])
        tests.append(np.stack([s.rendered.image for s in subject_set(subject, sizes.per_subject, seed)]))
    for subject in SUBJECTS:
        rng = np.random.default_rng([seed, zlib.crc32(f"{subject.name}/look-alike".encode())])
        rooms = {home: int(rng.integers(2**31)) for home in subject.homes}
        homes = [subject.homes[i % len(subject.homes)] for i in range(sizes.references)]
        looks = [render(_look_alike(subject, rng, home, rooms[home])).image for home in homes]
        reference_sets.append([Image.fromarray(image) for image in looks])
        scenes = [
            _look_alike(subject, rng, BACKGROUNDS[i % len(BACKGROUNDS)], int(rng.integers(2**31)))
            for i in range(sizes.per_subject)
        ]
        tests.append(np.stack([render(scene).image for scene in scenes]))
    metric = ToySubjectSimilarity(model)
    images = _pil(np.concatenate(tests), round_trip)
    prompts = [s.instance_prompt for s in SUBJECTS for _ in range(sizes.per_subject)] * 2
    scores = np.stack([metric.score(images, prompts, refs) for refs in reference_sets], axis=1)
    truth = np.repeat(np.arange(len(reference_sets)), sizes.per_subject)
    correct = scores.argmax(axis=1) == truth
    half = len(SUBJECTS) * sizes.per_subject
    subject_refs = truth % len(SUBJECTS)  # each image's subject: itself, or the one it looks like
    own = scores[np.arange(len(truth)), subject_refs]
    return {
        "n": len(truth),
        "reference_sets": len(reference_sets),
        "accuracy": float(correct.mean()),
        "subject_images": float(correct[:half].mean()),
        "plain_images": float(correct[half:].mean()),
        "toy_subject_same_subject": float(own[:half].mean()),
        "toy_subject_plain_look_alike": float(own[half:].mean()),
    }


def validate(
    model: WorldModel,
    seed: int = 1,
    sizes: ValidationSizes = ValidationSizes(),
    round_trip: RoundTrip | None = None,
) -> dict[str, Any]:
    """Accuracies on fresh renders from ``seed`` (optionally after ``round_trip``) and whether all pass."""
    base = [ToyWorldDataset(seed, sizes.base).describe(i)[0] for i in range(sizes.base)]
    rng = np.random.default_rng([seed, zlib.crc32(b"held-out")])
    held_out = [
        sample_scene(rng, cls=cls, colour=colour, background=background)
        for cls, colour, background in HELD_OUT_COMBINATIONS
        for _ in range(sizes.per_held_out)
    ]
    subjects = [s.scene for subject in SUBJECTS for s in subject_set(subject, sizes.per_subject, seed)]
    figures: dict[str, Any] = {
        "base": _attribute_accuracy(model, base, round_trip),
        "held_out_combinations": _attribute_accuracy(model, held_out, round_trip),
        "subjects": _attribute_accuracy(model, subjects, round_trip),
        "identification": _identification(model, seed, sizes, round_trip),
    }
    accuracies = [
        value
        for part in figures.values()
        for key, value in part.items()
        if key in {"class", "colour", "background", "accuracy"}
    ]
    figures["minimum"] = min(accuracies)
    figures["passed"] = figures["minimum"] >= THRESHOLD
    return figures


def validation_report(
    model: WorldModel, seed: int, sizes: ValidationSizes, vae: Path | None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Clean, simulated round trip (provisional) and, where a VAE is given, VAE round trip figures."""
    report: dict[str, Any] = {"seed": seed, "threshold": THRESHOLD, "sizes": dataclasses.asdict(sizes)}
    conditions: list[tuple[str, RoundTrip | None, str]] = [
        ("clean", None, "renders as drawn"),
        (
            "simulated_round_trip",
            simulated_round_trip,
            "PROVISIONAL stand-in for a VAE round trip: 4x area down-sampling then bilinear up-sampling",
        ),
    ]
    if vae is not None:
        conditions.append(("vae_round_trip", vae_round_trip(vae), f"encode/decode with the VAE in {vae}"))
    for name, round_trip, description in conditions:
        start = time.perf_counter()
        report[name] = {"description": description, **validate(model, seed, sizes, round_trip)}
        log(f"{name}: minimum accuracy {report[name]['minimum']:.3f} ({time.perf_counter() - start:.0f} s)")
    report["passed"] = all(
        report[name]["passed"] for name, _, _ in conditions if name != "simulated_round_trip"
    )
    return report


# ------------------------------------------------------------------------------------------------- CLI


def _default_vae(given: Path | None) -> Path | None:
    if given is not None:
        return given
    return DEFAULT_VAE if DEFAULT_VAE.is_dir() else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dreamblend.toyworld.train_metrics", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", nargs="?", choices=("train", "validate"), default="train")
    parser.add_argument(
        "--out", type=Path, help="train: folder for model.safetensors, config.json, training.json"
    )
    parser.add_argument(
        "--weights", type=Path, default=DEFAULT_WEIGHTS, help="validate: the encoder to check"
    )
    parser.add_argument(
        "--vae", type=Path, help=f"AutoencoderKL folder for round trips (default {DEFAULT_VAE})"
    )
    parser.add_argument("--seed", type=int, help="train: 0; validate: 1 (renders training never saw)")
    parser.add_argument("--steps", type=int, default=TrainingConfig.steps, help="train: optimizer steps")
    parser.add_argument("--json", type=Path, help="validate: also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    vae = _default_vae(args.vae)
    sizes = ValidationSizes()
    if args.command == "validate":
        seed = 1 if args.seed is None else args.seed
        report = validation_report(WorldModel.from_folder(args.weights), seed, sizes, vae)
        text = json.dumps(report, indent=2)
        print(text)
        if args.json is not None:
            args.json.write_text(text + "\n")
        return 0 if report["passed"] else 1
    if args.out is None:
        parser.error("train needs --out FOLDER")
    config = TrainingConfig(seed=0 if args.seed is None else args.seed, steps=args.steps)
    encoder, record = train(config)
    encoder.save(args.out)
    validation_seed = config.seed + 1
    report = validation_report(WorldModel(encoder), validation_seed, sizes, vae)
    digest = hashlib.sha256((args.out / "model.safetensors").read_bytes()).hexdigest()
    record = {
        "command": f"python -m dreamblend.toyworld.train_metrics --out {args.out} --seed {config.seed} "
        f"--steps {config.steps}",
        **record,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "model_sha256": digest,
        "validation": report,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"wrote {args.out}; validation {'passed' if report['passed'] else 'FAILED'} (minimum clean "
        f"accuracy {report['clean']['minimum']:.3f})"
    )
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
