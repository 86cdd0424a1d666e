"""``train jedi``: the supplement's per-image mask, whole-set batches, full/LoRA checkpoints, resuming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from dreamblend.jedi.train import CONV_IN_FILE, JeDiConfig, JeDiTrainer
from dreamblend.training.errors import TrainingInputError


def config(base: Path, data: Path, out: Path, **kwargs) -> JeDiConfig:
    settings = {"max_steps": 2, "batch_size": 2, "mixed_precision": "no", "progress": False, **kwargs}
    return JeDiConfig(pretrained_model=str(base), instance_dir=data, output_dir=out, **settings)


def test_full_checkpoint_is_a_trained_jedi_unet(full_checkpoint: Path) -> None:
    manifest = json.loads((full_checkpoint / "checkpoint.json").read_text())
    assert manifest["method"] == "jedi" and manifest["set_size"] == 3 and manifest["unet"] == "unet"
    unet = UNet2DConditionModel.from_pretrained(full_checkpoint / "unet")
    assert unet.config.in_channels == 9
    # the x0 and mask channels started at zero; two steps at lr 1e-3 moved them
    assert unet.conv_in.weight[:, 4:].abs().max() > 0


def test_batches_follow_the_supplement(sd_dir: Path, stacked_dir: Path, tmp_path: Path) -> None:
    trainer = JeDiTrainer(config(sd_dir, stacked_dir, tmp_path / "run", max_steps=1, batch_size=4))
    trainer.run()
    n, masks = trainer.set_size, []
    for step in range(1, 101):
        batch = trainer.make_batch(step)
        assert batch.latents.shape[0] == 4 * n
        sets = batch.timesteps.reshape(4, n)
        assert (sets == sets[:, :1]).all()  # one timestep per set
        mask = batch.mask.reshape(4, n)
        masks.append(mask)
        known = batch.known.reshape(4, n, -1)
        # x0 is the clean latent of every image, or zero for a whole set (image dropout)
        dropped = known.abs().amax(dim=(1, 2)) == 0
        kept = ~dropped
        torch.testing.assert_close(known[kept], batch.latents.reshape(4, n, -1)[kept])
        assert trainer.make_batch(step).mask.equal(batch.mask)  # a function of the step
    masks = torch.cat(masks)
    # Bernoulli(0.5) per image: 1200 draws, standard error 0.0144; 0.06 is over four of them.
    assert abs(masks.mean().item() - 0.5) < 0.06
    # per image, not per set: sets with both known and unknown images are common (3/4 of sets)
    mixed = ((masks.sum(dim=1) > 0) & (masks.sum(dim=1) < n)).float().mean().item()
    assert 0.6 < mixed < 0.9


def test_lora_run_resumes_to_the_same_result(sd_dir: Path, folder_dir: Path, tmp_path: Path) -> None:
    """Sets of 3 and 4 images as folders, trained at set size 3 (the 4-set is sub-sampled)."""
    settings = {"mode": "lora", "max_steps": 3, "state_every": 1, "keep_states": 5, "save_at": [2, 3]}
    out = tmp_path / "run"
    JeDiTrainer(config(sd_dir, folder_dir, out, **settings)).run()
    manifest = json.loads((out / "checkpoint-3" / "checkpoint.json").read_text())
    assert manifest["lora"] and manifest["set_size"] == 3 and (out / "checkpoint-3" / CONV_IN_FILE).is_file()
    first = {
        **load_file(out / "checkpoint-3" / manifest["lora"]),
        **load_file(out / "checkpoint-3" / CONV_IN_FILE),
    }
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    shutil.rmtree(out / "state-3")  # as if killed after step 2
    JeDiTrainer(config(sd_dir, folder_dir, out, resume=True, **settings)).run()
    again = {
        **load_file(out / "checkpoint-3" / manifest["lora"]),
        **load_file(out / "checkpoint-3" / CONV_IN_FILE),
    }
    assert first.keys() == again.keys()
    for name, tensor in first.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=0, msg=name)


def test_bad_settings_are_clear_errors(
    sd_dir: Path, folder_dir: Path, stacked_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(TrainingInputError, match="exceeds the smallest set's 3 images"):
        JeDiTrainer(config(sd_dir, folder_dir, tmp_path / "a", set_size=4)).run()
    with pytest.raises(TrainingInputError, match="--set-size must be >= 2"):
        JeDiTrainer(config(sd_dir, stacked_dir, tmp_path / "b", set_size=1)).run()
    with pytest.raises(TrainingInputError, match="--mask-probability must lie in"):
        JeDiTrainer(config(sd_dir, stacked_dir, tmp_path / "c", mask_probability=1.5)).run()
    with pytest.raises(TrainingInputError, match="--loss-on must be one of"):
        JeDiTrainer(config(sd_dir, stacked_dir, tmp_path / "d", loss_on="known")).run()
