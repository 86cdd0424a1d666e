"""The shipped subject: a LoRA trajectory of one toy-world subject, so the demo runs DreamBlend offline.

    python -m dreamblend.toyworld.shipped [--subject NAME] [--steps 10 25 50 100 200] [--guidance-step G]
                                          [--edit-step E]

trains DreamBooth-LoRA with the project's trainer on the subject's instance photos, exactly as the
experiment does (same photos, learning rate, rank and seed), and writes a trajectory folder into the
package (``weights/subjects/NAME``: ``trajectory.json`` and ``checkpoint-STEP/`` folders of about
125 KB each) plus ``subject.json`` naming the demo's G and E checkpoints. The manifests name the base
model by a path relative to themselves, so the folder works wherever the package is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dreamblend.toyworld.experiment import TOY_LEARNING_RATE
from dreamblend.toyworld.model import WEIGHTS_DIR, base_model_path
from dreamblend.toyworld.subjects import Subject, get_subject, instance_images
from dreamblend.toyworld.vocab import BACKGROUNDS, SUBJECT_TOKEN

SUBJECTS_DIR = WEIGHTS_DIR.parent / "subjects"
SUBJECT_FILE = "subject.json"
DEFAULT_SUBJECT = "dotted_cube"
INSTANCES = 5
LORA_RANK = 4
LEARNING_RATE = TOY_LEARNING_RATE["lora"]
DEFAULT_STEPS = (20, 50, 100, 200, 400)
DEFAULT_GUIDANCE_STEP = 50
DEFAULT_EDIT_STEP = 400
DEFAULT_ALPHA = 0.1
DEFAULT_CFG = 3.0
DEFAULT_DEMO_SETTINGS = ("grass", "brick")


@dataclass(frozen=True)
class ShippedSubject:
    """A shipped trajectory: where it is, its subject, and the G/E checkpoint folders the demo blends."""

    folder: Path
    subject: Subject
    guidance: Path
    edit: Path
    record: dict[str, Any]

    def references(self) -> list[Image.Image]:
        """The instance photos it was trained on (rendered again: they are a function of seeds)."""
        return [
            Image.fromarray(s.rendered.image) for s in instance_images(self.subject, self.record["instances"])
        ]


def shipped_subject(folder: str | Path | None = None) -> ShippedSubject:
    """The trajectory in ``folder`` (default: the package's shipped subject), checked for its files."""
    folder = Path(folder) if folder is not None else SUBJECTS_DIR / DEFAULT_SUBJECT
    record_file = folder / SUBJECT_FILE
    if not record_file.is_file():
        raise FileNotFoundError(
            f"no shipped subject at {folder} ({SUBJECT_FILE} missing); regenerate it with: "
            "python -m dreamblend.toyworld.shipped"
        )
    record = json.loads(record_file.read_text(encoding="utf-8"))
    guidance, edit = (folder / f"checkpoint-{record[k]}" for k in ("guidance_step", "edit_step"))
    for checkpoint in (guidance, edit):
        if not (checkpoint / "pytorch_lora_weights.safetensors").is_file():
            raise FileNotFoundError(
                f"{checkpoint} has no LoRA weights; regenerate: python -m dreamblend.toyworld.shipped"
            )
    return ShippedSubject(folder, get_subject(record["subject"]), guidance, edit, record)


def _relative_base(trajectory: Path, base: Path) -> None:
    """Point every manifest (and the index) at the base model by a path relative to itself."""
    files = [trajectory / "trajectory.json", *trajectory.glob("checkpoint-*/checkpoint.json")]
    for file in files:
        data = json.loads(file.read_text(encoding="utf-8"))
        data["base_model"] = os.path.relpath(base, file.parent)
        file.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def train_shipped(
    subject: Subject,
    steps: Sequence[int],
    guidance_step: int,
    edit_step: int,
    *,
    base: Path | None = None,
    dest: Path | None = None,
    alpha: float = DEFAULT_ALPHA,
    cfg: float = DEFAULT_CFG,
    demo_settings: Sequence[str] = DEFAULT_DEMO_SETTINGS,
    progress: bool = True,
) -> Path:
    """Train the trajectory and replace ``dest`` (default ``SUBJECTS_DIR/NAME``) with it at once."""
    from dreamblend.training import DreamBoothConfig, train_dreambooth

    steps = sorted(set(steps))
    if guidance_step not in steps or edit_step not in steps or guidance_step >= edit_step:
        raise ValueError(f"G step {guidance_step} must come before E step {edit_step}, both in {steps}")
    if (
        not demo_settings
        or set(demo_settings) & set(subject.homes)
        or not set(demo_settings) <= set(BACKGROUNDS)
    ):
        raise ValueError(f"demo settings must be settings other than the subject's homes {subject.homes}")
    base = (base or base_model_path()).resolve()
    dest = Path(dest or SUBJECTS_DIR / subject.name)
    with tempfile.TemporaryDirectory() as tmp:
        instances = Path(tmp) / "instances"
        instances.mkdir()
        for i, sample in enumerate(instance_images(subject, INSTANCES)):
            Image.fromarray(sample.rendered.image).save(instances / f"{i:02d}.png")
        out = Path(tmp) / "trajectory"
        start = time.perf_counter()
        train_dreambooth(
            DreamBoothConfig(
                pretrained_model=str(base),
                instance_dir=instances,
                output_dir=out,
                class_word=subject.cls,
                token=SUBJECT_TOKEN,
                instance_prompt=subject.instance_prompt,
                mode="lora",
                learning_rate=LEARNING_RATE,
                lora_rank=LORA_RANK,
                max_steps=steps[-1],
                batch_size=1,
                seed=0,
                save_at=steps,
                mixed_precision="no",
                progress=progress,
            )
        )
        seconds = time.perf_counter() - start
        staged = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        shutil.copy2(out / "trajectory.json", staged)
        for step in steps:
            shutil.copytree(out / f"checkpoint-{step}", staged / f"checkpoint-{step}")
    record = {
        "subject": subject.name,
        "guidance_step": guidance_step,
        "edit_step": edit_step,
        "alpha": alpha,
        "cfg": cfg,
        "demo_settings": list(demo_settings),
        "instances": INSTANCES,
        "learning_rate": LEARNING_RATE,
        "lora_rank": LORA_RANK,
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "command": "python -m dreamblend.toyworld.shipped",
    }
    (staged / SUBJECT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    _relative_base(staged, base)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(staged, dest)
    return dest


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m dreamblend.toyworld.shipped", description=__doc__.split("\n")[0]
    )
    p.add_argument("--subject", default=DEFAULT_SUBJECT)
    p.add_argument(
        "--steps", type=int, nargs="+", default=list(DEFAULT_STEPS), help="checkpoint steps to ship"
    )
    p.add_argument("--guidance-step", type=int, default=DEFAULT_GUIDANCE_STEP, help="the demo's G")
    p.add_argument("--edit-step", type=int, default=DEFAULT_EDIT_STEP, help="the demo's E")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="the demo's guidance scale")
    p.add_argument("--cfg", type=float, default=DEFAULT_CFG, help="the demo's classifier-free guidance")
    p.add_argument(
        "--demo-settings", nargs="+", default=list(DEFAULT_DEMO_SETTINGS), help="the demo prompts' settings"
    )
    p.add_argument("--base", type=Path, help="base model folder (default: the shipped one)")
    p.add_argument("--dest", type=Path, help="output folder (default: the package's subjects folder)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dest = train_shipped(
        get_subject(args.subject),
        args.steps,
        args.guidance_step,
        args.edit_step,
        base=args.base,
        dest=args.dest,
    )
    print(dest)


if __name__ == "__main__":
    main()
