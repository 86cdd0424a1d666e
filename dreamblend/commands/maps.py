"""``dreamblend maps``: per-word cross-attention heatmaps of one prompt, as a PNG grid (paper Fig. 3).

With a guidance or edit checkpoint the grid has three rows from one start latent: G's maps, E sampled
alone and DreamBlend (E under G's guidance). Without, it shows the one model given by --model (a
diffusers folder, a hub id or a checkpoint folder written by 'dreamblend train').
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dreamblend.commands import help_text
from dreamblend.commands.generate import (
    EPILOG,
    CommandError,
    add_runtime_arguments,
    ensure_writable_dir,
    resolve_runtime,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "maps",
        help="per-word cross-attention heatmaps of a checkpoint or a DreamBlend pair",
        description=help_text(__doc__),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", help="text prompt, e.g. 'a sks dog on the beach'")
    parser.add_argument(
        "--words", nargs="+", required=True, help="words of the prompt to map, e.g. sks dog beach"
    )
    models = parser.add_argument_group("models")
    models.add_argument(
        "--model",
        required=True,
        help="base pipeline (diffusers folder or hub id) or a training checkpoint folder",
    )
    models.add_argument("--guidance-model", help="G: early (underfit) checkpoint; default: the base model")
    models.add_argument("--edit-model", help="E: late (overfit) checkpoint; default: the base model")
    models.add_argument("--guidance-adapter", help="LoRA file for G")
    models.add_argument("--edit-adapter", help="LoRA file for E")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--alpha", type=float, help="cross-attention guidance scale (default 0.1; 0.01 for v-prediction)"
    )
    sampling.add_argument(
        "--cfg", type=float, default=3.0, help="classifier-free guidance scale (default 3.0)"
    )
    sampling.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    sampling.add_argument("--seed", type=int, default=0, help="(default 0)")
    sampling.add_argument("--height", type=int)
    sampling.add_argument("--width", type=int)
    sampling.add_argument(
        "--resolution",
        type=int,
        help="map size averaged (e.g. 16 for 16x16); default: a quarter of the latent size, as SD1.5's 16x16",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=Path("maps.png"), help="PNG path (default maps.png)")
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        path = draw(args)
    except (CommandError, ValueError, FileNotFoundError) as exc:
        print(f"dreamblend maps: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def draw(args: argparse.Namespace) -> Path:
    """Load the model(s), record the maps while sampling, write the grid."""
    from dreamblend.analysis.maps import (
        blend_word_maps,
        checkpoint_word_maps,
        load_plain_pipeline,
        plot_word_maps,
    )
    from dreamblend.checkpoints import ModelSpec, load_dreamblend

    if args.steps < 1:
        raise CommandError("--steps must be at least 1")
    if args.out.suffix.lower() != ".png":
        raise CommandError(f"--out must name a .png file, got {args.out}")
    ensure_writable_dir(args.out.parent)
    device, dtype = resolve_runtime(args.device, args.dtype)
    sampling = {
        "seed": args.seed,
        "resolution": args.resolution,
        "height": args.height,
        "width": args.width,
        "num_inference_steps": args.steps,
        "guidance_scale": args.cfg,
    }
    roles = (args.guidance_model, args.edit_model, args.guidance_adapter, args.edit_adapter)
    if any(roles):
        pipe, role_kwargs = load_dreamblend(
            args.model,
            ModelSpec(args.guidance_model, args.guidance_adapter),
            ModelSpec(args.edit_model, args.edit_adapter),
            device=device,
            torch_dtype=dtype,
            allow_pickle=args.allow_pickle,
        )
        rows = blend_word_maps(
            pipe,
            args.prompt,
            args.words,
            cross_attention_guidance_scale=args.alpha,
            **sampling,
            **role_kwargs,
        )
    else:
        if args.alpha is not None:
            raise CommandError(
                "--alpha needs a pair: add --guidance-model or --edit-model (or their adapters)"
            )
        pipe = load_plain_pipeline(args.model, torch_dtype=dtype, allow_pickle=args.allow_pickle).to(device)
        rows = [
            checkpoint_word_maps(pipe, args.prompt, args.words, label=Path(str(args.model)).name, **sampling)
        ]
    return plot_word_maps(rows, args.out, title=args.prompt)
