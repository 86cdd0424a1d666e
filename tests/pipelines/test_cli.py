"""`dreamblend generate` and `dreamblend batch` end to end on tiny pipelines saved to disk."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import read_manifest, read_pixels, write_jobs
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from PIL import Image
from pipeline_helpers import PROMPT, add_random_lora, custom_diffusion_unet, gen

from dreamblend import DreamBlendPipeline
from dreamblend.cli import main
from dreamblend.commands import batch as batch_command
from dreamblend.testing import save_tiny_pipeline, tiny_sd_components, tiny_sd_pipeline, tiny_sdxl_components

COMMON = ["--steps", "2", "--height", "16", "--width", "16"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A base pipeline, a full G checkpoint (a unet/ folder) and LoRA files for G and E."""
    root = tmp_path_factory.mktemp("models")
    paths = {"base": save_tiny_pipeline(tiny_sd_pipeline(0), root / "base")}
    tiny_sd_components(1)["unet"].save_pretrained(root / "checkpoint-100" / "unet")
    paths["g"] = root / "checkpoint-100"
    unet = tiny_sd_components(0)["unet"]
    for name, seed in (("early", 10), ("late", 11)):
        add_random_lora(unet, name, seed)
        StableDiffusionPipeline.save_lora_weights(
            root / name, unet_lora_layers=get_peft_model_state_dict(unet, adapter_name=name)
        )
        paths[name] = root / name / "pytorch_lora_weights.safetensors"
    return paths


def test_generate_writes_what_the_pipeline_makes(models, tmp_path):
    out = tmp_path / "out" / "dog.png"
    args = ["generate", PROMPT, "--model", str(models["base"]), "--guidance-model", str(models["g"])]
    assert main([*args, *COMMON, "--alpha", "0.5", "--seed", "3", "--out", str(out), "--save-reference"]) == 0
    pipe = DreamBlendPipeline.from_pretrained(models["base"], guidance_unet=str(models["g"]))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        PROMPT,
        num_inference_steps=2,
        height=16,
        width=16,
        cross_attention_guidance_scale=0.5,
        generator=gen(3),
        return_reference=True,
    )
    assert np.abs(read_pixels(out) - np.asarray(expected.images[0], dtype=np.int16)).max() <= 1
    reference = out.with_name("dog_reference.png")
    assert (
        np.abs(read_pixels(reference) - np.asarray(expected.reference_images[0], dtype=np.int16)).max() <= 1
    )
    assert not list(out.parent.glob(".*"))  # no temporary files left behind


def test_generate_with_lora_files_matches_in_memory_adapters(models, lora_unet, tmp_path):
    base = ["generate", PROMPT, "--model", str(models["base"]), *COMMON, "--alpha", "1", "--seed", "1"]
    adapters = tmp_path / "adapters.png"
    assert main([*base, "--guidance-adapter", str(models["early"]), "--edit-adapter", str(models["late"]),
                 "--out", str(adapters)]) == 0  # fmt: skip
    as_model = tmp_path / "as_model.png"  # a LoRA (or a checkpoint folder holding one) as --*-model
    assert main([*base, "--guidance-model", str(models["early"]), "--edit-model", str(models["late"].parent),
                 "--out", str(as_model)]) == 0  # fmt: skip
    pipe = DreamBlendPipeline(**{**tiny_sd_components(0), "unet": lora_unet})
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        PROMPT, num_inference_steps=2, height=16, width=16, cross_attention_guidance_scale=1.0,
        guidance_adapter="early", edit_adapter="late", generator=gen(1),
    ).images[0]  # fmt: skip
    assert np.abs(read_pixels(adapters) - np.asarray(expected, dtype=np.int16)).max() <= 1
    np.testing.assert_array_equal(read_pixels(as_model), read_pixels(adapters))
    base_g = tmp_path / "base_g.png"  # only E given: G is the base model
    assert main([*base, "--edit-adapter", str(models["late"]), "--out", str(base_g)]) == 0
    assert not np.array_equal(read_pixels(base_g), read_pixels(adapters))


def test_generate_custom_diffusion_file_and_real_image(models, tmp_path):
    custom_diffusion_unet(train_q_out=False).save_attn_procs(tmp_path / "cd")
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(photo)
    out = tmp_path / "edit.png"
    args = ["generate", PROMPT, "--model", str(models["base"]), "--guidance-model", str(models["g"])]
    edit = str(tmp_path / "cd" / "pytorch_custom_diffusion_weights.safetensors")
    assert main([*args, "--edit-model", edit, *COMMON, "--image", str(photo), "--out", str(out)]) == 0
    assert Image.open(out).size == (16, 16)


def test_generate_errors_name_the_fix(models, tmp_path, capsys):
    args = ["generate", PROMPT, "--model", str(models["base"]), *COMMON]
    (tmp_path / "file").write_text("")
    assert main([*args, "--guidance-model", str(models["g"]), "--out", str(tmp_path / "file" / "x.png")]) == 2
    assert "cannot write to output directory" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "x.png")]) == 2
    assert "--guidance-model" in capsys.readouterr().err
    pickled = tmp_path / "pickled"
    tiny_sd_components(1)["unet"].save_pretrained(pickled / "unet", safe_serialization=False)
    assert main([*args, "--guidance-model", str(pickled), "--out", str(tmp_path / "x.png")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    ok = ["--guidance-model", str(pickled), "--allow-pickle", "--out", str(tmp_path / "x.png")]
    assert main([*args, *ok]) == 0
    assert main([*args, "--guidance-model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        main([*args, "--guidance-model", str(models["g"]), "--alpha", "-1", "--out", str(tmp_path / "x.png")])
        == 2
    )
    assert "finite number >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--guidance-steps", "half"])
    assert "fraction range like 0:0.5" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ batch


def _jobs(models: dict[str, Path], folder: Path, **overrides: object) -> Path:
    jobs = {
        "model": str(models["base"]),
        "output_dir": "out",
        "prompts": [PROMPT, "a red cat"],
        "seeds": {"start": 0, "count": 2},
        "pairs": [
            {"guidance": str(models["g"])},
            {"guidance_adapter": str(models["early"]), "edit_adapter": str(models["late"]), "name": "lora"},
        ],
        "alpha": [0.0, 0.5],
        "cfg": 3.0,
        "steps": 2,
        "height": 16,
        "width": 16,
        "batch_size": 3,
        **overrides,
    }
    return write_jobs(folder, jobs)


def test_batch_generates_every_item_once_and_resumes(models, tmp_path, monkeypatch):
    jobs = _jobs(models, tmp_path)
    out = tmp_path / "out"
    saved = []
    real_save = batch_command.save_png

    def dying_save(image, path):  # the process "dies" after 5 finished items
        if len(saved) == 5:
            raise KeyboardInterrupt
        real_save(image, path)
        saved.append(path.name)

    monkeypatch.setattr(batch_command, "save_png", dying_save)
    with pytest.raises(KeyboardInterrupt):
        main(["batch", str(jobs), "--no-progress"])
    assert len(read_manifest(out)) == 5  # the manifest lists what finished before the failure
    first = {name: (out / name).read_bytes() for name in saved}
    (out / ".stray.png.123.tmp").write_bytes(b"partial")  # what a kill mid-write leaves

    monkeypatch.setattr(
        batch_command, "save_png", lambda image, path: (saved.append(path.name), real_save(image, path))
    )
    assert main(["batch", str(jobs), "--no-progress"]) == 0
    records = read_manifest(out)
    assert (
        len(records) == 16 == len({r["id"] for r in records}) == len(set(saved))
    )  # 2 pairs x 2 alpha x 2 x 2
    assert all((out / name).read_bytes() == data for name, data in first.items())  # not redone
    assert {(r["prompt"], r["seed"], r["pair"], r["alpha"]) for r in records} == {
        (p, s, pair, a)
        for p in (PROMPT, "a red cat")
        for s in (0, 1)
        for pair in (0, "lora")
        for a in (0.0, 0.5)
    }
    assert set(records[0]) >= {
        "prompt",
        "seed",
        "guidance",
        "edit",
        "alpha",
        "cfg",
        "steps",
        "time_s",
        "file",
    }
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["file"] for r in records)

    count = len(saved)
    assert main(["batch", str(jobs), "--no-progress"]) == 0  # everything done: nothing redone
    assert len(saved) == count


def test_batch_items_match_single_generation(models, tmp_path):
    jobs = _jobs(
        models, tmp_path, pairs=[{"guidance": str(models["g"])}], alpha=0.5, prompts=[PROMPT], seeds=[7]
    )
    assert main(["batch", str(jobs), "--no-progress"]) == 0
    record = read_manifest(tmp_path / "out")[0]
    single = tmp_path / "single.png"
    args = ["generate", PROMPT, "--model", str(models["base"]), "--guidance-model", str(models["g"]), *COMMON]
    assert main([*args, "--alpha", "0.5", "--seed", "7", "--out", str(single)]) == 0
    assert np.abs(read_pixels(tmp_path / "out" / record["file"]) - read_pixels(single)).max() <= 1


def test_batch_halves_the_batch_on_out_of_memory(models, tmp_path, monkeypatch):
    jobs = _jobs(models, tmp_path, pairs=[{"guidance": str(models["g"])}], alpha=0.5, batch_size=4)
    sizes = []
    real_forward = batch_command.BatchRunner._forward

    def small_device(self, pipe, adapters, chunk):
        sizes.append(len(chunk))
        if len(chunk) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, pipe, adapters, chunk)

    monkeypatch.setattr(batch_command.BatchRunner, "_forward", small_device)
    with pytest.warns(RuntimeWarning, match="retrying with 2"):
        assert main(["batch", str(jobs), "--no-progress"]) == 0
    assert sizes[:3] == [4, 2, 1] and set(sizes[3:]) == {1}
    assert len(read_manifest(tmp_path / "out")) == 4


def test_batch_input_errors(models, tmp_path, capsys):
    jobs = _jobs(models, tmp_path, colour="red")
    assert main(["batch", str(jobs)]) == 2
    assert "unknown jobs keys ['colour']" in capsys.readouterr().err
    jobs = _jobs(models, tmp_path, pairs=[{"guidance_model": "x"}])
    assert main(["batch", str(jobs)]) == 2
    assert "unknown pair keys ['guidance_model']" in capsys.readouterr().err
    (tmp_path / "blocked").write_text("")
    jobs = _jobs(models, tmp_path, output_dir="blocked/out")
    assert main(["batch", str(jobs)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_batch_two_processes_split_the_items(models, tmp_path):
    """`accelerate launch` with 2 processes: each item is produced exactly once, by one process."""
    jobs = _jobs(models, tmp_path, pairs=[{"guidance": str(models["g"])}])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "dreamblend.cli", "batch", str(jobs), "--no-progress"]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_manifest(tmp_path / "out")
    assert len(records) == 8 == len({r["id"] for r in records})
    assert sorted(r["process"] for r in records) == [0] * 4 + [1] * 4
    assert len(list((tmp_path / "out").glob("*.png"))) == 8
    assert time.perf_counter() - start < 300


def test_generate_picks_the_sdxl_pipeline(tmp_path):
    base = save_tiny_pipeline(
        StableDiffusionXLPipeline(**tiny_sdxl_components(0), add_watermarker=False), tmp_path / "sdxl"
    )
    tiny_sdxl_components(1)["unet"].save_pretrained(tmp_path / "g" / "unet")
    out = tmp_path / "xl.png"
    args = ["generate", PROMPT, "--model", str(base), "--guidance-model", str(tmp_path / "g")]
    assert main([*args, "--steps", "2", "--height", "32", "--width", "32", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
