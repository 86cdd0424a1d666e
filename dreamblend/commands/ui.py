"""``dreamblend ui``: a local web app to tune DreamBlend by looking (needs ``pip install "dreamblend[ui]"``).

Without --model it opens on the shipped toy-world model and subject, offline on a CPU. The page runs
G, E alone and DreamBlend from one seed side by side, with per-word cross-attention maps, scores where
metrics are available, an alpha sweep, and the equivalent 'dreamblend generate' command line.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from dreamblend.commands import help_text
from dreamblend.commands.generate import EPILOG, CommandError, add_runtime_arguments, resolve_runtime

if TYPE_CHECKING:
    from dreamblend.ui.settings import AppConfig

UI_EPILOG = (
    EPILOG
    + """
The page's G and E lists offer every checkpoint of a training run: --trajectory, or the run holding
--guidance-model (a checkpoint-STEP folder written by 'dreamblend train'); a path can be typed too.
"""
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ui",
        help="local web app: blend, compare G / E alone / DreamBlend, word maps, alpha sweep",
        description=help_text(__doc__),
        epilog=UI_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models = parser.add_argument_group("models (default: the shipped toy-world model and subject)")
    models.add_argument("--model", help="base pipeline: diffusers folder or hub id")
    models.add_argument("--guidance-model", help="G: early checkpoint (folder or LoRA file)")
    models.add_argument("--edit-model", help="E: late checkpoint (folder or LoRA file)")
    models.add_argument("--trajectory", type=Path, help="training run whose checkpoints G and E offer")
    page = parser.add_argument_group("page")
    page.add_argument("--prompt", help="the prompt the page opens with")
    page.add_argument(
        "--metrics",
        nargs="+",
        help="metrics to score each image with (default: the toy world's on the toy model, else none)",
    )
    page.add_argument("--references", type=Path, help="folder of the subject's photos, for the metrics")
    page.add_argument(
        "--map-resolution", type=int, help="map size the word maps average (default: a quarter of the latent)"
    )
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    server.add_argument(
        "--threads", type=int, help="CPU threads for torch (default: 1 on the small toy model, else torch's)"
    )
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)


def app_config(args: argparse.Namespace) -> AppConfig:
    """The app's setup from the command line: the toy world's by default, else the given models."""
    from dreamblend.ui.session import check_references
    from dreamblend.ui.settings import AppConfig, BlendSettings, toy_config, trajectory_choices, trajectory_of

    device, dtype = resolve_runtime(args.device, args.dtype)
    runtime = {"device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    if args.model is None:
        config = toy_config(**runtime)
    else:
        config = AppConfig(
            model=args.model,
            defaults=BlendSettings(prompt=""),
            metrics=(),
            title=f"base model {args.model}",
            **runtime,
        )
    check_references(args.references)
    trajectory = args.trajectory or trajectory_of(args.guidance_model) or trajectory_of(args.edit_model)
    defaults = replace(
        config.defaults,
        prompt=config.defaults.prompt if args.prompt is None else args.prompt,
        guidance=args.guidance_model or config.defaults.guidance,
        edit=args.edit_model or config.defaults.edit,
    )
    return replace(
        config,
        defaults=defaults,
        choices=tuple(trajectory_choices(trajectory)) if trajectory else config.choices,
        metrics=tuple(args.metrics) if args.metrics is not None else config.metrics,
        reference_dir=args.references,
        map_resolution=args.map_resolution or config.map_resolution,
        allow_pickle=args.allow_pickle,
    )


def run(args: argparse.Namespace) -> int:
    try:
        from dreamblend.ui.app import build_app
    except ImportError as exc:
        print(
            f"dreamblend ui: error: {exc}; the web app needs Gradio: pip install 'dreamblend[ui]'",
            file=sys.stderr,
        )
        return 2
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from dreamblend.ui.session import BlendSession

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    threads = 1 if args.threads is None and args.model is None else args.threads
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        session = BlendSession(app_config(args))
        session.pipeline(session.config.defaults.guidance, session.config.defaults.edit)
    except (CommandError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"dreamblend ui: error: {exc}", file=sys.stderr)
        return 2
    build_app(session).queue().launch(server_name=args.host, server_port=args.port)
    return 0
