"""Attention collapse over a fine-tuning trajectory, and the G/E checkpoints it suggests.

Late checkpoints pull every word's attention onto the subject (the paper's "catastrophic attention
collapse", Fig. 3). For one sampled image, the **collapse score** of a checkpoint is the share of each
context word's attention that falls on the subject region, averaged over the context words (and over
prompts and seeds). The subject region is where the subject token's own map is above its mean, or its
``top`` fraction of cells; a word that attends uniformly scores the region's share of the image.
Maps are those of :mod:`dreamblend.analysis.maps` (head mean, all steps, one map size).

**Suggestion rule** (:func:`suggest_checkpoints`). With scores ``c_0..c_n`` in step order, the rise
is measured from the first point: ``level_k = (c_k - c_0) / (max c - c_0)``.

- **E** is the first checkpoint whose level reaches ``saturation`` (0.9): collapse has (nearly) stopped
  growing, so E knows the subject as well as training will teach it, and later checkpoints are only
  more overfit.
- **G** is the latest checkpoint before E whose level, and that of every point before it, stays at or
  below ``guidance_level`` (0.25): the last point before collapse sets in, where the prompt still rules.
- When the scores rise by less than ``min_rise`` (absolute) there is no collapse to read: E is the last
  checkpoint, G the first point, and the reason says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dreamblend.analysis.figures import new_figure, save_png
from dreamblend.analysis.maps import checkpoint_word_maps, load_plain_pipeline
from dreamblend.tokens import prompt_words, word_positions

# Words whose attention says nothing about the scene; left out of the default context words.
FUNCTION_WORDS = frozenset("a an the of in on at with and to for from by is it its".split())
FIG3_PROMPT = "a {token} {class} on a cobblestone street"  # the paper's Fig. 3 prompt


def subject_region(subject_map: Tensor, top: float | None = None) -> Tensor:
    """Boolean cells of the subject: above the map's mean, or (``top`` in (0, 1)) its ``top`` fraction of
    cells with the highest attention (cells tied with the last one chosen are included)."""
    if top is None:
        return subject_map > subject_map.mean()
    if not 0 < top < 1:
        raise ValueError(f"top must be a fraction of the cells in (0, 1), got {top!r}")
    count = max(1, round(top * subject_map.numel()))
    return subject_map >= subject_map.flatten().topk(count).values[-1]


def attention_on_subject(word_maps: Tensor, region: Tensor) -> Tensor:
    """``(W,)``: the share of each word's attention (``word_maps``: ``(W, rows, columns)``) in ``region``."""
    mass = word_maps.clamp_min(0).flatten(1)
    return mass[:, region.flatten()].sum(dim=1) / mass.sum(dim=1).clamp_min(1e-12)


@dataclass(frozen=True)
class CollapsePoint:
    """One checkpoint's collapse: the mean ``score``, per context word, and the region's image share."""

    step: int
    path: Path | None  # None: the base model
    score: float
    words: dict[str, float]
    region: float

    @property
    def name(self) -> str:
        return "base model" if self.path is None else self.path.name


def context_words(tokenizer: Any, prompt: str, exclude: Sequence[str]) -> list[str]:
    """The prompt's content words: no function words, punctuation, or words in ``exclude``."""
    skip = FUNCTION_WORDS | {w.lower() for w in exclude}
    words = [w.text for w in prompt_words(tokenizer, prompt)]
    return list(dict.fromkeys(w for w in words if any(c.isalnum() for c in w) and w.lower() not in skip))


def _has_word(tokenizer: Any, prompt: str, word: str) -> bool:
    try:
        word_positions(tokenizer, prompt, word)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class _Plan:
    prompt: str
    subject: tuple[str, ...]
    context: tuple[str, ...]


def _plans(
    tokenizer: Any,
    prompts: Sequence[str],
    token: str,
    class_word: str,
    subject_words: Sequence[str] | None,
    words: Sequence[str] | None,
) -> list[_Plan]:
    plans = []
    for prompt in prompts:
        subject = tuple(subject_words or [token])
        if subject_words is None and not _has_word(tokenizer, prompt, token):
            raise ValueError(
                f"prompt {prompt!r} lacks the trajectory's subject token {token!r}; put it in the prompt "
                "or name the subject's words (--subject)"
            )
        context = tuple(words) if words else tuple(context_words(tokenizer, prompt, [*subject, class_word]))
        if not context:
            raise ValueError(
                f"prompt {prompt!r} has no context word besides the subject; use a prompt with a setting, "
                f"e.g. {FIG3_PROMPT.format(token=token, **{'class': class_word})!r}"
            )
        plans.append(_Plan(prompt, subject, context))
    return plans


def _checkpoint_collapse(
    pipe: Any, plans: Sequence[_Plan], seeds: Sequence[int], top: float | None, **map_kwargs: Any
) -> tuple[float, dict[str, float], float]:
    """Mean score, per-word scores and mean region share of one pipeline over prompts and seeds."""
    per_word: dict[str, list[float]] = {}
    regions = []
    for plan in plans:
        for seed in seeds:
            words = [*plan.subject, *plan.context]
            maps = checkpoint_word_maps(pipe, plan.prompt, words, seed=seed, **map_kwargs).maps
            region = subject_region(maps[: len(plan.subject)].mean(dim=0), top)
            shares = attention_on_subject(maps[len(plan.subject) :], region)
            regions.append(float(region.float().mean()))
            for word, share in zip(plan.context, shares.tolist(), strict=True):
                per_word.setdefault(word, []).append(share)
    every = [s for shares in per_word.values() for s in shares]
    mean_words = {w: sum(s) / len(s) for w, s in per_word.items()}
    return sum(every) / len(every), mean_words, sum(regions) / len(regions)


def trajectory_collapse(
    trajectory: str | Path,
    prompts: Sequence[str] | None = None,
    *,
    subject_words: Sequence[str] | None = None,
    words: Sequence[str] | None = None,
    base_model: str | Path | None = None,
    include_base: bool = True,
    seeds: Sequence[int] = (0,),
    top: float | None = None,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    report: Callable[[CollapsePoint], None] | None = None,
    **map_kwargs: Any,
) -> list[CollapsePoint]:
    """The collapse score of every checkpoint of a ``dreamblend train`` run (and the base model), by step.

    ``prompts`` default to the paper's Fig. 3 prompt with the run's token and class. ``subject_words``
    (default: the run's token) define the subject region; ``words`` are the context words scored
    (default: the prompt's content words other than the subject and class). ``map_kwargs`` go to
    :func:`~dreamblend.analysis.maps.checkpoint_word_maps` (``num_inference_steps``, ``guidance_scale``,
    ``resolution``, ...). ``report`` sees each point as it is measured.
    """
    from dreamblend.training.trajectory import read_trajectory

    checkpoints = read_trajectory(trajectory)
    if not checkpoints:
        raise ValueError(f"the trajectory {trajectory} lists no checkpoints")
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed")
    first = checkpoints[0]
    prompts = list(prompts or [FIG3_PROMPT.format(token=first.token, **{"class": first.class_word})])
    base = base_model or first.base_model
    targets: list[tuple[int, Path | None]] = [(c.step, c.path) for c in checkpoints]
    if include_base:
        targets.append((0, None))  # measured last: a learned token exists only in the trained checkpoints
    plans: list[_Plan] | None = None
    points = []
    for step, path in targets:
        pipe = load_plain_pipeline(
            path or base, base_model=base, torch_dtype=torch_dtype, allow_pickle=allow_pickle
        )
        pipe.set_progress_bar_config(disable=True)
        if device is not None:
            pipe.to(device)
        if plans is None:
            plans = _plans(pipe.tokenizer, prompts, first.token, first.class_word, subject_words, words)
        score, per_word, region = _checkpoint_collapse(pipe, plans, seeds, top, **map_kwargs)
        point = CollapsePoint(step, path, score, per_word, region)
        if report is not None:
            report(point)
        points.append(point)
        del pipe
    return sorted(points, key=lambda p: p.step)


@dataclass(frozen=True)
class Suggestion:
    """The proposed guidance (G) and edit (E) points, why, and every point's collapse level."""

    guidance: CollapsePoint
    edit: CollapsePoint
    why_guidance: str
    why_edit: str
    levels: tuple[float, ...]


def suggest_checkpoints(
    points: Sequence[CollapsePoint],
    *,
    guidance_level: float = 0.25,
    saturation: float = 0.9,
    min_rise: float = 0.02,
) -> Suggestion:
    """G and E from a trajectory's collapse scores by the rule in the module docstring."""
    if len(points) < 2:
        raise ValueError("a suggestion needs at least two points (checkpoints, or one and the base model)")
    if not 0 <= guidance_level < saturation <= 1:
        raise ValueError(f"need 0 <= guidance_level < saturation <= 1, got {guidance_level} and {saturation}")
    points = sorted(points, key=lambda p: p.step)
    scores = [p.score for p in points]
    rise = max(scores) - scores[0]
    if rise < min_rise:
        levels = tuple(0.0 for _ in points)
        flat = (
            f"collapse rises by {rise:.3f} < {min_rise} over the trajectory (scores {min(scores):.3f} to "
            f"{max(scores):.3f}): no collapse to read; train longer, or score a prompt with a setting"
        )
        return Suggestion(
            points[0], points[-1], f"the first point; {flat}", f"the last checkpoint; {flat}", levels
        )
    levels = tuple((s - scores[0]) / rise for s in scores)
    e = next(k for k, level in enumerate(levels) if level >= saturation)
    g = 0
    for k in range(e):
        if levels[k] > guidance_level:
            break
        g = k
    why_edit = (
        f"collapse reaches {levels[e]:.0%} of its rise here (score {scores[e]:.3f}; saturation at "
        f"{saturation:.0%}): it knows the subject, and later checkpoints are only more collapsed"
    )
    why_guidance = (
        f"the latest point before E whose collapse stays within {guidance_level:.0%} of the rise "
        f"(level {levels[g]:.0%}, score {scores[g]:.3f}): context words still attend to the scene"
    )
    return Suggestion(points[g], points[e], why_guidance, why_edit, levels)


def plot_collapse(
    points: Sequence[CollapsePoint],
    path: str | Path,
    *,
    suggestion: Suggestion | None = None,
    title: str | None = None,
) -> Path:
    """Collapse score over training steps (mean and per word), the uniform baseline, and G/E if given."""
    if not points:
        raise ValueError("no collapse points to plot")
    points = sorted(points, key=lambda p: p.step)
    steps = [p.step for p in points]
    figure = new_figure(6.4, 4.4)
    ax = figure.add_subplot()
    for word in dict.fromkeys(w for p in points for w in p.words):
        ax.plot(
            steps, [p.words.get(word, float("nan")) for p in points], linewidth=0.8, alpha=0.6, label=word
        )
    ax.plot(steps, [p.score for p in points], "k-o", linewidth=2, markersize=4, label="collapse (mean)")
    ax.plot(steps, [p.region for p in points], "k:", linewidth=1, label="subject region's share (uniform)")
    if suggestion is not None:
        for point, name, color in (
            (suggestion.guidance, "G", "tab:green"),
            (suggestion.edit, "E", "tab:red"),
        ):
            ax.axvline(point.step, color=color, linestyle="--", linewidth=1, label=f"{name}: {point.name}")
    ax.set_xlabel("fine-tuning step (0: base model)")
    ax.set_ylabel("attention on the subject region")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    return save_png(figure, path)
