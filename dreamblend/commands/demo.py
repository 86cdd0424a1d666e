"""``dreamblend demo``: DreamBlend on the shipped toy-world model and subject, offline, in seconds.

The toy world's base model is a real Stable Diffusion pipeline folder; its shipped subject is a
DreamBooth-LoRA trajectory whose early checkpoint (G) still follows prompts and whose late one (E)
has the subject but ties every prompt to the setting of its instance photos. For prompts in settings
those photos never show, the demo samples G, E alone and DreamBlend (E guided by G's cross-attention
maps) from one seed each, draws their per-word attention maps, and scores the images with the toy
world's metrics: subject fidelity against the instance photos, prompt fidelity and the setting alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROLES = ("G (guidance)", "E alone", "DreamBlend")
METRICS = ("toy_subject", "toy_prompt", "toy_background")
# The toy UNet's 8x8 layers are where its words localize (the experiment's Fig. 3 reads them too).
MAP_RESOLUTION = 8


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo", help="run DreamBlend on the shipped toy-world model and subject (offline)"
    )
    parser.add_argument(
        "--prompt",
        action="append",
        help="prompt with the subject token (repeatable; default: two settings its photos never show)",
    )
    parser.add_argument("--steps", type=int, default=15, help="DDIM steps (default 15)")
    parser.add_argument("--alpha", type=float, help="cross-attention guidance scale (default: the subject's)")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the subject's)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument(
        "--seeds", type=int, default=2, help="seeds per prompt (default 2; maps of the first)"
    )
    parser.add_argument("--subject", type=Path, help="a shipped-subject folder (default: the package's)")
    parser.add_argument("--backend", default="auto", help="op backend: auto, triton, cpp or torch")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the model is small)")
    parser.add_argument(
        "--out", type=Path, default=Path("out/demo"), help="folder for demo.png and report.json"
    )
    parser.set_defaults(func=run)


def _words(prompt: str, token: str, cls: str) -> list[str]:
    """The subject token, its class and the last word of the setting ("street" of "a cobblestone street")."""
    from dreamblend.toyworld.vocab import BACKGROUND_PHRASES, parse_caption

    try:
        facts = parse_caption(prompt)
    except ValueError as exc:
        raise SystemExit(f"--prompt {prompt!r} is not in the toy world's grammar ({exc})") from None
    if not facts.is_subject or facts.cls != cls or facts.background is None:
        raise SystemExit(
            f"--prompt {prompt!r} must name the subject ('{token} {cls}') and a setting, "
            f"e.g. 'a {token} {cls} in the snow'"
        )
    return [token, cls, BACKGROUND_PHRASES[facts.background].split()[-1]]


def _stack(paths: list[Path], out: Path) -> None:
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    sheet = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for image in images:
        sheet.paste(image, (0, y))
        y += image.height
    sheet.save(out)


def run(args: argparse.Namespace) -> int:
    from diffusers.utils import logging as diffusers_logging
    from PIL import Image
    from transformers.utils import logging as transformers_logging

    import dreamblend.toyworld.metrics  # noqa: F401 - registers the toy metrics
    from dreamblend.analysis.maps import blend_word_maps, plot_word_maps
    from dreamblend.checkpoints import ModelSpec, load_dreamblend
    from dreamblend.metrics import build_metrics
    from dreamblend.ops import resolved_backend_name
    from dreamblend.toyworld.model import base_model_path
    from dreamblend.toyworld.shipped import shipped_subject
    from dreamblend.toyworld.subjects import evaluation_prompts
    from dreamblend.toyworld.vocab import SUBJECT_TOKEN, parse_caption

    if args.steps < 1 or args.seeds < 1:
        raise SystemExit("--steps and --seeds must be at least 1")
    torch.set_num_threads(args.threads)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    start = time.perf_counter()
    shipped = shipped_subject(args.subject)
    subject, record = shipped.subject, shipped.record
    alpha = record["alpha"] if args.alpha is None else args.alpha
    cfg = record["cfg"] if args.cfg is None else args.cfg
    settings = record["demo_settings"]
    prompts = args.prompt or [
        p for p in evaluation_prompts(subject) if parse_caption(p).background in settings
    ]
    words = {p: _words(p, SUBJECT_TOKEN, subject.cls) for p in prompts}
    pipe, role_kwargs = load_dreamblend(
        base_model_path(),
        ModelSpec(str(shipped.guidance)),
        ModelSpec(str(shipped.edit)),
        torch_dtype=torch.float32,
    )
    pipe.set_progress_bar_config(disable=True)
    backend = resolved_backend_name(args.backend, torch.device("cpu"))
    args.out.mkdir(parents=True, exist_ok=True)
    images: dict[str, list[Any]] = {role: [] for role in ROLES}
    scored_prompts: list[str] = []
    figures = []
    sample_start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        for seed in range(args.seed, args.seed + args.seeds):
            rows = blend_word_maps(
                pipe,
                prompt,
                words[prompt],
                seed=seed,
                resolution=MAP_RESOLUTION,
                num_inference_steps=args.steps,
                guidance_scale=cfg,
                cross_attention_guidance_scale=alpha,
                attention_backend=args.backend,
                **role_kwargs,
            )
            for row in rows:
                images[row.label].append(Image.fromarray(row.image))
            scored_prompts.append(prompt)
            if seed == args.seed:
                path = args.out / f"maps-{i}.png"
                figures.append(plot_word_maps(rows, path, title=f"{prompt!r}, seed {seed}"))
    sample_s = time.perf_counter() - sample_start
    _stack(figures, args.out / "demo.png")
    for path in figures:
        path.unlink()
    metrics = build_metrics(list(METRICS), device="cpu")
    references = shipped.references()
    scores = {
        role: {m.name: float(np.nanmean(m.score(images[role], scored_prompts, references))) for m in metrics}
        for role in ROLES
    }
    report = {
        "subject": subject.name,
        "guidance_checkpoint": record["guidance_step"],
        "edit_checkpoint": record["edit_step"],
        "prompts": prompts,
        "seeds": list(range(args.seed, args.seed + args.seeds)),
        "steps": args.steps,
        "cfg": cfg,
        "alpha": alpha,
        "op_backend": backend,
        "threads": args.threads,
        "scores": scores,
        "seconds_sampling": round(sample_s, 2),
        "seconds_total": round(time.perf_counter() - start, 2),
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    print(
        f"DreamBlend demo: toy-world model, subject '{subject.name}' ({SUBJECT_TOKEN} {subject.cls}), "
        f"G = LoRA step {record['guidance_step']}, E = LoRA step {record['edit_step']}"
    )
    print(
        f"  {len(prompts)} prompts x {args.seeds} seeds, {args.steps} DDIM steps, "
        f"CFG {cfg:g}, alpha {alpha:g}"
    )
    print(
        f"  {'':14} {'subject':>8} {'prompt':>8} {'setting':>8}   "
        f"(toy-world metrics, mean of {len(scored_prompts)} images)"
    )
    for role in ROLES:
        s = scores[role]
        print(f"  {role:14} {s['toy_subject']:8.3f} {s['toy_prompt']:8.3f} {s['toy_background']:8.3f}")
    print(
        f"  {report['seconds_total']:.1f} s in all; wrote demo.png (images and word maps) "
        f"and report.json to {args.out}"
    )
    return 0
