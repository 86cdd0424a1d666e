"""``dreamblend train jedi``'s options, apart from the trainer so the command line parses without torch."""

from __future__ import annotations

import argparse


def add_jedi_arguments(parser: argparse.ArgumentParser) -> None:
    """``dreamblend train jedi``'s own options (the shared ones come from the train command)."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        dest="instance_dir",
        metavar="DIR",
        required=True,
        help="image sets: NAME.png stacked + NAME.txt (captions joined by <|split|>), or folders",
    )
    g = parser.add_argument_group("jedi")
    g.add_argument("--set-size", type=int, help="images per set in training (default: the smallest set)")
    g.add_argument(
        "--mode",
        choices=("full", "lora"),
        help="fine-tune the whole UNet or LoRA adapters + conv_in (default full)",
    )
    g.add_argument(
        "--lr", dest="learning_rate", type=float, help="learning rate (default 5e-6 full, 1e-4 lora)"
    )
    g.add_argument("--max-steps", type=int, help="optimizer steps (default 1000)")
    g.add_argument("--mask-probability", type=float, help="P(image is unknown), per image (default 0.5)")
    g.add_argument("--caption-dropout", type=float, help="P(a set's captions are dropped) (default 0.1)")
    g.add_argument("--image-dropout", type=float, help="P(a set's known images are zeroed) (default 0.1)")
    g.add_argument(
        "--loss-on",
        choices=("all", "unknown"),
        help="images the loss averages over (default all, the supplement)",
    )
    g.add_argument("--lora-rank", type=int, help="LoRA rank (default 4)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    g.add_argument("--lr-scheduler", help="diffusers scheduler name (default constant)")
    g.add_argument("--lr-warmup-steps", type=int, help="(default 0)")
