"""``dreamblend generate``: one prompt through a DreamBlend pipeline, written as PNG files.

Also the helpers ``dreamblend batch`` shares: model and sampling options, output checks and atomic
writes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dreamblend.commands import help_text

EPILOG = """\
Models: --model is the base pipeline (diffusers folder or hub id): SD1.x/2.x, SDXL, SD3/3.5 or FLUX.1,
told apart by its model_index.json. --guidance-model/--edit-model take a full checkpoint (diffusers
folder with unet/ or transformer/), a LoRA file (as diffusers' DreamBooth-LoRA scripts write it, for
SD3 and FLUX too) or a Custom Diffusion file (.safetensors, or a folder holding one, its
<token>.safetensors modifier tokens included; UNet models only), or a checkpoint folder written by
'dreamblend train' (OUT/checkpoint-STEP, its learned token included); --guidance-adapter/--edit-adapter
take LoRA files. A role left out uses the base model. Pickle files (.bin/.ckpt/.pt) need
--allow-pickle.

SD3 and FLUX: --cfg is SD3's classifier-free guidance scale; FLUX.1 is guidance-distilled, so there
--cfg is the guidance value the model takes as an input (no unconditional batch; FLUX [dev] was
distilled around 3.5) and --negative-prompt does not apply. --image (DDIM inversion) needs a UNet
model. --tokens words resolve in every text encoder of the text block (SD3: CLIP's 77 positions, then
T5's; FLUX: T5's, no start token). The default alpha is the SD1.5 paper's, not calibrated for them.
"""


class CommandError(Exception):
    """A user-facing problem with the command's inputs, reported without a traceback."""


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Device, dtype and pickle options shared by ``generate`` and ``batch``."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    group.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="model dtype (default on cuda: float16, bfloat16 for SD3/FLUX; float32 on cpu); guidance runs "
        "in float32 anyway",
    )
    group.add_argument(
        "--allow-pickle", action="store_true", help="allow loading pickle checkpoints (can execute code)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images for one prompt with a guidance/edit checkpoint pair",
        description=help_text(__doc__.splitlines()[0]),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", help="text prompt, e.g. 'a sks dog in the jungle'")
    models = parser.add_argument_group("models")
    models.add_argument("--model", required=True, help="base pipeline: diffusers folder or hub id")
    models.add_argument("--guidance-model", help="G: early (underfit) checkpoint; default: the base model")
    models.add_argument("--edit-model", help="E: late (overfit) checkpoint; default: the base model")
    models.add_argument("--guidance-adapter", help="LoRA file for G")
    models.add_argument("--edit-adapter", help="LoRA file for E")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--negative-prompt", default=None, help="(not for FLUX: no unconditional batch)")
    sampling.add_argument(
        "--alpha", type=float, help="cross-attention guidance scale (default 0.1; 0.01 for v-prediction)"
    )
    sampling.add_argument(
        "--cfg",
        type=float,
        default=3.0,
        help="classifier-free guidance scale (default 3.0); for FLUX the distilled guidance input",
    )
    sampling.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    sampling.add_argument("--seed", type=int, default=0, help="(default 0)")
    sampling.add_argument("--num-images", type=int, default=1, help="images for the prompt (default 1)")
    sampling.add_argument("--height", type=int)
    sampling.add_argument("--width", type=int)
    add_guidance_arguments(sampling)
    sampling.add_argument(
        "--image", type=Path, help="edit this real image: DDIM-invert it and start from it (UNet models)"
    )
    sampling.add_argument("--source-prompt", default="", help="prompt describing --image for inversion")
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", type=Path, default=Path("dreamblend.png"), help="PNG path (default dreamblend.png)"
    )
    output.add_argument(
        "--save-reference", action="store_true", help="also write G's image as *_reference.png"
    )
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)


def add_guidance_arguments(group: Any) -> None:
    """Which steps, layers and tokens the guidance uses (options shared with jobs files)."""
    group.add_argument(
        "--guidance-steps",
        type=parse_guidance_steps,
        help="guided steps: a fraction range START:END (e.g. 0:0.5) or indices 0,1,2 (default all)",
    )
    group.add_argument(
        "--layers", nargs="+", help="cross-attention layers: name globs or map sizes (e.g. 16)"
    )
    group.add_argument(
        "--tokens",
        nargs="+",
        type=parse_token,
        help="tokens to guide: words of the prompt (e.g. sks dog) or token indices (default all)",
    )
    group.add_argument("--head-mean", action="store_true", help="compare head-averaged maps")
    group.add_argument("--schedule", choices=("lockstep", "two_phase"), default="lockstep")


def parse_guidance_steps(text: str) -> tuple[float, float] | list[int]:
    """``"0:0.5"`` -> fraction range (0.0, 0.5); ``"0,1,2"`` -> step indices."""
    try:
        if ":" in text:
            start, end = text.split(":")
            return float(start or 0.0), float(end or 1.0)
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction range like 0:0.5 or step indices like 0,1,2, got {text!r}"
        ) from None


def parse_token(text: str) -> int | str:
    """An integer is a token index (0 is the start token); anything else is a word of the prompt."""
    try:
        return int(text)
    except ValueError:
        return text


def parse_layers(layers: list[str] | None) -> list[str | int] | None:
    """Layer options as the store takes them: digits are map sizes, everything else a name pattern."""
    return None if layers is None else [int(x) if str(x).isdigit() else x for x in layers]


def resolve_runtime(device: str | None, dtype: str | None, pipeline: type | None = None) -> tuple[Any, Any]:
    """Device and dtype; on cuda SD3/FLUX (``pipeline``) default to bfloat16, whose range they need."""
    import torch

    from dreamblend.checkpoints import is_mmdit

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    half = "bfloat16" if pipeline is not None and is_mmdit(pipeline) else "float16"
    dtype = dtype or (half if str(device).startswith("cuda") else "float32")
    return torch.device(device), getattr(torch, dtype)


def check_model_options(
    pipeline: type,
    *,
    negative_prompt: str | None,
    image: Path | None = None,
    negative_option: str = "--negative-prompt",
) -> None:
    """Refuse options the model kind does not have, before any weights load (``negative_option``: how
    the user gave the negative prompt)."""
    from dreamblend.checkpoints import is_mmdit

    name = pipeline.__name__
    if negative_prompt is not None and name == "DreamBlendFluxPipeline":
        raise CommandError(
            f"{negative_option} does not apply to FLUX.1: it is guidance-distilled, with no unconditional "
            "batch for a negative prompt to steer; leave it out (the guidance value is the cfg)"
        )
    if image is not None and is_mmdit(pipeline):
        raise CommandError(
            f"--image edits a real image by DDIM inversion, which {name} (flow matching) does not have; "
            "use a UNet model (SD1.x/2.x, SDXL) for real-image editing"
        )


def check_roles_given(**options: str | None) -> None:
    """DreamBlend needs G and E to differ: at least one role option must name a checkpoint."""
    if not any(options.values()):
        flags = "/".join(options)
        raise CommandError(
            "DreamBlend needs a guidance model G and an edit model E that differ; pass at least one of "
            f"{flags} (a role left out is the base model)"
        )


def call_options(options: dict[str, Any]) -> dict[str, Any]:
    """Pipeline keyword arguments without an unset negative prompt (FLUX's call has no such argument)."""
    return {k: v for k, v in options.items() if not (k == "negative_prompt" and v is None)}


def ensure_writable_dir(folder: Path) -> Path:
    """Create ``folder`` and prove it takes files, so a long run cannot fail at its first write."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise CommandError(
            f"cannot write to output directory {folder}: {existing} is a file; choose another --out"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise CommandError(
            f"cannot write to output directory {folder}: {exc.strerror or exc}; choose a writable location "
            "with --out"
        ) from None
    return folder


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder and ``os.replace`` it, so readers (and a resumed
    run) never see a partial file. ``write(file_object)`` produces the content."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(image: Any, path: Path) -> None:
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def guidance_options(args: Any) -> dict[str, Any]:
    """Pipeline keyword arguments for the guidance options of ``add_guidance_arguments``."""
    return {
        "guidance_steps": args.guidance_steps,
        "attention_layers": parse_layers(args.layers),
        "attention_tokens": args.tokens,
        "head_mean": args.head_mean,
        "schedule": args.schedule,
    }


def _output_paths(out: Path, count: int) -> list[Path]:
    if out.suffix.lower() != ".png":
        raise CommandError(f"--out must name a .png file, got {out}")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}.png") for i in range(count)]


def write_images(
    command: str, make: Callable[[argparse.Namespace], list[Path]], args: argparse.Namespace
) -> int:
    """Run an image-writing command: print each written path, or one error line and exit status 2."""
    try:
        written = make(args)
    except (CommandError, ValueError, FileNotFoundError) as exc:
        print(f"dreamblend {command}: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def run(args: argparse.Namespace) -> int:
    return write_images("generate", generate, args)


def generate(args: argparse.Namespace) -> list[Path]:
    """Load the pair, run the pipeline (after DDIM inversion with ``--image``), write the PNGs."""
    import torch
    from diffusers import DDIMScheduler
    from PIL import Image

    from dreamblend.checkpoints import ModelSpec, load_dreamblend, pipeline_class

    if args.num_images < 1 or args.steps < 1:
        raise CommandError("--num-images and --steps must be at least 1")
    if args.image is not None and args.num_images != 1:
        raise CommandError("--image edits one image: use --num-images 1")
    if args.image is not None and not args.image.is_file():
        raise CommandError(f"--image {args.image} does not exist")
    check_roles_given(
        **{
            "--guidance-model": args.guidance_model,
            "--edit-model": args.edit_model,
            "--guidance-adapter": args.guidance_adapter,
            "--edit-adapter": args.edit_adapter,
        }
    )
    paths = _output_paths(args.out, args.num_images)
    ensure_writable_dir(args.out.parent)
    pipeline = pipeline_class(args.model)
    check_model_options(pipeline, negative_prompt=args.negative_prompt, image=args.image)
    device, dtype = resolve_runtime(args.device, args.dtype, pipeline)
    pipe, roles = load_dreamblend(
        args.model,
        ModelSpec(args.guidance_model, args.guidance_adapter),
        ModelSpec(args.edit_model, args.edit_adapter),
        device=device,
        torch_dtype=dtype,
        allow_pickle=args.allow_pickle,
    )
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    latents, height, width = None, args.height, args.width
    if args.image is not None:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        image = Image.open(args.image).convert("RGB")
        latents = pipe.invert(image, args.source_prompt, args.steps, height=height, width=width, **roles)
        height, width = (size * pipe.vae_scale_factor for size in latents.shape[-2:])
    output = pipe(
        args.prompt,
        height=height,
        width=width,
        num_inference_steps=args.steps,
        guidance_scale=args.cfg,
        cross_attention_guidance_scale=args.alpha,
        num_images_per_prompt=args.num_images,
        generator=generator,
        latents=latents,
        return_reference=args.save_reference,
        **call_options({"negative_prompt": args.negative_prompt}),
        **guidance_options(args),
        **roles,
    )
    written = []
    for i, path in enumerate(paths):
        save_png(output.images[i], path)
        written.append(path)
        if args.save_reference:
            reference = path.with_name(f"{path.stem}_reference.png")
            save_png(output.reference_images[i], reference)
            written.append(reference)
    return written
