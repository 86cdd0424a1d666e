"""Train the toy world's base model from scratch on a CPU, resumably: ``python -m dreamblend.toyworld.train``.

Stages, all writing into one run folder (keep it outside the repository):

- ``vae --out RUN``: the autoencoder on renders (half of them painted with random subject patterns, so
  fine-tuned subjects survive the round trip), SD-style loss L1 + MSE + tiny KL; then measures the
  latent scaling factor and writes ``RUN/vae`` and a reconstruction grid ``RUN/vae_recon.png``.
- ``base --out RUN``: text encoder and UNet jointly on the frozen VAE's latents: epsilon prediction on
  SD's DDPM schedule, 10 % empty captions for classifier-free guidance, EMA weights.
- ``sample --run RUN``: a captioned DDIM grid from the current EMA weights (``RUN/samples-STEP.png``).
- ``export --run RUN``: the float16 pipeline folder and ``training.json`` with the model's caption
  control measured (:mod:`dreamblend.toyworld.caption_control`; default destination: the package's
  ``dreamblend/toyworld/weights/base``).

Randomness of step ``s`` (images, noise, timesteps, caption dropout) is a function of (seed, s) alone, so
a state file (models, optimizer, EMA, step, seconds) saved atomically every ``--save-every`` steps lets
``--resume`` continue exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline
from PIL import Image, ImageDraw

from dreamblend.cpu_info import cpu_model
from dreamblend.toyworld import caption_control
from dreamblend.toyworld.dataset import ToyWorldDataset, to_tensor
from dreamblend.toyworld.model import (
    IMAGE_SIZE,
    WEIGHTS_DIR,
    build_pipeline,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    ddpm_scheduler,
    save_pipeline,
)
from dreamblend.toyworld.scenes import render, sample_scene
from dreamblend.toyworld.shapes import PATTERNS, Pattern
from dreamblend.toyworld.subjects import SUBJECTS, instance_images
from dreamblend.toyworld.vocab import COLOURS

# Dataset indices never run out: item i is a function of (seed, i).
_STREAM_LENGTH = 10**15
# SD's autoencoder weights the KL sum by 1e-6 against a per-pixel reconstruction sum; kept as a ratio.
_KL_WEIGHT = 1e-6
_MSE_WEIGHT = 0.5
_CAPTION_DROPOUT = 0.1
_EMA_DECAY = 0.999
_SAMPLE_PROMPTS = (
    "a photo of a red cube on the grass",
    "a photo of a blue ball in the snow",
    "a photo of a yellow star on the beach",
    "a photo of a green ring in front of a brick wall",
    "a photo of a purple cone under the night sky",
    "a photo of an orange cylinder on a wooden floor",
    "a photo of a white cube on the water",
    "a photo of a black star on a cobblestone street",
)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def vae_image(seed: int, index: int) -> torch.Tensor:
    """Training image `index`: a base-world render, half of them painted with a random subject pattern."""
    rng = np.random.default_rng([seed, index, 1])
    scene = sample_scene(rng)
    if rng.random() < 0.5:
        others = [c for c in COLOURS if c != scene.colour]
        pattern = Pattern(str(rng.choice(PATTERNS)), str(rng.choice(others)), float(rng.uniform(1.0, 3.0)))
        scene = dataclasses.replace(scene, pattern=pattern)
    return to_tensor(render(scene, IMAGE_SIZE).image)


def step_generator(seed: int, step: int, stage: str) -> torch.Generator:
    """The random stream of one step, independent of every other step (what makes resuming exact)."""
    words = np.random.SeedSequence([seed, step, ("vae", "base").index(stage)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


# --------------------------------------------------------------------------------------------------
# Run state
# --------------------------------------------------------------------------------------------------


def state_path(run: Path, stage: str) -> Path:
    return run / f"{stage}-state.pt"


def save_state(run: Path, stage: str, state: dict[str, Any]) -> None:
    """Write the state to a temporary file and rename it, so a kill never leaves a torn checkpoint."""
    path = state_path(run, stage)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(run: Path, stage: str) -> dict[str, Any]:
    path = state_path(run, stage)
    if not path.is_file():
        raise SystemExit(f"nothing to resume: {path} does not exist")
    return torch.load(path, weights_only=False)


def log(run: Path, record: dict[str, Any]) -> None:
    with open(run / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def check_fresh(run: Path, stage: str, resume: bool) -> None:
    if not resume and state_path(run, stage).exists():
        raise SystemExit(
            f"{state_path(run, stage)} exists: pass --resume to continue it or choose a new --out"
        )


def warmup_lr(lr: float, step: int, warmup: int) -> float:
    return lr * min(1.0, (step + 1) / max(1, warmup))


# --------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """L1 + MSE reconstruction per pixel, plus the KL with SD's weight relative to the pixel count."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    kl = posterior.kl().mean() / images[0].numel()
    return F.l1_loss(recon, images) + _MSE_WEIGHT * F.mse_loss(recon, images) + _KL_WEIGHT * kl


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, seed: int, n: int, batch: int) -> float:
    """1 / std of posterior samples over `n` held-aside renders: unit-variance latents, as SD scales them."""
    generator = torch.Generator().manual_seed(seed)
    latents = []
    for start in range(0, n, batch):
        images = torch.stack(
            [vae_image(seed + 1, _STREAM_LENGTH - 1 - i) for i in range(start, min(n, start + batch))]
        )
        latents.append(vae.encode(images).latent_dist.sample(generator))
    return float(1.0 / torch.cat(latents).std())


def _grid(rows: Sequence[Sequence[torch.Tensor]], scale: int = 2) -> Image.Image:
    """Images in [-1, 1] (CHW) as a PIL grid, enlarged so patterns can be judged by eye."""
    h, w = rows[0][0].shape[1:]
    sheet = Image.new("RGB", (max(len(r) for r in rows) * w * scale, len(rows) * h * scale), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(array).resize((w * scale, h * scale), Image.NEAREST)
            sheet.paste(tile, (x * w * scale, y * h * scale))
    return sheet


@torch.no_grad()
def save_reconstructions(vae: AutoencoderKL, path: Path) -> None:
    """Subjects' instance photos and plain renders over their reconstructions (mean latents)."""
    vae.eval()
    subjects = [to_tensor(instance_images(s, 2)[i].rendered.image) for s in SUBJECTS for i in range(2)]
    plain = [to_tensor(ToyWorldDataset(123, 100).sample(i).rendered.image) for i in range(12)]
    rows = []
    for images in (subjects, plain):
        batch = torch.stack(images)
        recon = vae.decode(vae.encode(batch).latent_dist.mean).sample
        rows += [list(batch), list(recon)]
    _grid(rows).save(path)
    vae.train()


def train_vae(args: argparse.Namespace) -> None:
    run = Path(args.out)
    run.mkdir(parents=True, exist_ok=True)
    check_fresh(run, "vae", args.resume)
    vae = build_vae(args.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    step, seconds = 0, 0.0
    if args.resume:
        state = load_state(run, "vae")
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        step, seconds = state["step"], state["seconds"]
    vae.train()
    losses: list[float] = []
    while step < args.steps:
        start = time.perf_counter()
        generator = step_generator(args.seed, step, "vae")
        images = torch.stack(
            [vae_image(args.seed, step * args.batch_size + i) for i in range(args.batch_size)]
        )
        lr = warmup_lr(args.lr, step, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = vae_loss(vae, images, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        seconds += time.perf_counter() - start
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            log(
                run,
                {
                    "stage": "vae",
                    "step": step,
                    "loss": float(np.mean(losses)),
                    "lr": lr,
                    "seconds": round(seconds, 1),
                },
            )
            losses.clear()
        if step % args.save_every == 0 or step == args.steps:
            save_state(
                run,
                "vae",
                {
                    "vae": vae.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "seconds": seconds,
                    "args": vars(args),
                },
            )
    vae.eval()
    scale = measure_scaling_factor(vae, args.seed, args.scale_images, args.batch_size)
    vae.register_to_config(scaling_factor=scale)
    tmp = run / "vae.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(run / "vae", ignore_errors=True)
    os.replace(tmp, run / "vae")
    save_reconstructions(vae, run / "vae_recon.png")
    log(run, {"stage": "vae", "step": step, "scaling_factor": scale, "seconds": round(seconds, 1)})


# --------------------------------------------------------------------------------------------------
# Text encoder + UNet
# --------------------------------------------------------------------------------------------------


class Ema:
    """Exponential moving average of parameters, with the usual warm-up so early averages are not stale."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.shadow = {name: copy_state(module) for name, module in modules.items()}

    def update(self, modules: dict[str, torch.nn.Module], step: int) -> None:
        decay = min(_EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, module in modules.items():
                for key, value in module.state_dict().items():
                    self.shadow[name][key].lerp_(value, 1 - decay)


def copy_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def base_optimizer(text_encoder: torch.nn.Module, unet: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW with no decay on token embeddings: a word never seen (``sks``) keeps its random vector."""
    embedding = text_encoder.get_input_embeddings().weight
    others = [p for p in [*text_encoder.parameters(), *unet.parameters()] if p is not embedding]
    return torch.optim.AdamW(
        [{"params": [embedding], "weight_decay": 0.0}, {"params": others, "weight_decay": 1e-2}], lr=lr
    )


def load_vae(run: Path) -> AutoencoderKL:
    if not (run / "vae" / "config.json").is_file():
        raise SystemExit(
            f"no trained VAE in {run / 'vae'}: run `python -m dreamblend.toyworld.train vae --out {run}`"
        )
    vae = AutoencoderKL.from_pretrained(str(run / "vae"), torch_dtype=torch.float32)
    return vae.eval().requires_grad_(False)


def base_batch(
    seed: int, step: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, list[str]]:
    """Step `step`'s images and captions, with 10 % of captions emptied for classifier-free guidance."""
    dataset = ToyWorldDataset(seed, _STREAM_LENGTH)
    items = [dataset[step * batch_size + i] for i in range(batch_size)]
    drop = torch.rand(batch_size, generator=generator) < _CAPTION_DROPOUT
    captions = ["" if d else text for d, (_, text) in zip(drop.tolist(), items, strict=True)]
    return torch.stack([image for image, _ in items]), captions


def train_base(args: argparse.Namespace) -> None:
    run = Path(args.out)
    check_fresh(run, "base", args.resume)
    vae = load_vae(run)
    tokenizer = build_tokenizer(run / "tokenizer")
    text_encoder, unet = build_text_encoder(tokenizer, args.seed), build_unet(args.seed)
    modules = {"text_encoder": text_encoder, "unet": unet}
    optimizer = base_optimizer(text_encoder, unet, args.lr)
    ema = Ema(modules)
    scheduler = ddpm_scheduler()
    step, seconds = 0, 0.0
    if args.resume:
        state = load_state(run, "base")
        for name, module in modules.items():
            module.load_state_dict(state[name])
        optimizer.load_state_dict(state["optimizer"])
        ema.shadow = state["ema"]
        step, seconds = state["step"], state["seconds"]
    text_encoder.train()
    unet.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    alphas = scheduler.alphas_cumprod
    losses: list[float] = []
    while step < args.steps:
        start = time.perf_counter()
        generator = step_generator(args.seed, step, "base")
        images, captions = base_batch(args.seed, step, args.batch_size, generator)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, len(alphas), (args.batch_size,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        lr = warmup_lr(args.lr, step, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        context = text_encoder(ids).last_hidden_state
        loss = F.mse_loss(unet(noisy, timesteps, context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update(modules, step)
        step += 1
        seconds += time.perf_counter() - start
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            log(
                run,
                {
                    "stage": "base",
                    "step": step,
                    "loss": float(np.mean(losses)),
                    "lr": lr,
                    "seconds": round(seconds, 1),
                },
            )
            losses.clear()
        if step % args.save_every == 0 or step == args.steps:
            state = {name: module.state_dict() for name, module in modules.items()}
            state.update(
                optimizer=optimizer.state_dict(),
                ema=ema.shadow,
                step=step,
                seconds=seconds,
                args=vars(args),
            )
            save_state(run, "base", state)


# --------------------------------------------------------------------------------------------------
# Pipeline from a run: samples and export
# --------------------------------------------------------------------------------------------------


def run_pipeline(run: Path) -> tuple[Any, dict[str, Any]]:
    """The run's latest base checkpoint (EMA weights) as an SD pipeline, with its state."""
    state = load_state(run, "base")
    tokenizer = build_tokenizer(run / "tokenizer")
    text_encoder, unet = build_text_encoder(tokenizer), build_unet()
    text_encoder.load_state_dict(state["ema"]["text_encoder"])
    unet.load_state_dict(state["ema"]["unet"])
    return build_pipeline(unet, load_vae(run), text_encoder.eval(), tokenizer), state


def caption_sheet(
    images: Sequence[Image.Image], captions: Sequence[str], columns: int, scale: int = 2
) -> Image.Image:
    """Images in rows of `columns`, each row labelled with its caption on the left."""
    size = images[0].width * scale
    label = 230
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (label + columns * size, rows * size), "white")
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        sheet.paste(image.resize((size, size), Image.NEAREST), (label + c * size, r * size))
        if c == 0:
            draw.text((4, r * size + size // 2 - 6), captions[i], fill="black")
    return sheet


def sample(args: argparse.Namespace) -> None:
    run = Path(args.run)
    pipe, state = run_pipeline(run)
    prompts = list(args.prompt or _SAMPLE_PROMPTS)
    images, labels = [], []
    for prompt in prompts:
        generator = torch.Generator().manual_seed(args.seed)
        out = pipe(
            [prompt] * args.per_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=generator,
            output_type="pil",
        ).images
        images += out
        labels += [prompt.removeprefix("a photo of ")] * len(out)
    path = Path(args.image or run / f"samples-{state['step']}.png")
    caption_sheet(images, labels, args.per_prompt).save(path)
    print(path)


def logged(run: Path, stage: str, upto: int) -> tuple[float | None, list[list[float]]]:
    """From RUN/log.jsonl: the last logged mean loss up to step `upto`, and each learning-rate change.

    A single step's loss is too noisy to report; resumed stages may have changed the learning rate.
    """
    loss, changes = None, []
    for line in (run / "log.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["stage"] != stage or record["step"] > upto or "loss" not in record:
            continue
        loss = record["loss"]
        if "lr" in record and (not changes or changes[-1][1] != record["lr"]):
            changes.append([record["step"], record["lr"]])
    return loss, changes


def export(args: argparse.Namespace) -> None:
    """Write the float16 pipeline folder and its training record, replacing the destination at once."""
    run = Path(args.run)
    pipe, state = run_pipeline(run)
    dest = Path(args.dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pipeline(pipe, tmp)
    vae_state = load_state(run, "vae")
    record = {
        "steps": state["step"],
        "batch_size": state["args"]["batch_size"],
        "lr": state["args"]["lr"],
        "seed": state["args"]["seed"],
        "seconds": round(state["seconds"], 1),
        "final_loss": logged(run, "base", state["step"])[0],
        "lr_at_step": logged(run, "base", state["step"])[1],
        "ema_decay": _EMA_DECAY,
        "vae_steps": vae_state["step"],
        "vae_batch_size": vae_state["args"]["batch_size"],
        "vae_seconds": round(vae_state["seconds"], 1),
        "vae_final_loss": logged(run, "vae", vae_state["step"])[0],
        "vae_lr_at_step": logged(run, "vae", vae_state["step"])[1],
        "scaling_factor": pipe.vae.config.scaling_factor,
        "device": f"cpu: {cpu_model()}",
        "threads": state["args"]["threads"],
        "torch": torch.__version__,
        # Measured on what users load: the saved files (diffusers upcasts its models to float32).
        "caption_control": caption_control.measure(StableDiffusionPipeline.from_pretrained(str(tmp))),
    }
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    print(dest)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dreamblend.toyworld.train", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="stage", required=True)
    for stage, steps, batch, lr in (("vae", 2000, 16, 1e-3), ("base", 20000, 32, 5e-4)):
        s = sub.add_parser(stage, help=f"train the {stage} stage into --out")
        s.add_argument("--out", required=True, metavar="RUN", help="run folder (outside the repository)")
        s.add_argument("--steps", type=int, default=steps, help="total steps (a resumed run continues to it)")
        s.add_argument("--batch-size", type=int, default=batch)
        s.add_argument("--lr", type=float, default=lr)
        s.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--save-every", type=int, default=500, help="steps between resumable state files")
        s.add_argument("--log-every", type=int, default=50, help="steps per RUN/log.jsonl line")
        s.add_argument("--resume", action="store_true", help="continue from RUN's state file")
        if stage == "vae":
            s.add_argument(
                "--scale-images", type=int, default=512, help="renders that measure the latent std"
            )
    s = sub.add_parser("sample", help="a captioned sample grid from RUN's current EMA weights")
    s.add_argument("--run", required=True, metavar="RUN")
    s.add_argument("--prompt", action="append", help="prompt (repeatable; default: eight test captions)")
    s.add_argument("--per-prompt", type=int, default=6)
    s.add_argument("--steps", type=int, default=30, help="DDIM steps")
    s.add_argument("--guidance", type=float, default=4.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--image", metavar="PNG", help="output file (default RUN/samples-STEP.png)")
    s = sub.add_parser("export", help="write RUN's EMA weights as a float16 pipeline folder")
    s.add_argument("--run", required=True, metavar="RUN")
    s.add_argument("--dest", default=str(WEIGHTS_DIR), help="pipeline folder to (re)write")
    s.add_argument("--threads", type=int, default=1)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    {"vae": train_vae, "base": train_base, "sample": sample, "export": export}[args.stage](args)


if __name__ == "__main__":
    main()
