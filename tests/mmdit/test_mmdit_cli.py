"""`dreamblend generate` and `dreamblend batch` on tiny SD3 and FLUX pipelines saved to disk.

G is the base model, E the base model plus a LoRA file written the way diffusers' DreamBooth-LoRA
scripts write theirs; the command's images must be the ones the pipeline makes in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from cli_helpers import read_manifest, read_pixels, write_jobs
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from mmdit_helpers import save_dreambooth_lora
from PIL import Image
from safetensors.torch import load_file

from dreamblend.checkpoints import ModelSpec, load_pipeline, pipeline_class, prepare_models
from dreamblend.cli import main
from dreamblend.commands import batch as batch_command
from dreamblend.mmdit import DreamBlendFluxPipeline, DreamBlendSD3Pipeline
from dreamblend.pipelines import DreamBlendPipeline, DreamBlendXLPipeline
from dreamblend.testing import save_tiny_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline
from dreamblend.testing_mmdit import tiny_flux_components, tiny_sd3, tiny_sd3_components

PROMPT = "a photo of sks dog on the beach"
SIZE = ["--steps", "2", "--height", "32", "--width", "32"]
KINDS = {  # SD3 with its T5 encoder: words then select CLIP and T5 positions
    "sd3": (StableDiffusion3Pipeline, DreamBlendSD3Pipeline, lambda seed: tiny_sd3_components(seed, t5=True)),
    "flux": (FluxPipeline, DreamBlendFluxPipeline, tiny_flux_components),
}


@pytest.fixture(scope="module", params=list(KINDS))
def model(request, tmp_path_factory) -> dict:
    """A saved base pipeline of one kind and a DreamBooth-LoRA file for it."""
    stock, blend, components = KINDS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    parts = components(seed=0)
    base = save_tiny_pipeline(stock(**parts), root / "base")
    lora = save_dreambooth_lora(stock, parts["transformer"], root / "lora", seed=5)
    return {"kind": request.param, "base": base, "lora": lora, "blend": blend}


def _in_memory(model: dict, alpha: float, seed: int, **kwargs) -> Any:
    pipe = model["blend"].from_pretrained(model["base"])
    pipe.load_lora_weights(model["lora"].parent, adapter_name="edit")
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT,
        num_inference_steps=2,
        height=32,
        width=32,
        guidance_scale=3.0,
        cross_attention_guidance_scale=alpha,
        generator=torch.Generator().manual_seed(seed),
        edit_adapter="edit",
        **kwargs,
    )


def test_generate_with_a_dreambooth_lora_as_e(model, tmp_path):
    out = tmp_path / "dog.png"
    args = ["generate", PROMPT, "--model", str(model["base"]), "--edit-model", str(model["lora"]), *SIZE]
    assert main([*args, "--alpha", "20", "--seed", "3", "--tokens", "sks", "dog", "--out", str(out)]) == 0
    expected = np.asarray(
        _in_memory(model, 20.0, 3, attention_tokens=["sks", "dog"]).images[0], dtype=np.int16
    )
    # Same weights (safetensors round trip), same float32 math: at most a rounding step in the PNG.
    assert np.abs(read_pixels(out) - expected).max() <= 1
    plain = _in_memory(model, 0.0, 3, return_reference=True)
    e_alone, g_alone = (np.asarray(x[0], dtype=np.int16) for x in (plain.images, plain.reference_images))
    assert np.abs(read_pixels(out) - e_alone).max() > 1  # the guidance moved E's image
    assert np.abs(e_alone - g_alone).max() > 1  # and E (base + LoRA) is another model than G (base)


def test_generate_with_two_lora_files_as_g_and_e(model, tmp_path):
    """An early and a late LoRA of one run: two adapters on the one transformer, as in memory."""
    stock = KINDS[model["kind"]][0]
    parts = KINDS[model["kind"]][2](seed=0)
    early = save_dreambooth_lora(stock, parts["transformer"], tmp_path / "early", seed=6)
    out = tmp_path / "two.png"
    args = ["generate", PROMPT, "--model", str(model["base"]), *SIZE, "--alpha", "20", "--out", str(out)]
    assert main([*args, "--guidance-adapter", str(early), "--edit-adapter", str(model["lora"])]) == 0
    pipe = model["blend"].from_pretrained(model["base"])
    pipe.load_lora_weights(early.parent, adapter_name="guidance")
    pipe.load_lora_weights(model["lora"].parent, adapter_name="edit")
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        PROMPT, num_inference_steps=2, height=32, width=32, guidance_scale=3.0,
        cross_attention_guidance_scale=20.0, generator=torch.Generator().manual_seed(0),
        guidance_adapter="guidance", edit_adapter="edit",
    )  # fmt: skip
    assert np.abs(read_pixels(out) - np.asarray(expected.images[0], dtype=np.int16)).max() <= 1
    base_g = np.asarray(_in_memory(model, 20.0, 0).images[0], dtype=np.int16)
    assert np.abs(read_pixels(out) - base_g).max() > 1  # G is the early LoRA, not the base model


def test_text_encoder_weights_in_a_lora_file_are_dropped(model, tmp_path):
    """A LoRA trained with the text encoder too: its transformer part is E, the rest is dropped."""
    stock = KINDS[model["kind"]][0]
    encoder = model["blend"].from_pretrained(model["base"]).text_encoder
    g = torch.Generator().manual_seed(0)
    text_layers = {  # peft's key layout for a rank-2 LoRA on every q_proj
        f"{name}.{part}.weight": torch.randn(shape, generator=g)
        for name, mod in encoder.named_modules()
        if name.endswith("q_proj")
        for part, shape in (("lora_A", (2, mod.in_features)), ("lora_B", (mod.out_features, 2)))
    }
    layers = {k.removeprefix("transformer."): v for k, v in load_file(model["lora"]).items()}
    stock.save_lora_weights(tmp_path, transformer_lora_layers=layers, text_encoder_lora_layers=text_layers)
    pipe = load_pipeline(model["base"])
    with pytest.warns(UserWarning, match="also holds text-encoder LoRA weights"):
        roles = prepare_models(
            pipe, ModelSpec(), ModelSpec(str(tmp_path / "pytorch_lora_weights.safetensors"))
        )
    assert not getattr(pipe.text_encoder, "peft_config", None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT, num_inference_steps=2, height=32, width=32, guidance_scale=3.0,
        cross_attention_guidance_scale=20.0, generator=torch.Generator().manual_seed(3), **roles,
    ).images[0]  # fmt: skip
    expected = _in_memory(model, 20.0, 3).images[0]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def _jobs(model: dict, folder: Path, **overrides: object) -> Path:
    jobs = {
        "model": str(model["base"]),
        "output_dir": "out",
        "prompts": [PROMPT, "a red cat"],
        "seeds": [0, 1],
        "pairs": [{"edit_adapter": str(model["lora"]), "name": "lora"}],
        "alpha": [0.0, 20.0],
        "steps": 2,
        "height": 32,
        "width": 32,
        "batch_size": 3,
        **overrides,
    }
    return write_jobs(folder, jobs)


def test_batch_generates_every_item_once_and_resumes(model, tmp_path, monkeypatch):
    jobs, out = _jobs(model, tmp_path), tmp_path / "out"
    saved: list[str] = []
    real_save = batch_command.save_png

    def dying_save(image, path):  # the process "dies" after 3 finished items
        if len(saved) == 3:
            raise KeyboardInterrupt
        real_save(image, path)
        saved.append(path.name)

    monkeypatch.setattr(batch_command, "save_png", dying_save)
    with pytest.raises(KeyboardInterrupt):
        main(["batch", str(jobs), "--no-progress"])
    assert len(read_manifest(out)) == 3
    first = {name: (out / name).read_bytes() for name in saved}
    monkeypatch.setattr(
        batch_command, "save_png", lambda image, path: (saved.append(path.name), real_save(image, path))
    )
    assert main(["batch", str(jobs), "--no-progress"]) == 0
    records = read_manifest(out)
    assert len(records) == 8 == len(set(saved))  # 2 alphas x 2 prompts x 2 seeds, each made once
    assert all((out / name).read_bytes() == data for name, data in first.items())  # not redone
    assert {(r["prompt"], r["seed"], r["alpha"], r["pair"], r["edit"]) for r in records} == {
        (p, s, a, "lora", f"base + {model['lora']}")
        for p in (PROMPT, "a red cat")
        for s in (0, 1)
        for a in (0.0, 20.0)
    }
    guided = next(r for r in records if r["prompt"] == PROMPT and r["seed"] == 1 and r["alpha"] == 20.0)
    expected = np.asarray(_in_memory(model, 20.0, 1).images[0], dtype=np.int16)
    assert np.abs(read_pixels(out / guided["file"]) - expected).max() <= 1  # a batch item is the single image
    count = len(saved)
    assert main(["batch", str(jobs), "--no-progress"]) == 0  # everything done: nothing redone
    assert len(saved) == count


def test_checkpoint_detection_for_the_four_model_kinds(model, tmp_path):
    sd = save_tiny_pipeline(tiny_sd_pipeline(0), tmp_path / "sd")
    sdxl = save_tiny_pipeline(tiny_sdxl_pipeline(0), tmp_path / "sdxl")
    assert pipeline_class(sd) is DreamBlendPipeline
    assert pipeline_class(sdxl) is DreamBlendXLPipeline
    assert pipeline_class(model["base"]) is model["blend"]
    index = json.loads((model["base"] / "model_index.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(
        json.dumps(
            {
                **index,
                "_class_name": "PixArtSigmaPipeline",
                "transformer": ["diffusers", "PixArtTransformer2DModel"],
            }
        )
    )
    with pytest.raises(ValueError, match="PixArtTransformer2DModel transformer; DreamBlend runs UNet models"):
        pipeline_class(other)


def test_full_transformer_checkpoint_as_g(tmp_path):
    """A checkpoint folder with transformer/ is G's own transformer; E stays the base one (with its LoRA)."""
    parts = tiny_sd3_components(seed=0)
    base = save_tiny_pipeline(StableDiffusion3Pipeline(**parts), tmp_path / "base")
    tiny_sd3(seed=1).save_pretrained(tmp_path / "checkpoint-100" / "transformer")
    lora = save_dreambooth_lora(StableDiffusion3Pipeline, parts["transformer"], tmp_path / "lora")
    pipe = load_pipeline(base)
    roles = prepare_models(pipe, ModelSpec(str(tmp_path / "checkpoint-100")), ModelSpec(adapter=str(lora)))
    assert roles == {"guidance_adapter": None, "edit_adapter": "edit"}
    assert pipe.guidance_transformer is not pipe.transformer
    expected = tiny_sd3(seed=1).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in pipe.guidance_transformer.state_dict().items())
    assert list(pipe.transformer.peft_config) == ["edit"]
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=1, height=32, width=32, output_type="np", **roles).images
    assert np.isfinite(out).all()


def test_command_errors_name_the_fix(model, tmp_path, capsys):
    base = ["generate", PROMPT, "--model", str(model["base"]), *SIZE, "--out", str(tmp_path / "x.png")]
    assert main(base) == 2
    assert "pass at least one of --guidance-model/--edit-model" in capsys.readouterr().err
    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(photo)
    assert main([*base, "--edit-model", str(model["lora"]), "--image", str(photo)]) == 2
    assert "DDIM inversion" in capsys.readouterr().err
    negative = main([*base, "--edit-model", str(model["lora"]), "--negative-prompt", "blurry"])
    if model["kind"] == "flux":
        assert negative == 2
        assert "--negative-prompt does not apply to FLUX.1" in capsys.readouterr().err
        jobs = _jobs(model, tmp_path, negative_prompt="blurry")
        assert main(["batch", str(jobs)]) == 2
        assert "jobs key 'negative_prompt' does not apply to FLUX.1" in capsys.readouterr().err
    else:
        assert negative == 0  # SD3 has a negative prompt
    assert main(["batch", str(_jobs(model, tmp_path, pairs=[{"name": "nothing"}]))]) == 2
    assert "pass at least one of guidance/edit/guidance_adapter/edit_adapter" in capsys.readouterr().err
    assert main([*base, "--edit-model", str(model["lora"]), "--tokens", "zebra"]) == 2
    assert "'zebra' is not in the prompt" in capsys.readouterr().err


def test_checkpoints_that_do_not_fit_a_transformer(model, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from dreamblend.testing import tiny_sd_components

    unet = tiny_sd_components(0)["unet"]
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q"]))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "unet-lora", unet_lora_layers=get_peft_model_state_dict(unet)
    )
    pipe = load_pipeline(model["base"])
    with pytest.raises(ValueError, match="holds no LoRA weights for this pipeline's .*Transformer2DModel"):
        prepare_models(
            pipe, ModelSpec(), ModelSpec(str(tmp_path / "unet-lora" / "pytorch_lora_weights.safetensors"))
        )
    custom = tmp_path / "pytorch_custom_diffusion_weights.safetensors"  # save_attn_procs' key layout
    safetensors.torch.save_file(
        {"down_blocks.0.attn2.processor.to_k_custom_diffusion.weight": torch.zeros(4, 4)}, custom
    )
    with pytest.raises(ValueError, match="Custom Diffusion file, which adapts a UNet's cross-attention"):
        prepare_models(load_pipeline(model["base"]), ModelSpec(), ModelSpec(str(custom)))
    tokens = tmp_path / "ti"
    tokens.mkdir()

    safetensors.torch.save_file({"<new1>": torch.zeros(32)}, tokens / "learned_embeds.safetensors")
    (tokens / "pytorch_lora_weights.safetensors").write_bytes(model["lora"].read_bytes())
    with pytest.raises(ValueError, match="several text encoders .* SD3 and FLUX"):
        prepare_models(load_pipeline(model["base"]), ModelSpec(), ModelSpec(str(tokens)))
