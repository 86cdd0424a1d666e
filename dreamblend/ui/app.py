"""The Gradio page of ``dreamblend ui``: inputs, the three images, word maps, scores, the alpha sweep.

Only layout and wiring live here; every decision (checks, loading, sampling, the command line) is in
:mod:`dreamblend.ui.settings` and :mod:`dreamblend.ui.session`. Handlers never raise: problems and
stops are written into the status line, so the page stays usable after any of them.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
from PIL import Image

from dreamblend.ui.session import BlendResult, BlendSession, Stopped, map_tiles
from dreamblend.ui.settings import BlendSettings, SettingsError, parse_alphas

# A local, offline app: no usage reports to Gradio's servers.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402 - after the environment switch above

logger = logging.getLogger(__name__)

ROW_LABELS = ("G (guidance)", "E alone", "DreamBlend")
DISPLAY_SIZE = 256  # small model outputs (the toy world's 64 px) are enlarged by whole pixels to this
DEFAULT_SWEEP = "0, 0.05, 0.1, 0.2, 0.4"


def _escape(text: str) -> str:
    """Markdown-safe text (paths hold underscores and asterisks)."""
    return "".join("\\" + c if c in "\\`*_[]<>#|" else c for c in text)


def error_status(exc: BaseException) -> str:
    if isinstance(exc, Stopped):
        return "**Stopped.** Nothing was changed; the page is ready for the next run."
    if not isinstance(exc, (SettingsError, ValueError, FileNotFoundError, OSError)):
        logger.exception("dreamblend ui: unexpected error", exc_info=exc)
    return f"**Error:** {_escape(str(exc) or type(exc).__name__)}"


def display(image: np.ndarray) -> np.ndarray:
    """An image enlarged by a whole factor (nearest pixel) so small outputs are visible, not resampled."""
    factor = math.ceil(DISPLAY_SIZE / min(image.shape[:2]))
    if factor <= 1:
        return image
    size = (image.shape[1] * factor, image.shape[0] * factor)
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.NEAREST))


def score_table(result: BlendResult) -> str:
    """The scores as a Markdown table, one row per metric, or the reason there are none."""
    if not result.scores:
        return f"*{_escape(result.score_note)}*"
    lines = ["| metric | " + " | ".join(ROW_LABELS) + " |", "|---" * (len(ROW_LABELS) + 1) + "|"]
    for name, values in result.scores.items():
        cells = [f"{values[label]:.3f}" if np.isfinite(values[label]) else "n/a" for label in ROW_LABELS]
        lines.append(f"| {_escape(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_app(session: BlendSession) -> gr.Blocks:
    """The page for ``session``'s models (not launched)."""
    config, d = session.config, session.config.defaults
    choices = [(c.label, c.path) for c in config.choices]
    with gr.Blocks(title="DreamBlend") as app:
        gr.Markdown(f"# DreamBlend\n{_escape(config.title or config.model)}")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", value=d.prompt, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", value=d.negative_prompt, elem_id="negative")
                guidance = gr.Dropdown(
                    choices,
                    value=d.guidance,
                    label="G: guidance checkpoint (early, keeps the prompt); or type a path",
                    allow_custom_value=True,
                    elem_id="guidance",
                )
                edit = gr.Dropdown(
                    choices,
                    value=d.edit,
                    label="E: edit checkpoint (late, knows the subject); or type a path",
                    allow_custom_value=True,
                    elem_id="edit",
                )
                words = gr.CheckboxGroup(
                    session.words(d.prompt), value=list(d.words), label="Words to map", elem_id="words"
                )
                with gr.Row():
                    seed = gr.Number(d.seed, label="Seed", precision=0, elem_id="seed")
                    steps = gr.Slider(1, 200, value=d.steps, step=1, label="Steps", elem_id="steps")
                cfg = gr.Slider(0, 15, value=d.cfg, step=0.1, label="CFG scale", elem_id="cfg")
                alpha = gr.Slider(0, 1, value=d.alpha, step=0.005, label="alpha (guidance)", elem_id="alpha")
                fraction = gr.Slider(
                    0, 1, value=d.guided_fraction, step=0.05, label="Guided steps (first fraction)"
                )
                with gr.Row():
                    run = gr.Button("Blend", variant="primary", elem_id="run")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                status = gr.Markdown("Ready.", elem_id="status")
            with gr.Column(scale=2):
                with gr.Row():
                    images = [
                        gr.Image(label=label, type="numpy", interactive=False, elem_id=f"image-{key}")
                        for label, key in zip(ROW_LABELS, ("g", "e", "blend"), strict=True)
                    ]
                maps = gr.Gallery(
                    label="Word maps (per word, each scaled to its own range)", height=790, elem_id="maps"
                )
                scores = gr.Markdown(elem_id="scores")
                command = gr.Textbox(
                    label="Copy as command: the same DreamBlend image (and G's, *_reference.png); "
                    "--alpha 0 gives E alone",
                    buttons=["copy"],
                    interactive=False,
                    lines=3,
                    elem_id="command",
                )
        with gr.Accordion("Alpha sweep: one seed, several alphas (0 is E alone)", open=True):
            with gr.Row():
                alphas = gr.Textbox(DEFAULT_SWEEP, label="alphas", elem_id="alphas", scale=3)
                sweep = gr.Button("Sweep", elem_id="sweep", scale=1)
            strip = gr.Gallery(label="alpha sweep", height=290, elem_id="strip")

        inputs = [prompt, negative, guidance, edit, words, seed, steps, cfg, alpha, fraction]
        skip_blend = tuple(gr.skip() for _ in range(6))

        def settings(
            prompt: str, negative: str, g: str, e: str, words: list[str], seed: Any, steps: Any,
            cfg: Any, alpha: Any, fraction: Any,
        ) -> BlendSettings:  # fmt: skip
            return BlendSettings(
                prompt=prompt or "",
                negative_prompt=negative or "",
                seed=seed,
                steps=steps,
                cfg=cfg,
                alpha=alpha,
                guided_fraction=fraction,
                guidance=g or None,
                edit=e or None,
                words=tuple(words or ()),
            )

        def on_blend(*values: Any, progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008
            try:
                result = session.blend(
                    settings(*values), progress=lambda done, total: progress((done, total), desc="sampling")
                )
            except Exception as exc:  # noqa: BLE001 - shown in the page, which must stay usable
                return (*skip_blend, error_status(exc))
            tiles = map_tiles(result.rows)
            return (
                *(display(result.image(label)) for label in ROW_LABELS),
                gr.Gallery(tiles, columns=len(result.rows[0].words)),
                score_table(result),
                result.command,
                f"Done in {result.seconds:.1f} s.",
            )

        def on_sweep(text: str, *values: Any, progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008
            try:
                strip = session.sweep(
                    settings(*values),
                    parse_alphas(text),
                    progress=lambda done, total: progress((done, total), desc="sweeping alpha"),
                )
            except Exception as exc:  # noqa: BLE001 - shown in the page, which must stay usable
                return gr.skip(), error_status(exc)
            tiles = [(display(image), f"alpha {a:g}") for a, image in strip]
            return gr.Gallery(tiles, columns=len(tiles)), f"Swept {len(strip)} alphas."

        def on_stop() -> str:
            return "Stopping at the next step..." if session.stop() else "Nothing is running."

        def on_prompt(text: str, selected: list[str]) -> Any:
            try:
                choices = session.words(text)
            except Exception:  # noqa: BLE001 - a half-typed prompt must not break the page; Blend reports
                return gr.skip()
            return gr.CheckboxGroup(choices=choices, value=[w for w in selected or () if w in choices])

        run.click(on_blend, inputs, [*images, maps, scores, command, status])
        sweep.click(on_sweep, [alphas, *inputs], [strip, status])
        stop.click(on_stop, None, status, queue=False)
        prompt.change(on_prompt, [prompt, words], words)
    return app
