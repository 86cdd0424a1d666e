"""``dreamblend generate-jedi``: new images of a subject from 1-3 reference photos and a prompt (JeDi).

No fine-tuning: the references and the image to generate are denoised as one set by a JeDi model
(trained with ``dreamblend train jedi``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dreamblend.commands import help_text
from dreamblend.commands.generate import (
    CommandError,
    _output_paths,
    add_runtime_arguments,
    ensure_writable_dir,
    resolve_runtime,
    save_png,
    write_images,
)

EPILOG = """\
Models: --model is a saved JeDi pipeline folder, or with --checkpoint the base model the checkpoint
was trained from (a folder OUT/checkpoint-STEP written by 'dreamblend train jedi', full or LoRA).
Each --reference needs a --reference-prompt describing it, in the same order; all references must
have one size, which is the size generated.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate-jedi",
        help="generate images of a subject from reference photos with a JeDi model (no fine-tuning)",
        description=help_text(__doc__.splitlines()[0]),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", help="text prompt for the new image, e.g. 'a photo of a dog on the beach'")
    models = parser.add_argument_group("models")
    models.add_argument(
        "--model", required=True, help="JeDi pipeline folder, or the base model with --checkpoint"
    )
    models.add_argument("--checkpoint", help="OUT/checkpoint-STEP of 'dreamblend train jedi'")
    refs = parser.add_argument_group("references")
    refs.add_argument(
        "--reference", action="append", type=Path, required=True, help="reference image (repeat)"
    )
    refs.add_argument(
        "--reference-prompt", action="append", help="caption of each --reference, in the same order (repeat)"
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--guidance", choices=("joint", "image_first", "text_first"), default="joint")
    sampling.add_argument("--cfg", type=float, default=5.0, help="guidance scale l2 of eq. 1 (default 5.0)")
    sampling.add_argument("--partial-cfg", type=float, help="scale l1 of eq. 1 (default: --cfg)")
    sampling.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    sampling.add_argument("--seed", type=int, default=0, help="(default 0)")
    sampling.add_argument("--num-images", type=int, default=1, help="images for the prompt (default 1)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=Path("jedi.png"), help="PNG path (default jedi.png)")
    output.add_argument("--save-sets", action="store_true", help="also write each whole set as *_set.png")
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return write_images("generate-jedi", generate, args)


def generate(args: argparse.Namespace) -> list[Path]:
    """Load the JeDi pipeline, read the references, sample, write the PNGs."""
    import torch
    from PIL import Image

    from dreamblend.jedi.data import stack_images
    from dreamblend.jedi.pipeline import load_jedi_pipeline

    if args.num_images < 1 or args.steps < 1:
        raise CommandError("--num-images and --steps must be at least 1")
    paths = _output_paths(args.out, args.num_images)  # a bad --out fails before the model loads
    missing = [str(p) for p in args.reference if not p.is_file()]
    if missing:
        raise CommandError(f"--reference file(s) not found: {', '.join(missing)}")
    ensure_writable_dir(args.out.parent)
    device, dtype = resolve_runtime(args.device, args.dtype)
    pipe = load_jedi_pipeline(args.model, args.checkpoint, torch_dtype=dtype, allow_pickle=args.allow_pickle)
    pipe.to(device)
    references = [Image.open(p).convert("RGB") for p in args.reference]
    output = pipe(
        args.prompt,
        references,
        args.reference_prompt,
        num_images_per_prompt=args.num_images,
        num_inference_steps=args.steps,
        guidance=args.guidance,
        guidance_scale=args.cfg,
        partial_guidance_scale=args.partial_cfg,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
        return_sets=args.save_sets,
    )
    written = []
    n = len(references) + 1
    for i, path in enumerate(paths):
        save_png(output.images[i], path)
        written.append(path)
        if args.save_sets:
            whole = path.with_name(f"{path.stem}_set.png")
            save_png(stack_images(output.sets[i * n : (i + 1) * n]), whole)
            written.append(whole)
    return written
