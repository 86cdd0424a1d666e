"""The web app's run logic: load a G/E pair, run one blend with its word maps and scores, sweep alpha,
and stop a run between steps. No Gradio here, so it is tested without a browser.

One :class:`BlendSession` serves the page. It keeps the last loaded pair (changing G or E reloads),
runs one sampling job at a time, and checks a per-run stop flag after every denoising step: Stop
ends the run with :class:`Stopped` at the next step, leaving the pipeline as it was.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamblend.analysis.maps import WordMaps, blend_word_maps, normalize_per_word, overlay
from dreamblend.tokens import prompt_words, word_positions
from dreamblend.ui.settings import (
    AppConfig,
    BlendSettings,
    SettingsError,
    check_pair,
    check_settings,
    generate_command,
)

Progress = Callable[[int, int], None]
"""``progress(done, total)`` in denoising steps, called after each of E's steps."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class Stopped(Exception):
    """The user pressed Stop; raised from the step callback so sampling ends at the next step."""


@dataclass(frozen=True)
class BlendResult:
    """G's image, E alone and DreamBlend with their word maps (rows in that order), scores, command."""

    rows: list[WordMaps]
    scores: dict[str, dict[str, float]]
    score_note: str
    command: str
    seconds: float

    def image(self, label: str) -> np.ndarray:
        return next(row.image for row in self.rows if row.label == label)


def map_tiles(rows: Sequence[WordMaps], size: int = 192) -> list[tuple[np.ndarray, str]]:
    """Each row's per-word maps laid over its image (upscaled to ``size``), captioned "row: word".

    Maps are normalized per word, as in ``dreamblend maps``, so each shows where that word looks.
    """
    from matplotlib import colormaps

    colormap = colormaps["jet"]
    tiles = []
    for row in rows:
        image = np.asarray(Image.fromarray(row.image).resize((size, size), Image.Resampling.BICUBIC))
        heat = normalize_per_word(row.maps)
        for word, word_heat in zip(row.words, heat, strict=True):
            tile = (overlay(image, word_heat, colormap) * 255).round().astype(np.uint8)
            tiles.append((tile, f"{row.label}: {word}"))
    return tiles


def _references(config: AppConfig) -> list[Image.Image]:
    """The subject photos the metrics compare with: the shipped subject's, or the user's folder."""
    if config.subject_folder is not None:
        from dreamblend.toyworld.shipped import shipped_subject

        return shipped_subject(config.subject_folder).references()
    if config.reference_dir is not None:
        files = sorted(p for p in config.reference_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [Image.open(p).convert("RGB") for p in files]
    return []


class BlendSession:
    """Runs the page's requests against one base model, keeping the last loaded G/E pair."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._pair: tuple[tuple[str | None, str | None], Any, dict[str, Any]] | None = None
        self._stop: threading.Event | None = None
        self._metrics: list[Any] | None = None
        self._references: list[Image.Image] | None = None
        self._tokenizer: Any = None  # kept apart from the pair: the page reads it while a run reloads

    # ------------------------------------------------------------------------------------------ models

    def pipeline(self, guidance: str | None, edit: str | None) -> tuple[Any, dict[str, Any]]:
        """The DreamBlend pipeline for G and E (loaded on first use, reused while they stay the same)."""
        from dreamblend.checkpoints import ModelSpec, load_dreamblend

        key = (guidance, edit)
        if self._pair is None or self._pair[0] != key:
            check_pair(self.config, guidance, edit)
            self._pair = None  # free the previous pair before loading the next
            try:
                pipe, roles = load_dreamblend(
                    self.config.model,
                    ModelSpec(guidance),
                    ModelSpec(edit),
                    device=self.config.device,
                    torch_dtype=getattr(torch, self.config.dtype),
                    allow_pickle=self.config.allow_pickle,
                )
            except RuntimeError as exc:  # torch's state-dict size mismatches: weights of another model
                lines = str(exc).strip().splitlines()
                detail = " ".join(line.strip() for line in lines[:2]) + (" ..." if len(lines) > 2 else "")
                raise SettingsError(
                    f"G ({guidance or 'base'}) and E ({edit or 'base'}) do not fit the base model "
                    f"{self.config.model}: {detail}; pick checkpoints fine-tuned from this base model"
                ) from exc
            pipe.set_progress_bar_config(disable=True)
            self._pair, self._tokenizer = (key, pipe, roles), pipe.tokenizer
        return self._pair[1], self._pair[2]

    def tokenizer(self) -> Any:
        """The last loaded pair's tokenizer (the default pair is loaded if none was)."""
        if self._tokenizer is None:
            self.pipeline(self.config.defaults.guidance, self.config.defaults.edit)
        return self._tokenizer

    def words(self, prompt: str) -> list[str]:
        """The prompt's words as the text encoder splits them (each once), for the map chooser."""
        seen: dict[str, None] = {}
        for word in prompt_words(self.tokenizer(), prompt):
            seen.setdefault(word.text, None)
        return list(seen)

    # ------------------------------------------------------------------------------------------ runs

    def stop(self) -> bool:
        """Ask the running job to end at its next step; False when nothing is running."""
        stop = self._stop
        if stop is None:
            return False
        stop.set()
        return True

    def _callback(self, stop: threading.Event, progress: Progress | None, total: int) -> Callable:
        done = 0

        def on_step(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            nonlocal done
            if stop.is_set():
                raise Stopped
            done += 1
            if progress is not None:
                progress(done, total)
            return {}

        return on_step

    @staticmethod
    def _call_kwargs(settings: BlendSettings, roles: dict[str, Any]) -> dict[str, Any]:
        """The pipeline arguments a run and a sweep share (the same ones ``dreamblend generate`` passes)."""
        return {
            "negative_prompt": settings.negative_prompt or None,
            "num_inference_steps": settings.steps,
            "guidance_scale": settings.cfg,
            "guidance_steps": settings.guidance_steps,
            **roles,
        }

    def _prepare(self, settings: BlendSettings) -> tuple[Any, dict[str, Any], BlendSettings]:
        pipe, roles = self.pipeline(settings.guidance, settings.edit)
        return pipe, roles, check_settings(settings, pipe.tokenizer)

    def _job(self, run: Callable[[threading.Event], Any]) -> Any:
        """One sampling job at a time, with its own stop flag (a Stop meant for an old run is forgotten)."""
        with self._lock:
            stop = threading.Event()
            self._stop = stop
            try:
                return run(stop)
            finally:
                self._stop = None

    def blend(self, settings: BlendSettings, progress: Progress | None = None) -> BlendResult:
        """G, E alone and DreamBlend from one seed, their maps for ``settings.words``, and scores."""

        def run(stop: threading.Event) -> BlendResult:
            start = time.perf_counter()
            pipe, roles, checked = self._prepare(settings)
            words = list(checked.words) or self.words(checked.prompt)
            for word in words:  # a word the prompt lacks fails now, not after sampling
                word_positions(pipe.tokenizer, checked.prompt, word)
            rows = blend_word_maps(
                pipe,
                checked.prompt,
                words,
                seed=checked.seed,
                resolution=self.config.map_resolution,
                cross_attention_guidance_scale=checked.alpha,
                callback_on_step_end=self._callback(stop, progress, 2 * checked.steps),
                **self._call_kwargs(checked, roles),
            )
            scores, note = self.score(rows, checked.prompt)
            command = generate_command(self.config, checked)
            return BlendResult(rows, scores, note, command, time.perf_counter() - start)

        return self._job(run)

    def sweep(
        self, settings: BlendSettings, alphas: Sequence[float], progress: Progress | None = None
    ) -> list[tuple[float, np.ndarray]]:
        """DreamBlend images for each alpha from one seed (alpha 0 is E alone), to choose by eye."""

        def run(stop: threading.Event) -> list[tuple[float, np.ndarray]]:
            pipe, roles, checked = self._prepare(settings)
            callback = self._callback(stop, progress, len(alphas) * checked.steps)
            images = []
            for alpha in alphas:
                out = pipe(
                    checked.prompt,
                    cross_attention_guidance_scale=alpha,
                    generator=torch.Generator().manual_seed(checked.seed),
                    output_type="np",
                    callback_on_step_end=callback,
                    **self._call_kwargs(checked, roles),
                )
                images.append((alpha, (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)))
            return images

        return self._job(run)

    # ------------------------------------------------------------------------------------------ scores

    def score(self, rows: Sequence[WordMaps], prompt: str) -> tuple[dict[str, dict[str, float]], str]:
        """``{metric: {row label: score}}`` and a note; empty with the reason when metrics are unavailable."""
        if not self.config.metrics:
            return {}, "no metrics configured (start the app with --metrics NAME ... --references DIR)"
        try:
            if self._metrics is None:
                from dreamblend.metrics import build_metrics

                self._references = _references(self.config)
                self._metrics = build_metrics(list(self.config.metrics), device=self.config.device)
            images = [Image.fromarray(row.image) for row in rows]
            scores: dict[str, dict[str, float]] = {}
            for metric in self._metrics:
                values = metric.score(images, [prompt] * len(images), self._references or [])
                scores[metric.name] = {row.label: float(v) for row, v in zip(rows, values, strict=True)}
        except (ValueError, OSError) as exc:  # e.g. a prompt outside the toy grammar, an offline hub model
            return {}, f"scores unavailable: {exc}"
        return scores, ""


def check_references(folder: Path | None) -> None:
    """A reference folder must hold subject photos; said at start-up, not at the first score."""
    if folder is None:
        return
    if not folder.is_dir() or not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
        raise SettingsError(
            f"--references {folder} is not a folder of subject photos ({', '.join(IMAGE_SUFFIXES)})"
        )
