"""``dreamblend demo``: the whole DreamBlend loop on a tiny model built from configs, reported.

No weights are downloaded: G is a tiny SD1.x-shaped pipeline with random weights and E is the same
model with perturbed UNet weights (a stand-in for an overfit fine-tune). The demo samples E alone,
G alone and E under G's cross-attention guidance from one seed, times each, and reports how far the
guidance pulled E's latent toward G's layout.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="run DreamBlend end to end on a tiny offline model")
    parser.add_argument("--prompt", default="a photo of sks dog on the beach")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--alpha", type=float, default=0.1, help="cross-attention guidance scale")
    parser.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", help="op backend: auto, triton, cpp or torch")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for PNGs and report.json")
    parser.set_defaults(func=run)


def _edit_unet(unet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A deterministic 'fine-tuned' copy: every weight nudged by 20% of its own scale."""
    edit = copy.deepcopy(unet)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in edit.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2 * p.std().nan_to_num(0.0))
    return edit


def run(args: argparse.Namespace) -> int:
    from dreamblend.ops import resolved_backend_name
    from dreamblend.pipelines import DreamBlendPipeline
    from dreamblend.pipelines.blend import vae_decode
    from dreamblend.testing import tiny_sd_components

    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    components = tiny_sd_components(seed=args.seed)
    guidance_unet = components["unet"]
    components["unet"] = _edit_unet(guidance_unet, args.seed)
    pipe = DreamBlendPipeline(**components, guidance_unet=guidance_unet)
    pipe.set_progress_bar_config(disable=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # a tiny model is overhead-bound: extra threads only spin
    pipe.to(device)
    backend = resolved_backend_name(args.backend, torch.device(device))

    def sample(alpha: float, return_reference: bool):
        start = time.perf_counter()
        out = pipe(
            args.prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.cfg,
            cross_attention_guidance_scale=alpha,
            generator=torch.Generator(device).manual_seed(args.seed),
            attention_backend=args.backend,
            return_reference=return_reference,
            output_type="latent",
        )
        return out, time.perf_counter() - start

    plain, plain_s = sample(0.0, return_reference=False)
    blended, blend_s = sample(args.alpha, return_reference=True)
    reference = blended.reference_images

    def dist(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.float() - b.float()).abs().mean().item()

    report = {
        "prompt": args.prompt,
        "device": device,
        "op_backend": backend,
        "steps": args.steps,
        "cfg": args.cfg,
        "alpha": args.alpha,
        "seconds_edit_alone": round(plain_s, 3),
        "seconds_dreamblend": round(blend_s, 3),
        "latent_l1_edit_alone_to_guidance": dist(plain.images, reference),
        "latent_l1_dreamblend_to_guidance": dist(blended.images, reference),
        "latent_l1_dreamblend_to_edit_alone": dist(blended.images, plain.images),
        "finite": bool(torch.isfinite(blended.images).all()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, latents in (("dreamblend", blended.images), ("guidance", reference), ("edit", plain.images)):
        with torch.no_grad():
            image = pipe.image_processor.postprocess(vae_decode(pipe.vae, latents), output_type="pil")[0]
        image.save(args.out / f"{name}.png")
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    print(f"DreamBlend demo: tiny SD1.x-shaped model with random weights on {device} ({backend})")
    print(f"  prompt {args.prompt!r}, {args.steps} DDIM steps, CFG {args.cfg}, alpha {args.alpha}")
    print(f"  E alone: {plain_s:.2f} s   DreamBlend (G + guided E, G's image decoded too): {blend_s:.2f} s")
    print(
        "  mean |latent - G's latent|: E alone "
        f"{report['latent_l1_edit_alone_to_guidance']:.4f} -> DreamBlend "
        f"{report['latent_l1_dreamblend_to_guidance']:.4f}"
    )
    print(f"  wrote dreamblend.png, guidance.png, edit.png and report.json to {args.out}")
    return 0 if report["finite"] else 1
