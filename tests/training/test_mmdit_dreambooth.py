"""DreamBooth-LoRA on tiny SD3 and FLUX pipelines: the flow-matching step against hand-written formulas,
learning, trajectories whose files load as DreamBlend's E (and G), resume, refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from torch import Tensor

from dreamblend.cli import main
from dreamblend.testing_mmdit import tiny_flux_components, tiny_sd3_components
from dreamblend.training import (
    DreamBoothConfig,
    TrainingInputError,
    load_checkpoint,
    read_trajectory,
    train_dreambooth,
)
from dreamblend.training.data import derive_seed, image_at, list_images, prepare_image
from dreamblend.training.mmdit import MMDiTDreamBoothTrainer, is_mmdit_model

MODELS = ("sd3", "flux")
PROMPT = "a photo of sks dog"


def components(name: str) -> dict:
    """The tiny pipeline; SD3 with its T5, so the saved folder loads with a plain ``from_pretrained`` like a
    real SD3 checkpoint."""
    return tiny_sd3_components(t5=True) if name == "sd3" else tiny_flux_components()


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mmdit_bases")
    StableDiffusion3Pipeline(**components("sd3")).save_pretrained(root / "sd3")
    FluxPipeline(**components("flux")).save_pretrained(root / "flux")
    return {"sd3": root / "sd3", "flux": root / "flux"}


def config(base: Path, instance_dir, out, **kwargs) -> DreamBoothConfig:
    settings = {"mode": "lora", "resolution": 32, "progress": False, **kwargs}
    return DreamBoothConfig(
        pretrained_model=str(base), instance_dir=instance_dir, output_dir=out, class_word="dog", **settings
    )


def losses(out: Path) -> list[float]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


# ------------------------------------------------------------------------------- hand-written conventions


def shifted_sigma(index: Tensor, shift: float, steps: int = 1000) -> Tensor:
    """Flow-matching schedule, float64: ``s = 1 - i / N``, shifted to ``shift s / (1 + (shift - 1) s)``."""
    s = 1.0 - index.double() / steps
    return shift * s / (1.0 + (shift - 1.0) * s)


def pack(latents: Tensor) -> Tensor:
    """FLUX's 2x2 patch sequence: ``(n, c, h, w) -> (n, h/2 * w/2, 4c)``, patches in row-major order."""
    n, c, h, w = latents.shape
    patches = latents.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), 4 * c)


def model_inputs(name: str, pipe, noisy: Tensor, sigma: Tensor, embeds: Tensor, pooled: Tensor) -> dict:
    """What the stock pipelines hand the transformer for latents ``noisy`` at noise level ``sigma``."""
    if name == "sd3":
        return {
            "hidden_states": noisy,
            "timestep": 1000 * sigma,
            "encoder_hidden_states": embeds,
            "pooled_projections": pooled,
        }
    n, _, h, w = noisy.shape
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    image_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    return {
        "hidden_states": pack(noisy),
        "timestep": sigma,
        "encoder_hidden_states": embeds,
        "pooled_projections": pooled,
        "img_ids": image_ids,
        "txt_ids": torch.zeros(embeds.shape[1], 3),
        "guidance": torch.full((n,), 1.0),
    }


def prepared_trainer(base: Path, instance_dir, out, **kwargs) -> MMDiTDreamBoothTrainer:
    """A trainer set up as ``run`` sets it up, without training."""
    trainer = MMDiTDreamBoothTrainer(config(base, instance_dir, out, **kwargs))
    trainer.validate()
    trainer.accelerator = Accelerator()
    trainer.device = trainer.accelerator.device
    trainer.setup()
    return trainer


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "cosmap"])
@pytest.mark.parametrize("name", MODELS)
def test_noising_target_and_inputs_follow_the_flow_matching_formulas(bases, two_dogs, tmp_path, name, scheme):
    trainer = prepared_trainer(bases[name], two_dogs, tmp_path / "run", batch_size=2, weighting_scheme=scheme)
    pipe, seed = trainer.pipe, trainer.config.seed
    batch = trainer.make_batch(step=3)

    # Replay each sample's generator (seeded by its global position): posterior draw, noise, then u.
    bank, vae = trainer.sources[0].bank, pipe.vae.config
    x0, noise, index = [], [], []
    for pos in (4, 5):  # step 3, batch 2
        g = torch.Generator().manual_seed(derive_seed(seed, 0, pos))
        image = image_at(len(bank), pos, seed=derive_seed(seed, 0))
        eps = torch.randn(bank.mean.shape[1:], generator=g).double()
        sample = bank.mean[image].double() + bank.std[image].double() * eps
        x0.append((sample - vae.shift_factor) * vae.scaling_factor)
        noise.append(torch.randn(eps.shape, generator=g).double())
        z = torch.randn(1, generator=g) if scheme == "logit_normal" else torch.rand(1, generator=g)
        u = torch.sigmoid(z.double()) if scheme == "logit_normal" else z.double()
        index.append(math.floor(float(u) * 1000))
    x0, noise = torch.stack(x0), torch.stack(noise)
    shift = 1.0 if pipe.scheduler.config.use_dynamic_shifting else pipe.scheduler.config.shift
    sigma = shifted_sigma(torch.tensor(index), shift)
    # float32 schedule and latents vs the float64 formulas: a few float32 ulps.
    torch.testing.assert_close(batch.sigmas.double(), sigma, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(batch.latents.double(), x0, rtol=1e-5, atol=1e-6)
    weight = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)) if scheme == "cosmap" else torch.ones(2).double()
    torch.testing.assert_close(batch.weights.double(), weight, rtol=1e-6, atol=0)

    seen = {}
    hook = trainer.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    pred, target = trainer.predict(batch)
    hook.remove()
    s = sigma.view(-1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    conditioning = trainer.sources[0].conditioning
    embeds, pooled = conditioning.embeds.expand(2, -1, -1), conditioning.pooled.expand(2, -1)
    expected = model_inputs(name, pipe, noisy.float(), sigma.float(), embeds, pooled)
    # float32 arithmetic vs float64 formulas on O(1) values: errors of a few ulps (~1e-7), far below 1e-5.
    assert set(expected) <= set(seen)
    for key, value in expected.items():
        torch.testing.assert_close(seen[key].double(), value.double(), rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(target.double(), noise - x0, rtol=1e-5, atol=1e-6)

    # The loss: per-sample weighted squared error of the velocity, averaged.
    terms = trainer.losses(pred, target, batch)
    # float32 mean over ~2k elements vs float64: relative error ~sqrt(2k) * 6e-8 = 3e-6 at most.
    by_hand = (weight.view(-1, 1, 1, 1) * (pred.double() - (noise - x0)) ** 2).mean()
    torch.testing.assert_close(terms["loss"].double(), by_hand, rtol=1e-5, atol=0)


@torch.no_grad()
def fixed_batch_loss(name: str, pipe, transformer, images) -> float:
    """Flow-matching loss on the training images at fixed noise and noise levels (no sampling noise)."""
    pixels = torch.stack([prepare_image(p, 32).pixels for p in images])
    vae = pipe.vae
    x0 = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    if name == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)
    else:
        embeds, pooled, _ = pipe.encode_prompt(PROMPT, None)
    embeds, pooled = embeds.expand(len(images), -1, -1), pooled.expand(len(images), -1)
    generator, total = torch.Generator().manual_seed(0), []
    for level in (0.2, 0.4, 0.6, 0.8):
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.full((len(images),), level)
        noisy = (1 - level) * x0 + level * noise
        pred = transformer(**model_inputs(name, pipe, noisy, sigma, embeds, pooled), return_dict=False)[0]
        target = pack(noise - x0) if name == "flux" else noise - x0
        total.append(torch.nn.functional.mse_loss(pred, target))
    return float(torch.stack(total).mean())


@pytest.mark.parametrize("name", MODELS)
def test_lora_learns_trains_only_lora_and_saves_a_trajectory(bases, two_dogs, tmp_path, name):
    out = tmp_path / "run"
    result = train_dreambooth(config(bases[name], two_dogs, out, max_steps=30, save_at="10,20,30",
                                     batch_size=2, learning_rate=3e-2))  # fmt: skip
    index = json.loads((out / "trajectory.json").read_text())
    assert (index["method"], index["mode"], index["base_model"]) == ("dreambooth", "lora", str(bases[name]))
    infos = read_trajectory(out)
    assert [i.step for i in infos] == [10, 20, 30]
    assert all(i.lora == i.path / "pytorch_lora_weights.safetensors" and i.unet is None for i in infos)

    base = DiffusionPipeline.from_pretrained(bases[name])
    trained = result.pipeline.transformer
    untouched = base.transformer.state_dict()
    for key, value in trained.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, untouched[key.replace(".base_layer", "")]), key
    # B starts at zero; a few stay there (SD3's last block drops its text stream: add_q_proj gets no grad).
    lora_b = [v for k, v in trained.state_dict().items() if "lora_B" in k]
    assert sum(bool(v.abs().max() > 0) for v in lora_b) > len(lora_b) // 2

    images = list_images(two_dogs, flag="--instance-dir")
    before = fixed_batch_loss(name, base, base.transformer, images)
    after = fixed_batch_loss(name, base, trained, images)
    assert after < 0.9 * before, (before, after)
    reloaded = load_checkpoint(out / "checkpoint-30")  # the base model from the manifest + the LoRA file
    assert fixed_batch_loss(name, base, reloaded.transformer, images) == pytest.approx(after, rel=1e-5)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # G and E: two adapters
@pytest.mark.parametrize("name", MODELS)
def test_checkpoints_load_unchanged_as_dreamblend_guidance_and_edit(bases, two_dogs, tmp_path, name):
    from dreamblend.mmdit import DreamBlendFluxPipeline, DreamBlendSD3Pipeline

    out = tmp_path / "run"
    result = train_dreambooth(config(bases[name], two_dogs, out, max_steps=4, save_at="2,4",
                                     learning_rate=1e-2))  # fmt: skip
    early, late = read_trajectory(out)
    cls = DreamBlendSD3Pipeline if name == "sd3" else DreamBlendFluxPipeline
    pipe = cls(**components(name))
    pipe.set_progress_bar_config(disable=True)
    for role, info in (("guidance", early), ("edit", late)):
        pipe.load_lora_weights(info.path, weight_name=info.lora.name, adapter_name=role)
        saved = load_file(info.lora)
        loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=role)
        assert {f"transformer.{k}" for k in loaded} == set(saved)
        assert all(torch.equal(v, saved[f"transformer.{k}"]) for k, v in loaded.items())

    # E with its adapter computes what the trained transformer computes.
    pipe.transformer.set_adapters("edit")
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(1, 4, 16, 16, generator=generator)
    embeds, pooled = torch.randn(1, 9, 32, generator=generator), torch.randn(1, 32, generator=generator)
    if name == "sd3":
        pooled = torch.randn(1, 64, generator=generator)
    inputs = model_inputs(name, pipe, noisy, torch.tensor([0.5]), embeds, pooled)
    with torch.no_grad():
        loaded = pipe.transformer(**inputs, return_dict=False)[0]
        trained = result.pipeline.transformer(**inputs, return_dict=False)[0]
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)

    call = {"height": 32, "width": 32, "num_inference_steps": 2, "output_type": "np"}
    if name == "flux":
        call["max_sequence_length"] = 8
    images = pipe(PROMPT, guidance_adapter="guidance", edit_adapter="edit", **call).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("name", MODELS)
def test_resume_reproduces_the_uninterrupted_run(bases, two_dogs, tmp_path, name):
    settings = dict(max_steps=6, save_at="2,4,6", batch_size=2, learning_rate=1e-2, lr_scheduler="linear",
                    lr_warmup_steps=2, state_every=3, keep_states=2,
                    weighting_scheme="logit_normal")  # fmt: skip
    full = tmp_path / "full"
    train_dreambooth(config(bases[name], two_dogs, full, **settings))
    cut = tmp_path / "cut"  # interrupted after step 5: newest state 3, checkpoint 4 written
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "state-6")
    shutil.rmtree(cut / "checkpoint-6")
    train_dreambooth(config(bases[name], two_dogs, cut, resume=True, **settings))
    for step in (4, 6):
        a, b = (load_file(run / f"checkpoint-{step}/pytorch_lora_weights.safetensors") for run in (full, cut))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(cut)[-3:] == losses(full)[-3:]


@pytest.mark.parametrize("name", MODELS)
def test_prior_preservation_with_class_images_from_the_base_model(bases, two_dogs, tmp_path, name):
    class_dir = tmp_path / "class"
    cfg = config(bases[name], two_dogs, tmp_path / "run", max_steps=2, save_at="2", prior_preservation=True,
                 class_dir=class_dir, num_class_images=2, class_inference_steps=2,
                 class_batch_size=2)  # fmt: skip
    train_dreambooth(cfg)
    assert sorted(p.name for p in class_dir.iterdir()) == ["class-00000.png", "class-00001.png"]
    lines = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "loss" in r]
    assert all(r["loss"] == pytest.approx(r["loss_instance"] + r["loss_prior"], rel=1e-5) for r in records)


def test_dispatch_full_finetune_refusal_and_cli(bases, two_dogs, sd_dir, tmp_path, capsys):
    assert is_mmdit_model(bases["sd3"]) and is_mmdit_model(bases["flux"]) and not is_mmdit_model(sd_dir)
    with pytest.raises(TrainingInputError, match="full fine-tuning of an SD3/FLUX transformer .*memory"):
        train_dreambooth(config(bases["flux"], two_dogs, tmp_path / "full", mode="full"))
    assert not (tmp_path / "full").exists()
    with pytest.raises(TrainingInputError, match="--weighting-scheme must be one of"):
        train_dreambooth(config(bases["sd3"], two_dogs, tmp_path / "bad", weighting_scheme="uniform"))
    with pytest.raises(TrainingInputError, match="apply to SD3/FLUX models only"):
        train_dreambooth(
            config(sd_dir, two_dogs, tmp_path / "unet", weighting_scheme="cosmap", resolution=None)
        )

    args = ["train", "dreambooth", "--model", str(bases["sd3"]), "--instance-dir", str(two_dogs), "--class",
            "dog", "--resolution", "32", "--max-steps", "2", "--save-at", "1,2", "--no-progress"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "cli"), "--lora"]) == 0
    assert f"trajectory: {tmp_path / 'cli' / 'trajectory.json'}" in capsys.readouterr().out
    assert [c.step for c in read_trajectory(tmp_path / "cli")] == [1, 2]
    assert main([*args, "--output", str(tmp_path / "cli-full")]) == 2
    assert "not supported" in capsys.readouterr().err


def test_an_sd3_folder_saved_without_t5_trains(two_dogs, tmp_path):
    """SD3 saved without its T5 (``text_encoder_3=None``: null in the index) loads so; T5 tokens are zeros."""
    StableDiffusion3Pipeline(**tiny_sd3_components()).save_pretrained(tmp_path / "sd3")
    result = train_dreambooth(config(tmp_path / "sd3", two_dogs, tmp_path / "run", max_steps=1, save_at="1"))
    assert result.pipeline.text_encoder_3 is None
    assert [c.step for c in read_trajectory(tmp_path / "run")] == [1]
