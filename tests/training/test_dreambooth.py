"""DreamBooth trajectories on tiny models: learning, schedule, loadable checkpoints, resume, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from dreamblend.cli import main
from dreamblend.testing import tiny_sd_components, tiny_sdxl_components
from dreamblend.training import (
    DreamBoothConfig,
    TrainingInputError,
    load_checkpoint,
    read_trajectory,
    train_dreambooth,
)
from dreamblend.training.data import list_images, prepare_image


def config(base, instance_dir, out, **kwargs) -> DreamBoothConfig:
    kwargs.setdefault("progress", False)
    return DreamBoothConfig(
        pretrained_model=str(base), instance_dir=instance_dir, output_dir=out, class_word="dog", **kwargs
    )


def log_records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@torch.no_grad()
def fixed_noise_loss(pipe: StableDiffusionPipeline, unet: UNet2DConditionModel, images, prompt: str) -> float:
    """Denoising loss on the training images at fixed noise and timesteps (no sampling noise)."""
    pixels = torch.stack([prepare_image(p, 32).pixels for p in images])
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    embeds = pipe.encode_prompt(prompt, "cpu", 1, False)[0].expand(len(images), -1, -1)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for t in (50, 250, 450, 650, 850):
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.full((len(images),), t)
        noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
        losses.append(torch.nn.functional.mse_loss(unet(noisy, timesteps, embeds).sample, noise))
    return float(torch.stack(losses).mean())


def test_full_finetune_learns_and_saves_the_schedule(sd_dir, two_dogs, tmp_path):
    out = tmp_path / "run"
    result = train_dreambooth(config(sd_dir, two_dogs, out, max_steps=30, batch_size=2, learning_rate=1e-3))

    steps = [5, 10, 15, 20, 25, 30]  # the paper schedule cut at 30 steps
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted(f"checkpoint-{s}" for s in steps)
    index = json.loads((out / "trajectory.json").read_text())
    assert (index["method"], index["mode"], index["token"], index["class"]) == (
        "dreambooth",
        "full",
        "sks",
        "dog",
    )
    assert index["prompt"] == "a photo of sks dog" and index["base_model"] == str(sd_dir.resolve())
    assert [c["step"] for c in index["checkpoints"]] == steps
    infos = read_trajectory(out)
    assert [i.step for i in infos] == steps and all(i.unet and not i.lora for i in infos)

    final = UNet2DConditionModel.from_pretrained(out / "checkpoint-30" / "unet")
    trained = result.pipeline.unet.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in final.state_dict().items())

    records = [r for r in log_records(out) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 31))
    first, last = (sum(r["loss"] for r in part) / 5 for part in (records[:5], records[-5:]))
    assert last < 0.7 * first

    base = StableDiffusionPipeline.from_pretrained(sd_dir)
    images = list_images(two_dogs, flag="--instance-dir")
    before = fixed_noise_loss(base, base.unet, images, "a photo of sks dog")
    after = fixed_noise_loss(base, final, images, "a photo of sks dog")
    assert after < 0.7 * before

    pipe = load_checkpoint(out / "checkpoint-30")
    assert all(torch.equal(v, trained[k]) for k, v in pipe.unet.state_dict().items())
    image = pipe("a photo of sks dog", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_dreamblend_pipeline_takes_the_checkpoints(sd_dir, two_dogs, tmp_path):
    """G and E straight from the trajectory: the edit UNet folder and the guidance checkpoint folder."""
    pipelines = pytest.importorskip("dreamblend.pipelines")
    if not hasattr(pipelines, "DreamBlendPipeline"):
        pytest.skip("DreamBlendPipeline is not part of this build")
    out = tmp_path / "run"
    train_dreambooth(config(sd_dir, two_dogs, out, max_steps=4, save_at="2,4", learning_rate=1e-3))
    guidance, edit = read_trajectory(out)
    pipe = pipelines.DreamBlendPipeline.from_pretrained(
        sd_dir, unet=UNet2DConditionModel.from_pretrained(edit.unet), guidance_unet=str(guidance.path)
    )
    expected = UNet2DConditionModel.from_pretrained(guidance.unet).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in pipe.guidance_unet.state_dict().items())
    image = pipe("a photo of sks dog", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


@torch.no_grad()
def unet_output(unet, latents, embeds, added=None):
    return unet(latents, torch.tensor([500]), embeds, added_cond_kwargs=added).sample


def test_lora_checkpoints_load_into_stable_diffusion(sd_dir, two_dogs, tmp_path):
    out = tmp_path / "run"
    result = train_dreambooth(
        config(sd_dir, two_dogs, out, mode="lora", max_steps=4, save_at="2,4", learning_rate=1e-2)
    )
    assert read_trajectory(out)[-1].lora == out / "checkpoint-4" / "pytorch_lora_weights.safetensors"
    assert not (out / "checkpoint-4" / "unet").exists()

    pipe = StableDiffusionPipeline(**tiny_sd_components())
    latents, embeds = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    base = unet_output(pipe.unet, latents, embeds)
    pipe.load_lora_weights(out / "checkpoint-4")
    loaded = unet_output(pipe.unet, latents, embeds)
    trained = unet_output(result.pipeline.unet, latents, embeds)
    assert not torch.allclose(base, loaded)
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)


def test_sdxl_lora(sdxl_dir, two_dogs, tmp_path):
    out = tmp_path / "run"
    result = train_dreambooth(
        config(sdxl_dir, two_dogs, out, mode="lora", max_steps=2, save_at="2", learning_rate=1e-2)
    )
    assert json.loads((out / "trajectory.json").read_text())["resolution"] == 64
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(), add_watermarker=False)
    latents, embeds = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 96)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    pipe.load_lora_weights(out / "checkpoint-2")
    torch.testing.assert_close(
        unet_output(pipe.unet, latents, embeds, added),
        unet_output(result.pipeline.unet, latents, embeds, added),
        rtol=1e-5,
        atol=1e-5,
    )


def test_prior_preservation_generates_missing_class_images(sd_dir, two_dogs, tmp_path):
    class_dir = tmp_path / "class"
    cfg = config(
        sd_dir, two_dogs, tmp_path / "run", max_steps=2, save_at="2", prior_preservation=True,
        class_dir=class_dir, num_class_images=3, class_inference_steps=2, class_batch_size=2,
    )  # fmt: skip
    train_dreambooth(cfg)
    assert sorted(p.name for p in class_dir.iterdir()) == [f"class-{i:05d}.png" for i in range(3)]
    records = [r for r in log_records(tmp_path / "run") if "loss" in r]
    assert all(r["loss"] == pytest.approx(r["loss_instance"] + r["loss_prior"], rel=1e-5) for r in records)


def test_resume_reproduces_the_uninterrupted_run(sd_dir, two_dogs, tmp_path):
    settings = dict(max_steps=6, save_at="2,4,6", batch_size=2, learning_rate=1e-3, lr_scheduler="linear",
                    lr_warmup_steps=2, state_every=3, keep_states=2)  # fmt: skip
    full = tmp_path / "full"
    train_dreambooth(config(sd_dir, two_dogs, full, **settings))
    assert sorted(p.name for p in full.glob("state-*")) == ["state-3", "state-6"]

    # The same run interrupted after step 5: its newest state is step 3, checkpoint 4 was already written.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "state-6")
    shutil.rmtree(cut / "checkpoint-6")
    train_dreambooth(config(sd_dir, two_dogs, cut, resume=True, **settings))

    for step in (4, 6):
        a = UNet2DConditionModel.from_pretrained(full / f"checkpoint-{step}/unet").state_dict()
        b = UNet2DConditionModel.from_pretrained(cut / f"checkpoint-{step}/unet").state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [c.step for c in read_trajectory(cut)] == [2, 4, 6]
    log = log_records(cut)
    assert {"event": "resume", "step": 3} in log
    resumed = [r for r in log if r.get("step", 0) > 3 and "loss" in r][-3:]
    original = [r for r in log_records(full) if r["step"] > 3]
    assert [(r["loss"], r["lr"]) for r in resumed] == [(r["loss"], r["lr"]) for r in original]


def test_two_processes_match_one_process_with_the_double_batch(sd_dir, two_dogs, tmp_path):
    """``torchrun``/``accelerate launch``: gradients are averaged across processes, samples split by rank."""
    args = ["--model", str(sd_dir), "--instance-dir", str(two_dogs), "--class", "dog", "--max-steps", "3",
            "--save-at", "3", "--lr", "1e-3", "--no-progress"]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [
        *launch,
        "-m",
        "dreamblend.cli",
        "train",
        "dreambooth",
        *args,
        "--output",
        str(tmp_path / "two"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trajectory:") == 1  # printed by the main process only
    assert main(["train", "dreambooth", *args, "--batch-size", "2", "--output", str(tmp_path / "one")]) == 0

    two, one = (log_records(tmp_path / run) for run in ("two", "one"))
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    a, b = (
        UNet2DConditionModel.from_pretrained(tmp_path / run / "checkpoint-3/unet") for run in ("two", "one")
    )
    sb = b.state_dict()
    assert all(torch.allclose(v, sb[k], atol=1e-3, rtol=0) for k, v in a.state_dict().items())


def test_output_folder_and_resume_errors(sd_dir, two_dogs, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingInputError, match="no training state"):
        train_dreambooth(config(sd_dir, two_dogs, out, max_steps=2, save_at="2", resume=True))
    train_dreambooth(config(sd_dir, two_dogs, out, max_steps=2, save_at="2"))
    with pytest.raises(TrainingInputError, match="already holds a training run; pass --resume"):
        train_dreambooth(config(sd_dir, two_dogs, out, max_steps=2, save_at="2"))
    with pytest.raises(TrainingInputError, match="settings differ .*seed: 0 -> 1"):
        train_dreambooth(config(sd_dir, two_dogs, out, max_steps=2, save_at="2", resume=True, seed=1))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"instance_dir": "EMPTY"}, "--instance-dir .* holds no images"),
        ({"instance_dir": "TEXT"}, "other file\\(s\\)"),
        ({"max_steps": 100, "save_at": "paper,5"}, "neither 'paper' nor"),
        ({"max_steps": 20, "save_at": "5,10,40"}, "steps \\[40\\] beyond the 20 training steps; raise"),
        ({"mode": "dora"}, "--mode must be one of full, lora"),
        ({"prior_preservation": True}, "prior preservation needs --class-dir"),
        ({"instance_prompt": "a photo of {subject}"}, "unknown placeholder 'subject'"),
    ],
)
def test_bad_input_is_reported_before_training(sd_dir, two_dogs, tmp_path, change, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "TEXT").mkdir()
    (tmp_path / "TEXT" / "readme.txt").write_text("no images here")
    values = {"instance_dir": two_dogs, **change}
    if values["instance_dir"] in ("EMPTY", "TEXT"):
        values["instance_dir"] = tmp_path / values["instance_dir"]
    cfg = DreamBoothConfig(
        pretrained_model=str(sd_dir), output_dir=tmp_path / "run", class_word="dog", progress=False, **values
    )
    with pytest.raises(TrainingInputError, match=message):
        train_dreambooth(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_bf16_mixed_precision_on_cpu_trains_in_bf16_and_saves_float32(sd_dir, two_dogs, tmp_path, mode):
    runs = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)  # one precision per accelerate state
        out = tmp_path / precision
        settings = dict(mode=mode, max_steps=3, save_at="3", learning_rate=1e-3, mixed_precision=precision)
        train_dreambooth(config(sd_dir, two_dogs, out, **settings))
        runs[precision] = ([r["loss"] for r in log_records(out) if "loss" in r], out / "checkpoint-3")
    (losses, _), (bf16_losses, checkpoint) = runs["no"], runs["bf16"]
    assert bf16_losses != losses  # autocast was on...
    np.testing.assert_allclose(bf16_losses, losses, rtol=1e-2)  # ...and computed the same loss
    files = (
        [checkpoint / "unet" / "diffusion_pytorch_model.safetensors"]
        if mode == "full"
        else [checkpoint / "pytorch_lora_weights.safetensors"]
    )
    assert {v.dtype for v in load_file(files[0]).values()} == {torch.float32}  # master weights saved


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 on CPU only")
def test_fp16_on_cpu_is_refused_not_silently_float32(sd_dir, two_dogs, tmp_path):
    with pytest.raises(TrainingInputError, match="fp16 mixed precision needs a GPU"):
        train_dreambooth(config(sd_dir, two_dogs, tmp_path / "run", mixed_precision="fp16"))
    assert not (tmp_path / "run").exists()


def test_cli(sd_dir, two_dogs, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "dreambooth", "--model", str(sd_dir), "--instance-dir", str(two_dogs), "--class", "dog"]
    assert (
        main(
            [
                *args,
                "--output",
                str(out),
                "--max-steps",
                "3",
                "--save-at",
                "1,3",
                "--no-progress",
                "--mode",
                "lora",
            ]
        )
        == 0
    )
    assert f"trajectory: {out / 'trajectory.json'}" in capsys.readouterr().out
    assert [c.step for c in read_trajectory(out)] == [1, 3]
    assert main([*args, "--output", str(tmp_path / "bad"), "--max-steps", "3", "--save-at", "5"]) == 2
    err = capsys.readouterr().err
    assert (
        "dreamblend train dreambooth: error: --save-at asks for steps [5] beyond the 3 training steps" in err
    )
