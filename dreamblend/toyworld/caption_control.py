"""Does the base model follow its captions? Class, colour and setting accuracy of its generations.

The toy world's metrics read each generated image's class, colour and setting; the accuracy against
the caption is the evidence that captions control the model (chance: 1/6 for class, 1/8 for colour
and setting). Held-out captions are the (class, colour, setting) triples training never showed, so a
model that only memorised its training combinations scores low on them.

    python -m dreamblend.toyworld.caption_control [--model DIR] [--captions N] [--seeds N]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamblend.toyworld.scenes import HELD_OUT_COMBINATIONS, held_out_combinations
from dreamblend.toyworld.vocab import BACKGROUNDS, CLASSES, COLOURS, CaptionFacts, compose_caption

FACTS = ("class", "colour", "background")
CHANCE = {"class": 1 / len(CLASSES), "colour": 1 / len(COLOURS), "background": 1 / len(BACKGROUNDS)}


def held_out_captions() -> list[str]:
    """One caption per held-out (class, colour, setting) triple."""
    return [compose_caption(CaptionFacts(c, col, bg)) for c, col, bg in HELD_OUT_COMBINATIONS]


def random_captions(count: int, seed: int = 0) -> list[str]:
    """`count` captions of uniformly drawn triples that training does show."""
    rng = random.Random(seed)
    held_out = held_out_combinations()
    captions: list[str] = []
    while len(captions) < count:
        triple = (rng.choice(CLASSES), rng.choice(COLOURS), rng.choice(BACKGROUNDS))
        if triple not in held_out:
            captions.append(compose_caption(CaptionFacts(*triple)))
    return captions


def generate(
    pipe: Any, captions: Sequence[str], seeds: int, steps: int, cfg: float, batch_size: int = 16
) -> tuple[list[Any], list[str]]:
    """Each caption sampled with seeds 0..seeds-1 (one generator per image, so batching changes nothing)."""
    jobs = [(caption, seed) for seed in range(seeds) for caption in captions]
    images: list[Any] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed) for _, seed in chunk]
        images += pipe(
            [caption for caption, _ in chunk],
            num_inference_steps=steps,
            guidance_scale=cfg,
            generator=generators,
        ).images
    return images, [caption for caption, _ in jobs]


def accuracies(images: Sequence[Any], captions: Sequence[str], metrics: Sequence[Any]) -> dict[str, float]:
    """Share of images whose class, colour and setting the world encoder reads as the caption's."""
    return {
        fact: float(np.mean(m.score(images, captions, []))) for fact, m in zip(FACTS, metrics, strict=True)
    }


def measure(
    pipe: Any,
    *,
    captions: int = 48,
    seeds: int = 2,
    steps: int = 30,
    cfg: float = 4.0,
    metrics_model: str | None = None,
) -> dict[str, Any]:
    """Accuracies on held-out and on `captions` random training-distribution captions, with the settings."""
    from dreamblend.metrics import build_metrics
    from dreamblend.toyworld.metrics import MODEL_KEY

    models = {MODEL_KEY: metrics_model} if metrics_model else None
    metrics = build_metrics([f"toy_{fact}" for fact in FACTS], models=models)  # one encoder for both sets
    pipe.set_progress_bar_config(disable=True)
    result: dict[str, Any] = {"steps": steps, "cfg": cfg, "seeds": seeds, "chance": CHANCE}
    for name, texts in (("held_out", held_out_captions()), ("random", random_captions(captions))):
        if not texts:
            continue
        images, labels = generate(pipe, texts, seeds, steps, cfg)
        result[name] = {"images": len(images), **accuracies(images, labels, metrics)}
    return result


def main(argv: Sequence[str] | None = None) -> None:
    from dreamblend.toyworld.model import WEIGHTS_DIR

    p = argparse.ArgumentParser(
        prog="python -m dreamblend.toyworld.caption_control", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", default=str(WEIGHTS_DIR), help="pipeline folder (default: the shipped model)")
    p.add_argument("--captions", type=int, default=48, help="random captions (default 48)")
    p.add_argument("--seeds", type=int, default=2, help="images per caption (default 2)")
    p.add_argument("--steps", type=int, default=30, help="DDIM steps (default 30)")
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (default 4)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dreamblend.analysis.maps import load_plain_pipeline

    pipe = load_plain_pipeline(Path(args.model), torch_dtype=torch.float32)
    result = measure(pipe, captions=args.captions, seeds=args.seeds, steps=args.steps, cfg=args.cfg)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
