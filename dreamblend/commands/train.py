"""``dreamblend train {dreambooth,attndreambooth,jedi}``: fine-tune and write a checkpoint trajectory.

Several GPUs: ``accelerate launch -m dreamblend.cli train dreambooth ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from dreamblend.commands import help_text

EPILOG = """\
Output: OUT/checkpoint-STEP/ (a diffusers unet/ folder, pytorch_lora_weights.safetensors, and/or
learned_embeds.safetensors, with checkpoint.json), OUT/trajectory.json listing them,
OUT/train_log.jsonl (loss per step) and OUT/state-STEP/ (what --resume continues from).
"""


def _per_stage(cast: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    """Parse "a,b,c" into a 3-tuple (one value per AttnDreamBooth stage)."""

    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(cast(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected three comma-separated numbers, got {text!r}"
            ) from None
        if len(values) != 3:
            raise argparse.ArgumentTypeError(
                f"expected one value per stage (3), got {len(values)} in {text!r}"
            )
        return values

    return parse


def _add_common(
    parser: argparse.ArgumentParser, token: str | None, batch_size: int, *, subject: bool = True
) -> None:
    """Options every method shares; options left unset keep the training config's defaults.

    ``subject=False`` (JeDi) leaves out the one-subject inputs (instance folder, class, token).
    """
    req = parser.add_argument_group("required")
    req.add_argument(
        "--model",
        dest="pretrained_model",
        metavar="PATH",
        required=True,
        help="base diffusers pipeline: folder or hub id",
    )
    if subject:
        req.add_argument(
            "--instance-dir", metavar="DIR", required=True, help="folder with the subject's images"
        )
        req.add_argument(
            "--class", dest="class_word", metavar="WORD", required=True, help="the subject's class"
        )
    req.add_argument("--output", dest="output_dir", metavar="DIR", required=True, help="run folder")
    opt = parser.add_argument_group("common options")
    if token is not None:
        opt.add_argument("--token", help=f"identifier token (default {token!r})")
    opt.add_argument(
        "--save-at", help="'paper' (every 5 steps to 50, then every 25 to 1000) or steps like 5,10,100"
    )
    opt.add_argument("--batch-size", type=int, help=f"images per step and process (default {batch_size})")
    opt.add_argument("--resolution", type=int, help="training resolution (default: the model's native size)")
    opt.add_argument("--seed", type=int, help="(default 0)")
    opt.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        help="autocast dtype; fp16 needs a GPU (default: accelerate's, else no)",
    )
    opt.add_argument(
        "--gradient-checkpointing", action="store_true", default=None, help="trade compute for memory"
    )
    opt.add_argument("--max-grad-norm", type=float, help="0 disables clipping (default 1.0)")
    opt.add_argument(
        "--weight-decay", dest="adam_weight_decay", type=float, help="AdamW weight decay (default 1e-2)"
    )
    opt.add_argument(
        "--state-every", type=int, help="write a resumable state every N steps and at the end (default 100)"
    )
    opt.add_argument("--keep-states", type=int, help="states to keep (default 1)")
    opt.add_argument(
        "--resume", action="store_true", default=None, help="continue from the newest state in --output"
    )
    opt.add_argument("--log-every", type=int, help="write a train_log.jsonl record every N steps (default 1)")
    opt.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="hide the progress bar"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a checkpoint trajectory (DreamBooth, AttnDreamBooth)",
        description=help_text(__doc__),
    )
    methods = parser.add_subparsers(dest="method", metavar="METHOD", required=True)

    db = methods.add_parser(
        "dreambooth",
        help="full-UNet or LoRA DreamBooth (SD1.x/2.x/SDXL), LoRA DreamBooth on SD3/FLUX transformers",
        description="DreamBooth on 'a photo of {token} {class}', with optional prior preservation. SD3 and "
        "FLUX models (found from --model's pipeline class) train LoRA with the flow-matching loss.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(db, token="sks", batch_size=1)
    g = db.add_argument_group("dreambooth")
    g.add_argument(
        "--mode",
        choices=("full", "lora"),
        help="fine-tune the whole UNet or LoRA adapters (default full; SD3/FLUX: lora only)",
    )
    g.add_argument("--lora", dest="mode", action="store_const", const="lora", help="same as --mode lora")
    g.add_argument(
        "--lr", dest="learning_rate", type=float, help="learning rate (default 5e-6 full, 1e-4 lora)"
    )
    g.add_argument("--max-steps", type=int, help="optimizer steps (default 1000)")
    g.add_argument(
        "--prompt", dest="instance_prompt", help="instance prompt template with {token} and {class}"
    )
    g.add_argument("--lora-rank", type=int, help="LoRA rank (default 4)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    g.add_argument("--lr-scheduler", help="diffusers scheduler name (default constant)")
    g.add_argument("--lr-warmup-steps", type=int, help="(default 0)")
    f = db.add_argument_group("SD3 / FLUX (flow matching)")
    f.add_argument(
        "--weighting-scheme",
        help="timestep density (logit_normal, mode) or loss weighting (sigma_sqrt, cosmap); default none",
    )
    f.add_argument(
        "--guidance-scale", type=float, help="guidance input of guidance-distilled FLUX models (default 1.0)"
    )
    p = db.add_argument_group("prior preservation")
    p.add_argument("--with-prior-preservation", dest="prior_preservation", action="store_true", default=None)
    p.add_argument("--class-dir", help="class images; missing ones are generated with the base model")
    p.add_argument("--num-class-images", type=int, help="(default 100)")
    p.add_argument("--class-prompt", help="class prompt template (default 'a photo of {class}')")
    p.add_argument("--prior-loss-weight", type=float, help="(default 1.0)")
    p.add_argument(
        "--class-inference-steps", type=int, help="sampling steps for generated class images (default 50)"
    )
    p.add_argument("--class-batch-size", type=int, help="class images generated per batch (default 4)")
    db.set_defaults(func=run)

    adb = methods.add_parser(
        "attndreambooth",
        help="AttnDreamBooth: embedding, cross-attention, then whole-UNet stages (SD1.x/2.x)",
        description="AttnDreamBooth's three stages with the cross-attention map regularizer; per-stage "
        "options take three comma-separated values.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(adb, token="<sks>", batch_size=8)
    a = adb.add_argument_group("attndreambooth")
    a.add_argument(
        "--prompt", help="prompt template with {token} and {class} (default 'a photo of a {token} {class}')"
    )
    a.add_argument("--steps", type=_per_stage(int), help="steps per stage (default 60,100,500)")
    a.add_argument("--lr", dest="learning_rates", type=_per_stage(float), help="(default 1e-3,2e-5,2e-6)")
    a.add_argument("--lambda-mu", type=_per_stage(float), help="regularizer mean weight (default 0.1,2,2)")
    a.add_argument(
        "--lambda-sigma", type=_per_stage(float), help="regularizer variance weight (default 0,5,5)"
    )
    a.add_argument(
        "--stage2-params",
        dest="stage2_parameters",
        choices=("attn2", "kv"),
        help="stage 2 trains every cross-attention projection (attn2, default) or to_k/to_v only (kv)",
    )
    a.add_argument(
        "--reg-reduction",
        choices=("paper", "layer"),
        help="statistics over all layers' maps together (paper, default) or per layer (the authors' code)",
    )
    a.add_argument("--backend", help="attention op backend: auto, triton, cpp, torch (default auto)")
    adb.set_defaults(func=run)

    from dreamblend.jedi.options import add_jedi_arguments

    jedi = methods.add_parser(
        "jedi",
        help="JeDi: a joint-image model for finetuning-free personalization, trained on image sets",
        description="Train a JeDi UNet (joint attention over image sets, inpainting input) from a base "
        "SD1.x/2.x model on same-subject image sets; then 'dreamblend generate-jedi'.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(jedi, token=None, batch_size=1, subject=False)
    add_jedi_arguments(jedi)
    jedi.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dreamblend import training

    if args.method == "jedi":
        from dreamblend.jedi.train import JeDiConfig, train_jedi

        config_type, train = JeDiConfig, train_jedi
    else:
        config_type, train = {
            "dreambooth": (training.DreamBoothConfig, training.train_dreambooth),
            "attndreambooth": (training.AttnDreamBoothConfig, training.train_attndreambooth),
        }[args.method]
    names = {f.name for f in dataclasses.fields(config_type)}
    config = config_type(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    try:
        result = train(config)
    except training.TrainingInputError as exc:
        print(f"dreamblend train {args.method}: error: {exc}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"trajectory: {result.trajectory}")
    return 0
