"""The toy world's base model is a real SD pipeline folder, and its training resumes exactly.

Nothing here trains for more than a few steps at batch 2: the point is loadability, determinism and
the resume contract, not image quality.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline

import dreamblend.toyworld.model as model
from dreamblend.checkpoints import load_pipeline
from dreamblend.toyworld import SUBJECT_TOKEN, VOCABULARY
from dreamblend.toyworld.train import main as train


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return model.build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_every_vocabulary_word_is_one_token(tokenizer):
    assert tokenizer.model_max_length == 77
    for word in VOCABULARY:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tokenizer.convert_ids_to_tokens(ids))
    ids = tokenizer("a photo of a red cube on the grass").input_ids
    assert len(ids) == 9 + 2


def test_training_schedule_is_the_sampler_schedule():
    assert torch.equal(model.ddpm_scheduler().alphas_cumprod, model.ddim_scheduler().alphas_cumprod)
    assert model.ddpm_scheduler().config.prediction_type == "epsilon"


def test_saved_pipeline_loads_with_diffusers_and_dreamblend(tokenizer, tmp_path):
    vae = model.build_vae(scaling_factor=0.7)
    pipe = model.build_pipeline(model.build_unet(), vae, model.build_text_encoder(tokenizer), tokenizer)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    folder = model.save_pipeline(pipe, tmp_path / "base")
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items()), "saving changed pipe"
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False

    loaded = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    assert loaded.unet.dtype == torch.float32 and loaded.vae.config.scaling_factor == 0.7
    for key, value in loaded.unet.state_dict().items():
        assert torch.equal(value, before[key].half().float()), key
    ours = load_pipeline(folder, torch_dtype=torch.float32)
    assert type(ours).__name__ == "DreamBlendPipeline"
    assert ours.unet.config.cross_attention_dim == ours.text_encoder.config.hidden_size


def test_base_model_path_names_the_training_command_when_weights_are_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(model, "WEIGHTS_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="dreamblend.toyworld.train vae"):
        model.base_model_path()


def _states(run, stage):
    return torch.load(run / f"{stage}-state.pt", weights_only=False)


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _common(steps, *extra):
    return ["--steps", str(steps), "--batch-size", "2", "--threads", str(torch.get_num_threads()), *extra]


def test_training_resumes_to_the_uninterrupted_weights_and_exports(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    vae_args = ["--scale-images", "4", "--warmup", "2"]
    train(["vae", "--out", str(full), *_common(2, *vae_args)])
    train(["vae", "--out", str(split), *_common(1, *vae_args)])
    with pytest.raises(SystemExit, match="--resume"):
        train(["vae", "--out", str(split), *_common(2, *vae_args)])
    train(["vae", "--out", str(split), "--resume", *_common(2, *vae_args)])
    _assert_same(_states(full, "vae")["vae"], _states(split, "vae")["vae"])
    _assert_same(_states(full, "vae")["optimizer"], _states(split, "vae")["optimizer"])
    assert (full / "vae_recon.png").is_file()

    # The base stage on one VAE, so that only the interruption differs between the two runs.
    shutil.rmtree(split / "vae")
    shutil.copytree(full / "vae", split / "vae")
    train(["base", "--out", str(full), *_common(3, "--warmup", "2")])
    train(["base", "--out", str(split), *_common(2, "--warmup", "2")])
    train(["base", "--out", str(split), "--resume", *_common(3, "--warmup", "2")])
    a, b = _states(full, "base"), _states(split, "base")
    for key in ("unet", "text_encoder", "ema", "optimizer", "step"):
        _assert_same(a[key], b[key], key)
    assert a["step"] == 3

    # The never-seen subject token is neither trained nor decayed: it stays a random, unused vector.
    tokenizer = model.build_tokenizer(tmp_path / "tok")
    sks = tokenizer.convert_tokens_to_ids(SUBJECT_TOKEN + "</w>")
    initial = model.build_text_encoder(tokenizer).get_input_embeddings().weight
    encoder = model.build_text_encoder(tokenizer)
    encoder.load_state_dict(a["text_encoder"])
    trained = encoder.get_input_embeddings().weight
    assert torch.equal(trained[sks], initial[sks])
    words = [tokenizer.convert_tokens_to_ids(w + "</w>") for w in VOCABULARY if w != SUBJECT_TOKEN]
    assert any(not torch.equal(trained[i], initial[i]) for i in words)

    dest = tmp_path / "export"
    train(["export", "--run", str(full), "--dest", str(dest)])
    record = json.loads((dest / "training.json").read_text())
    assert record["steps"] == 3 and record["batch_size"] == 2 and record["torch"] == torch.__version__
    pipe = StableDiffusionPipeline.from_pretrained(str(dest), torch_dtype=torch.float32)
    assert pipe.unet.state_dict()["conv_in.weight"].equal(a["ema"]["unet"]["conv_in.weight"].half().float())


def test_shipped_weights_make_a_finite_image():
    try:
        folder = model.base_model_path()
    except FileNotFoundError:
        pytest.skip("no shipped toy-world weights")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a photo of a red cube on the grass",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    assert json.loads((folder / "training.json").read_text())["steps"] > 0
