"""AttnDreamBooth: regularizer gradients against eager fp64 autograd, exact stage freezing, resume, errors."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from dreamblend import AttentionStore, attach
from dreamblend.checkpoints import ModelSpec, load_dreamblend
from dreamblend.cli import main
from dreamblend.ops import available_backends
from dreamblend.testing import save_tiny_pipeline, tiny_sd_pipeline, token_index
from dreamblend.training import (
    AttnDreamBoothConfig,
    TrainingInputError,
    attention_map_regularizer,
    load_checkpoint,
    read_trajectory,
    train_attndreambooth,
)


def config(base, instance_dir, out, **kwargs) -> AttnDreamBoothConfig:
    kwargs.setdefault("progress", False)
    kwargs.setdefault("batch_size", 2)
    kwargs.setdefault("class_word", "dog")
    return AttnDreamBoothConfig(
        pretrained_model=str(base), instance_dir=instance_dir, output_dir=out, **kwargs
    )


# ----------------------------------------------------------------------------------------------- regularizer
def test_regularizer_matches_equation_2_and_the_per_layer_form():
    torch.manual_seed(0)
    maps = {
        "a": torch.rand(3, 2, 16, 2, dtype=torch.float64),
        "b": torch.rand(3, 2, 4, 2, dtype=torch.float64),
    }
    lm, ls = 2.0, 5.0
    expected = []
    for b in range(3):
        v = torch.cat([maps["a"][b, ..., 0].reshape(-1), maps["b"][b, ..., 0].reshape(-1)])
        c = torch.cat([maps["a"][b, ..., 1].reshape(-1), maps["b"][b, ..., 1].reshape(-1)])
        var = lambda x: ((x - x.mean()) ** 2).sum() / (x.numel() - 1)
        expected.append(lm * (v.mean() - c.mean()) ** 2 + ls * (var(v) - var(c)) ** 2)
    got = attention_map_regularizer(maps, lambda_mu=lm, lambda_sigma=ls)
    torch.testing.assert_close(got, torch.stack(expected).mean())

    layer = sum(
        (
            lm * (m[b, ..., 0].mean() - m[b, ..., 1].mean()) ** 2
            + ls * (m[b, ..., 0].var() - m[b, ..., 1].var()) ** 2
        )
        for m in maps.values()
        for b in range(3)
    ) / len(maps)
    torch.testing.assert_close(
        attention_map_regularizer(maps, lambda_mu=lm, lambda_sigma=ls, reduction="layer"), layer
    )
    with pytest.raises(ValueError, match="record exactly \\[idx_V, idx_category\\]"):
        attention_map_regularizer({"a": torch.rand(1, 2, 4, 3)}, lambda_mu=1, lambda_sigma=1)


def _eager_maps(unet, tokens):
    """Materialized softmax(q k^T * scale) of every attn2, computed by hand from its to_q/to_k (hooks)."""
    maps, handles = {}, []

    def hook(name):
        def record(module, args, kwargs):
            assert module.norm_cross is None and module.group_norm is None and module.spatial_norm is None
            hidden, context = args[0], kwargs["encoder_hidden_states"]
            b, h = hidden.shape[0], module.heads
            q = module.to_q(hidden).unflatten(-1, (h, -1)).transpose(1, 2)
            k = module.to_k(context).unflatten(-1, (h, -1)).transpose(1, 2)
            probs = torch.softmax(q @ k.transpose(-1, -2) * module.scale, dim=-1)  # (B, H, M, N)
            assert probs.shape[:2] == (b, h)
            maps[name] = probs[..., tokens]

        return record

    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            handles.append(module.register_forward_pre_hook(hook(name), with_kwargs=True))
    return maps, handles


CPU_BACKENDS = [b for b in ("torch", "cpp") if b in available_backends()]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["paper", "layer"])
def test_regularizer_gradient_equals_eager_autograd_fp64(reduction, backend):
    pipe = tiny_sd_pipeline()
    unet, encoder, tokenizer = pipe.unet.double(), pipe.text_encoder.double(), pipe.tokenizer
    prompt = "a photo of a sks dog"
    tokens = [token_index(tokenizer, prompt, "sks"), token_index(tokenizer, prompt, "dog")]
    ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    table = encoder.get_input_embeddings()
    vector = torch.nn.Parameter(table.weight[ids[0, tokens[1]]].detach().clone())  # [V] starts as "dog"
    table.register_forward_hook(
        lambda m, args, out: torch.where((args[0] == ids[0, tokens[0]])[..., None], vector, out)
    )
    weights = {n: p for n, p in unet.named_parameters() if ".attn2.to_" in n and n.endswith("weight")}
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator, dtype=torch.float64)
    timesteps = torch.tensor([50, 700])

    def regularizer_and_grads(capture: bool):
        context = encoder(ids)[0].expand(2, -1, -1)
        if capture:
            store = AttentionStore(tokens=tokens, backend=backend)
            with attach(unet, store), store.record():
                unet(latents, timesteps, context)
            maps = store.maps
        else:
            maps, handles = _eager_maps(unet, tokens)
            unet(latents, timesteps, context)
            for handle in handles:
                handle.remove()
        loss = attention_map_regularizer(maps, lambda_mu=2.0, lambda_sigma=5.0, reduction=reduction)
        # the last layer's to_v/to_out feed no later map: their gradients are zero
        grads = torch.autograd.grad(
            loss, [vector, *weights.values()], allow_unused=True, materialize_grads=True
        )
        return maps, loss, grads

    maps, loss, grads = regularizer_and_grads(capture=True)
    eager_maps, eager_loss, eager_grads = regularizer_and_grads(capture=False)
    assert sorted(maps) == sorted(eager_maps) and len(maps) == 11
    for name in maps:
        torch.testing.assert_close(maps[name], eager_maps[name], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-10, atol=0)
    assert loss > 0 and grads[0].abs().sum() > 0
    for name, got, expected in zip(["embedding", *weights], grads, eager_grads, strict=True):
        assert expected.abs().max() > 0 or "up_blocks.2.attentions.2" in name, name
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12 * expected.abs().max(), msg=name)


# ----------------------------------------------------------------------------------------------- training
def _unet_diff(a: UNet2DConditionModel, b: UNet2DConditionModel) -> set[str]:
    sa, sb = a.state_dict(), b.state_dict()
    return {k for k in sa if not torch.equal(sa[k], sb[k])}


@pytest.mark.parametrize("stage2", ["attn2", "kv"])
def test_stages_train_exactly_their_parameters(sd_dir, two_dogs, tmp_path, stage2):
    out = tmp_path / "run"
    cfg = config(sd_dir, two_dogs, out, steps=(2, 2, 2), save_at="2,4,6", stage2_parameters=stage2,
                 learning_rates=(1e-2, 1e-3, 1e-3))  # fmt: skip
    result = train_attndreambooth(cfg)
    base = UNet2DConditionModel.from_pretrained(sd_dir / "unet")
    infos = read_trajectory(out)
    assert [(i.step, i.stage) for i in infos] == [(2, 1), (4, 2), (6, 3)]
    assert infos[0].unet is None and infos[1].unet is not None  # stage 1 leaves the base UNet untouched
    embeds = [load_file(i.embedding)["<sks>"] for i in infos]
    assert torch.equal(embeds[0], embeds[1]) and torch.equal(embeds[1], embeds[2])

    stage2_changed = _unet_diff(base, UNet2DConditionModel.from_pretrained(infos[1].unet))
    parts = (".attn2.to_k.", ".attn2.to_v.") if stage2 == "kv" else (".attn2.",)
    trainable = {k for k in base.state_dict() if any(p in k for p in parts)}
    assert stage2_changed == trainable
    assert len(_unet_diff(base, UNet2DConditionModel.from_pretrained(infos[2].unet))) > len(trainable)

    base_pipe = tiny_sd_pipeline()
    encoder = result.pipeline.text_encoder.state_dict()
    token_id = result.pipeline.tokenizer.convert_tokens_to_ids("<sks>")
    for name, tensor in base_pipe.text_encoder.state_dict().items():
        if name.endswith("token_embedding.weight"):
            assert torch.equal(encoder[name][:token_id], tensor) and torch.equal(
                encoder[name][token_id], embeds[0]
            )
            assert not torch.equal(embeds[0], tensor[token_index(base_pipe.tokenizer, "a dog", "dog")])
        else:
            assert torch.equal(encoder[name], tensor), name
    assert not _unet_diff(base_pipe.vae, result.pipeline.vae)

    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [1, 1, 2, 2, 3, 3]
    assert all(r["loss"] == pytest.approx(r["loss_diffusion"] + r["loss_reg"], rel=1e-5) for r in records)


def test_gradient_checkpointing_gives_the_same_run(sd_dir, two_dogs, tmp_path):
    """The regularizer's maps survive the recomputation of checkpointed blocks in the backward."""
    runs = []
    for flag in (False, True):
        out = tmp_path / str(flag)
        train_attndreambooth(
            config(sd_dir, two_dogs, out, steps=(1, 1, 1), save_at="3", gradient_checkpointing=flag)
        )
        runs.append(read_trajectory(out)[0])
    plain, checkpointed = (UNet2DConditionModel.from_pretrained(r.unet) for r in runs)
    assert not _unet_diff(plain, checkpointed)
    assert torch.equal(*(load_file(r.embedding)["<sks>"] for r in runs))


def test_bf16_mixed_precision_keeps_the_run_close_to_float32(sd_dir, two_dogs, tmp_path):
    """Autocast reaches the UNet and the regularizer's capture op; the trained token stays float32."""
    runs = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)  # one precision per accelerate state
        out = tmp_path / precision
        train_attndreambooth(
            config(sd_dir, two_dogs, out, steps=(1, 1, 1), save_at="3", mixed_precision=precision)
        )
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        runs[precision] = (
            [r["loss"] for r in log if "loss" in r],
            load_file(read_trajectory(out)[0].embedding),
        )
    (losses, token), (bf16_losses, bf16_token) = runs["no"], runs["bf16"]
    assert bf16_losses != losses
    np.testing.assert_allclose(bf16_losses, losses, rtol=1e-2)
    assert bf16_token["<sks>"].dtype == torch.float32
    # Adam moves each element by about +-lr per step whatever the gradient's size, so an element whose
    # float32 gradient is within bf16 rounding of zero (which elements: CPU-dependent, oneDNN picks
    # AVX2/AVX-512/AMX kernels) can step the other way: 2 * lr apart per step, never more. The rest
    # agree closely; a broken bf16 gradient would flip far more than a few of the 32 elements.
    drift = bf16_token["<sks>"] - token["<sks>"]
    lrs = AttnDreamBoothConfig.learning_rates
    assert drift.abs().max() <= 2 * sum(lrs) * 1.01
    close = torch.isclose(bf16_token["<sks>"], token["<sks>"], rtol=0.05, atol=1e-4)
    assert close.float().mean() >= 0.9, drift


def test_checkpoints_load_with_their_token(sd_dir, two_dogs, tmp_path):
    out = tmp_path / "run"
    train_attndreambooth(config(sd_dir, two_dogs, out, steps=(1, 1, 1), save_at="1,3"))
    first, last = read_trajectory(out)
    for info in (first, last):
        pipe = load_checkpoint(info.path)
        token_id = pipe.tokenizer.convert_tokens_to_ids("<sks>")
        row = pipe.text_encoder.get_input_embeddings().weight[token_id]
        assert torch.equal(row, load_file(info.embedding)["<sks>"])
        expected = UNet2DConditionModel.from_pretrained(info.unet or sd_dir / "unet")
        assert not _unet_diff(expected, pipe.unet)
        image = pipe("a photo of a <sks> dog", num_inference_steps=2, output_type="np").images
        assert image.shape == (1, 32, 32, 3)


def test_trajectory_points_are_guidance_and_edit_models_with_their_tokens(sd_dir, two_dogs, tmp_path):
    """A stage-1 point (base UNet, early token) as G and a stage-3 point as E, from their folders as saved."""
    out = tmp_path / "run"
    train_attndreambooth(config(sd_dir, two_dogs, out, steps=(2, 1, 1), save_at="1,4"))
    first, last = read_trajectory(out)  # the token trains on in stage 1 after the first point
    first_vector, last_vector = (load_file(info.embedding)["<sks>"] for info in (first, last))
    assert not torch.equal(first_vector, last_vector)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is skipped or mismatched
        pipe, kwargs = load_dreamblend(sd_dir, ModelSpec(str(first.path)), ModelSpec(str(last.path)))
    assert not _unet_diff(UNet2DConditionModel.from_pretrained(last.unet), pipe.unet)
    assert not _unet_diff(UNet2DConditionModel.from_pretrained(sd_dir / "unet"), pipe.guidance_unet)
    token_id = pipe.tokenizer.convert_tokens_to_ids("<sks>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], last_vector)
    assert torch.equal(kwargs.pop("guidance_token_embeddings")["<sks>"], first_vector)
    assert kwargs == {"guidance_adapter": None, "edit_adapter": None}

    # G's reference image is the stage-1 checkpoint sampled on its own, E's (alpha = 0) the stage-3 one.
    prompt, call = "a photo of a <sks> dog", {"num_inference_steps": 2, "output_type": "np"}
    own = {"guidance_token_embeddings": {"<sks>": first_vector}}
    blended = pipe(
        prompt, cross_attention_guidance_scale=0.0, generator=torch.Generator().manual_seed(0),
        return_reference=True, guidance_scale=3.0, **own, **call,
    )  # fmt: skip
    for info, images in ((first, blended.reference_images), (last, blended.images)):
        alone = load_checkpoint(info.path)
        alone.scheduler = pipe.scheduler
        expected = alone(
            prompt, generator=torch.Generator().manual_seed(0), guidance_scale=3.0, **call
        ).images
        np.testing.assert_allclose(images, expected, atol=1e-6)

    # The CLI takes the folders as they are: `generate` and a `batch` whose pair names them.
    expected = pipe(
        prompt, cross_attention_guidance_scale=0.5, generator=torch.Generator().manual_seed(3), **own,
        num_inference_steps=2, guidance_scale=3.0,
    ).images[0]  # fmt: skip
    image = tmp_path / "generate.png"
    roles = ["--model", str(sd_dir), "--guidance-model", str(first.path), "--edit-model", str(last.path)]
    assert (
        main(
            ["generate", prompt, *roles, "--steps", "2", "--alpha", "0.5", "--seed", "3", "--out", str(image)]
        )
        == 0
    )
    jobs = {
        "model": str(sd_dir),
        "output_dir": "batch",
        "prompts": [prompt],
        "seeds": [3],
        "pairs": [{"guidance": "run/checkpoint-1", "edit": "run/checkpoint-4"}],
        "alpha": 0.5,
        "cfg": 3.0,
        "steps": 2,
    }
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    assert main(["batch", str(tmp_path / "jobs.json"), "--no-progress"]) == 0
    (record,) = (
        json.loads(line) for line in (tmp_path / "batch" / "manifest.jsonl").read_text().splitlines()
    )
    for path in (image, tmp_path / "batch" / record["file"]):
        pixels = np.asarray(Image.open(path), dtype=np.int16)
        assert np.abs(pixels - np.asarray(expected, dtype=np.int16)).max() <= 1

    # Same-stage points share one vector: nothing to pass per role.
    _, kwargs = load_dreamblend(sd_dir, ModelSpec(str(last.path)), ModelSpec(str(last.path)))
    assert "guidance_token_embeddings" not in kwargs
    other = save_tiny_pipeline(tiny_sd_pipeline(1), tmp_path / "other_base")
    with pytest.warns(UserWarning, match="was trained from") as caught:
        load_dreamblend(other, ModelSpec(str(first.path)), ModelSpec(str(last.path)))
    assert sorted(str(w.message).split()[1] for w in caught) == ["edit", "guidance"]


def test_resume_across_a_stage_boundary_reproduces_the_run(sd_dir, two_dogs, tmp_path):
    settings = dict(steps=(2, 2, 2), save_at="2,4,6", state_every=3, keep_states=2)
    full = tmp_path / "full"
    train_attndreambooth(config(sd_dir, two_dogs, full, **settings))
    cut = tmp_path / "cut"  # interrupted in stage 2 after its state at step 3
    shutil.copytree(full, cut)
    for name in ("state-6", "checkpoint-4", "checkpoint-6"):
        shutil.rmtree(cut / name)
    train_attndreambooth(config(sd_dir, two_dogs, cut, resume=True, **settings))
    for step in (4, 6):
        a, b = (read_trajectory(run)[step // 2 - 1] for run in (full, cut))
        assert not _unet_diff(
            UNet2DConditionModel.from_pretrained(a.unet), UNet2DConditionModel.from_pretrained(b.unet)
        )
        assert torch.equal(load_file(a.embedding)["<sks>"], load_file(b.embedding)["<sks>"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"class_word": "stuffed animal"}, "is 2 tokens .* pass --class a single-token word"),
        ({"class_word": "xylophone"}, "'xylophone' is \\d+ tokens"),
        ({"token": "sks"}, "token 'sks' is already in the tokenizer's vocabulary"),
        ({"prompt": "a photo of {token}"}, "must contain \\{token\\} and \\{class\\}"),
        ({"steps": (60, 100)}, "--steps takes one value per stage"),
        ({"save_at": "paper,700"}, "neither 'paper'"),
        ({"save_at": "700"}, "steps \\[700\\] beyond the 660 training steps"),
    ],
)
def test_bad_input(sd_dir, two_dogs, tmp_path, change, message):
    with pytest.raises(TrainingInputError, match=message):
        train_attndreambooth(config(sd_dir, two_dogs, tmp_path / "run", **change))


def test_sdxl_is_refused_with_a_pointer(sdxl_dir, two_dogs, tmp_path):
    with pytest.raises(TrainingInputError, match="use 'train dreambooth' for SDXL"):
        train_attndreambooth(config(sdxl_dir, two_dogs, tmp_path / "run", steps=(1, 1, 1), save_at="1"))


def test_cli(sd_dir, two_dogs, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "attndreambooth", "--model", str(sd_dir), "--instance-dir", str(two_dogs)]
    options = ["--steps", "1,1,1", "--lambda-mu", "0.1,1,1", "--reg-reduction", "layer", "--batch-size", "1"]
    assert (
        main([*args, "--class", "dog", "--output", str(out), *options, "--save-at", "3", "--no-progress"])
        == 0
    )
    assert [c.step for c in read_trajectory(out)] == [3]
    args = [*args, "--output", str(tmp_path / "other")]
    assert main([*args, "--class", "stuffed animal", "--steps", "1,1,1", "--save-at", "1"]) == 2
    assert "single-token word" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--class", "dog", "--steps", "1,1"])
    assert "expected one value per stage (3)" in capsys.readouterr().err
