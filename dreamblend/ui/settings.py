"""What the web app runs with: the models it was started on, one run's settings, their checks, and the
equivalent ``dreamblend generate`` command line.

Everything here is plain Python (no Gradio, no model loading), so the checks and the command line are
unit-tested directly and the page only shows what they return.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dreamblend.training.trajectory import MANIFEST_FILE, TRAJECTORY_FILE, read_checkpoint, read_trajectory

MAX_STEPS = 1000  # DDPM-trained schedulers have 1000 timesteps; more DDIM steps than that do not exist


class SettingsError(ValueError):
    """A problem with the page's inputs, worded for the page: what is wrong and how to fix it."""


@dataclass(frozen=True)
class BlendSettings:
    """One run as the page sets it up; ``guided_fraction`` guides the first part of the steps (1: all)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 50
    cfg: float = 3.0
    alpha: float = 0.1
    guided_fraction: float = 1.0
    guidance: str | None = None
    edit: str | None = None
    words: tuple[str, ...] = ()

    @property
    def guidance_steps(self) -> tuple[float, float] | None:
        """The pipeline's ``guidance_steps`` (a fraction range), None when every step is guided."""
        return None if self.guided_fraction >= 1.0 else (0.0, float(self.guided_fraction))


@dataclass(frozen=True)
class Choice:
    """A checkpoint the page offers for G or E: a label and the path handed to the loader."""

    label: str
    path: str


@dataclass(frozen=True)
class AppConfig:
    """The app's fixed setup: base model, runtime, the checkpoints to offer, metrics and defaults.

    ``subject_folder`` is a shipped toy-world subject whose instance photos are the metrics'
    references; ``reference_dir`` a folder of the user's subject photos. ``map_resolution`` is the map
    size the per-word maps average (None: a quarter of the latent size, as ``dreamblend maps``).
    """

    model: str
    defaults: BlendSettings
    choices: tuple[Choice, ...] = ()
    device: str = "cpu"
    dtype: str = "float32"
    metrics: tuple[str, ...] = ()
    subject_folder: Path | None = None
    reference_dir: Path | None = None
    map_resolution: int | None = None
    allow_pickle: bool = False
    title: str = ""


def trajectory_choices(folder: str | Path) -> list[Choice]:
    """Every checkpoint of a training run (its ``trajectory.json``), labelled by step and kind."""
    return [
        Choice(f"step {info.step} ({info.method} {info.mode})", str(info.path.resolve()))
        for info in sorted(read_trajectory(folder), key=lambda info: info.step)
    ]


def trajectory_of(checkpoint: str | Path | None) -> Path | None:
    """The run folder holding ``checkpoint`` (a ``checkpoint-STEP`` folder beside a ``trajectory.json``)."""
    if checkpoint is None:
        return None
    parent = Path(checkpoint).parent
    return parent if (parent / TRAJECTORY_FILE).is_file() else None


def _check_checkpoint(role: str, path: str | None) -> None:
    if path is None:
        return
    if not Path(path).exists():
        raise SettingsError(
            f"{role} checkpoint {path!r} does not exist; pick one from the list or give an existing "
            "checkpoint folder, diffusers folder or LoRA .safetensors file"
        )


def _base_of(path: str | None) -> str | None:
    """The base model a ``dreamblend train`` checkpoint folder was trained from (None for other kinds)."""
    if path is None or not (Path(path) / MANIFEST_FILE).is_file():
        return None
    return read_checkpoint(path).base_model


def _same_base(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve() if Path(a).exists() and Path(b).exists() else a == b


def check_pair(config: AppConfig, guidance: str | None, edit: str | None) -> None:
    """G and E must exist and, where their manifests say, come from one base model: the app's."""
    _check_checkpoint("G (guidance)", guidance)
    _check_checkpoint("E (edit)", edit)
    if guidance is not None and edit is not None and Path(guidance).resolve() == Path(edit).resolve():
        raise SettingsError("G and E are the same checkpoint; pick an early one for G and a late one for E")
    bases = {"G": _base_of(guidance), "E": _base_of(edit)}
    if bases["G"] and bases["E"] and not _same_base(bases["G"], bases["E"]):
        raise SettingsError(
            f"G was trained from {bases['G']} but E from {bases['E']}; G and E must be checkpoints of "
            "one base model (pick both from the same training run)"
        )
    for role, base in bases.items():
        if base and not _same_base(base, config.model):
            raise SettingsError(
                f"{role} was trained from {base}, but the app runs {config.model}; pick checkpoints of "
                f"this base model, or restart with: dreamblend ui --model {shlex.quote(base)}"
            )


def _number(name: str, value: Any, *, low: float, high: float = math.inf) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or not low <= number <= high:
        bound = f"between {low:g} and {high:g}" if math.isfinite(high) else f"at least {low:g}"
        raise SettingsError(f"{name} must be {bound}, got {value!r}")
    return number


def _integer(name: str, value: Any, *, low: int, high: int) -> int:
    number = _number(name, value, low=low, high=high)
    if number != int(number):
        raise SettingsError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def check_numbers(settings: BlendSettings) -> BlendSettings:
    """Seed, steps, CFG, alpha and the guided fraction, range-checked and typed (the page sends floats)."""
    return replace(
        settings,
        seed=_integer("seed", settings.seed, low=0, high=2**63 - 1),
        steps=_integer("steps", settings.steps, low=1, high=MAX_STEPS),
        cfg=_number("CFG", settings.cfg, low=0.0),
        alpha=_number("alpha", settings.alpha, low=0.0),
        guided_fraction=_number("guided steps", settings.guided_fraction, low=0.0, high=1.0),
    )


def check_prompt(tokenizer: Any, prompt: str, what: str = "prompt") -> None:
    """The text encoder reads ``model_max_length`` tokens (77 for CLIP) including start and end."""
    limit = tokenizer.model_max_length
    count = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
    if count > limit:
        raise SettingsError(
            f"the {what} is {count} tokens long, but the model reads at most {limit} (start and end tokens "
            f"included); shorten it by {count - limit} tokens"
        )


def check_settings(settings: BlendSettings, tokenizer: Any) -> BlendSettings:
    """Everything about one run that can be checked once the tokenizer is known."""
    if not settings.prompt.strip():
        raise SettingsError("the prompt is empty; describe the image, e.g. 'a sks dog on the beach'")
    check_prompt(tokenizer, settings.prompt)
    if settings.negative_prompt:
        check_prompt(tokenizer, settings.negative_prompt, "negative prompt")
    return check_numbers(settings)


def parse_alphas(text: str) -> list[float]:
    """The sweep's alphas from ``"0, 0.05, 0.1"`` (commas or spaces), each checked like the run's alpha."""
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise SettingsError("give the sweep's alphas, e.g. 0, 0.05, 0.1, 0.2")
    if len(parts) > 12:
        raise SettingsError(f"{len(parts)} alphas: the sweep runs one blend each; give at most 12")
    return [_number("every alpha of the sweep", p, low=0.0) for p in parts]


def generate_argv(config: AppConfig, settings: BlendSettings, out: str = "dreamblend.png") -> list[str]:
    """The ``dreamblend generate`` arguments that sample the same DreamBlend image (and G's, as
    ``*_reference.png``). Floats are written with ``repr`` so they parse back to the same value."""
    argv = [settings.prompt, "--model", config.model]
    if settings.guidance:
        argv += ["--guidance-model", settings.guidance]
    if settings.edit:
        argv += ["--edit-model", settings.edit]
    if settings.negative_prompt:
        argv += ["--negative-prompt", settings.negative_prompt]
    argv += [
        "--seed", str(settings.seed),
        "--steps", str(settings.steps),
        "--cfg", repr(float(settings.cfg)),
        "--alpha", repr(float(settings.alpha)),
    ]  # fmt: skip
    if settings.guidance_steps is not None:
        argv += ["--guidance-steps", f"0:{settings.guidance_steps[1]!r}"]
    argv += ["--device", config.device, "--dtype", config.dtype, "--out", out, "--save-reference"]
    if config.allow_pickle:
        argv.append("--allow-pickle")
    return ["generate", *argv]


def generate_command(config: AppConfig, settings: BlendSettings, out: str = "dreamblend.png") -> str:
    """:func:`generate_argv` as one shell line."""
    return shlex.join(["dreamblend", *generate_argv(config, settings, out)])


def default_words(words: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """The ``wanted`` words that the prompt still has, in the prompt's order."""
    return [w for w in words if w in set(wanted)]


TOY_STEPS = 15  # as `dreamblend demo`: the toy model draws well at 15 DDIM steps


def toy_config(device: str = "cpu", dtype: str = "float32", subject: str | Path | None = None) -> AppConfig:
    """The default app: the shipped toy-world model and subject (offline, CPU), its G/E, metrics and maps."""
    from dreamblend.commands.demo import MAP_RESOLUTION, METRICS, _words
    from dreamblend.toyworld.model import base_model_path
    from dreamblend.toyworld.shipped import shipped_subject
    from dreamblend.toyworld.subjects import evaluation_prompts
    from dreamblend.toyworld.vocab import SUBJECT_TOKEN, parse_caption

    shipped = shipped_subject(subject)
    record = shipped.record
    setting = record["demo_settings"][0]
    prompt = next(p for p in evaluation_prompts(shipped.subject) if parse_caption(p).background == setting)
    defaults = BlendSettings(
        prompt=prompt,
        steps=TOY_STEPS,
        cfg=record["cfg"],
        alpha=record["alpha"],
        guidance=str(shipped.guidance.resolve()),
        edit=str(shipped.edit.resolve()),
        words=tuple(_words(prompt, SUBJECT_TOKEN, shipped.subject.cls)),
    )
    return AppConfig(
        model=str(base_model_path().resolve()),
        defaults=defaults,
        choices=tuple(trajectory_choices(shipped.folder)),
        device=device,
        dtype=dtype,
        metrics=METRICS,
        subject_folder=shipped.folder,
        map_resolution=MAP_RESOLUTION,
        title=(
            f"toy-world model, shipped subject '{shipped.subject.name}' "
            f"({SUBJECT_TOKEN} {shipped.subject.cls}): G = LoRA step {record['guidance_step']}, "
            f"E = LoRA step {record['edit_step']}"
        ),
    )
