"""JeDiPipeline: eq. 1 guidance against a hand-written per-branch computation (fp64), errors, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from jedi_helpers import random_images

from dreamblend.jedi.convert import convert_unet, inpainting_input
from dreamblend.jedi.pipeline import JeDiPipeline, combine_guidance, load_jedi_pipeline
from dreamblend.joint import ImageSet, attach_joint_attention
from dreamblend.testing import tiny_sd_components

DTYPE = torch.float64


def jedi_pipe(set_size: int = 3) -> JeDiPipeline:
    parts = tiny_sd_components(seed=0)
    unet = convert_unet(parts["unet"])
    with torch.no_grad():  # give x0 and the mask weight, so that dropping the images changes eps
        g = torch.Generator().manual_seed(3)
        unet.conv_in.weight[:, 4:] = 0.2 * torch.randn(unet.conv_in.weight[:, 4:].shape, generator=g)
    keep = ("vae", "text_encoder", "tokenizer", "scheduler")
    pipe = JeDiPipeline(unet=unet, set_size=set_size, **{k: parts[k] for k in keep})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_combine_guidance_is_eq_1() -> None:
    g = torch.Generator().manual_seed(0)
    e0, e1, e = (torch.randn(2, 4, 3, 3, generator=g, dtype=DTYPE) for _ in range(3))
    l1, l2 = 2.5, 6.0
    expected = e0 + l1 * (e1 - e0) + l2 * (e - e1)
    torch.testing.assert_close(combine_guidance(e0, e1, e, l2, l1), expected, rtol=0, atol=1e-12)
    # with l1 == l2 the partial score cancels: eq. 1 is joint guidance
    joint = combine_guidance(e0, None, e, l2, l2)
    torch.testing.assert_close(combine_guidance(e0, e1, e, l2, l2), joint, rtol=0, atol=1e-12)
    torch.testing.assert_close(joint, e0 + l2 * (e - e0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("guidance", ["joint", "image_first", "text_first"])
def test_guided_step_equals_handwritten_branches(guidance: str) -> None:
    pipe = jedi_pipe().to(DTYPE)
    refs, captions = random_images(2, 0), ["a photo of a dog", "a dog on the grass"]
    prompt, m, n = "a dog in the snow", 2, 3
    l1, l2 = 2.0, 4.0
    latents = torch.randn(m * n, 4, 16, 16, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    seen: list[torch.Tensor] = []
    step = pipe.scheduler.step

    def record(noise, t, sample, **kwargs):
        seen.append(noise.clone())
        return step(noise, t, sample, **kwargs)

    pipe.scheduler.step = record
    pipe(
        prompt,
        refs,
        captions,
        num_images_per_prompt=m,
        num_inference_steps=1,
        guidance=guidance,
        guidance_scale=l2,
        partial_guidance_scale=l1,
        latents=latents.clone(),
        output_type="latent",
    )
    # The hand computation: each branch alone (its own UNet call), then eq. 1 written out.
    t = pipe.scheduler.timesteps[0]
    with torch.no_grad():
        x0 = torch.cat([pipe.encode_references(refs, 32, 32), torch.zeros(1, 4, 16, 16, dtype=DTYPE)]).repeat(
            m, 1, 1, 1
        )
        text = pipe.encode_text([*captions, prompt]).repeat(m, 1, 1)
        null_text = pipe.encode_text([""]).repeat(m * n, 1, 1)
        mask = torch.tensor([0.0, 0.0, 1.0], dtype=DTYPE).repeat(m)

        def eps(known: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            with attach_joint_attention(pipe.unet, ImageSet(n)):
                return pipe.unet(inpainting_input(latents, known, mask), t, context).sample

        e0, e = eps(torch.zeros_like(x0), null_text), eps(x0, text)
        if guidance == "joint":
            expected = e0 + l2 * (e - e0)
        else:
            e1 = eps(x0, null_text) if guidance == "text_first" else eps(torch.zeros_like(x0), text)
            expected = e0 + l1 * (e1 - e0) + l2 * (e - e1)
    assert (e - e0).abs().max() > 1e-3  # the branches differ, so a mix-up would show
    # fp64 end to end; batching the branches changes only the summation order of matmuls.
    torch.testing.assert_close(seen[0], expected, rtol=1e-9, atol=1e-9)


def test_bad_inputs_are_clear_errors() -> None:
    pipe = jedi_pipe(set_size=3)
    refs = random_images(2, 0)
    with pytest.raises(ValueError, match="trained on sets of 3 images, so it takes 1 to 2 references"):
        pipe("a dog", random_images(3, 0), ["a", "b", "c"], num_inference_steps=1)
    with pytest.raises(ValueError, match="needs a caption"):
        pipe("a dog", refs, None, num_inference_steps=1)
    with pytest.raises(ValueError, match="needs a caption"):
        pipe("a dog", refs, ["a dog"], num_inference_steps=1)
    with pytest.raises(ValueError, match="needs a caption"):
        pipe("a dog", refs, ["a dog", " "], num_inference_steps=1)
    with pytest.raises(ValueError, match=r"must all be 32x32 .*#1 is 40x40"):
        pipe("a dog", [refs[0], random_images(1, 1, size=40)[0]], ["a", "b"], num_inference_steps=1)
    with pytest.raises(ValueError, match=r"must all be 64x64"):
        pipe("a dog", refs, ["a", "b"], height=64, width=64, num_inference_steps=1)
    with pytest.raises(ValueError, match="guidance must be one of"):
        pipe("a dog", refs, ["a", "b"], guidance="both", num_inference_steps=1)
    pipe.register_modules(unet=tiny_sd_components(seed=0)["unet"])
    with pytest.raises(ValueError, match="train it with 'dreamblend train jedi'"):
        pipe("a dog", refs, ["a", "b"], num_inference_steps=1)


def test_checkpoint_pipeline_saves_and_loads(sd_dir: Path, full_checkpoint: Path, tmp_path: Path) -> None:
    pipe = load_jedi_pipeline(sd_dir, full_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.set_size == 3 and pipe.unet.config.in_channels == 9

    def sample(p: JeDiPipeline) -> np.ndarray:
        out = p(
            "a dog in the snow",
            random_images(1, 0),
            ["a photo of a dog"],
            num_inference_steps=2,
            num_images_per_prompt=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            return_sets=True,
        )
        assert out.images.shape == (2, 32, 32, 3) and out.sets.shape == (4, 32, 32, 3)
        np.testing.assert_array_equal(out.sets[1::2], out.images)  # the generated slot is each set's last
        return out.images

    first = sample(pipe)
    pipe.save_pretrained(tmp_path / "jedi")
    again = JeDiPipeline.from_pretrained(tmp_path / "jedi")
    again.set_progress_bar_config(disable=True)
    assert again.config.set_size == 3
    np.testing.assert_array_equal(sample(again), first)
    np.testing.assert_array_equal(sample(load_jedi_pipeline(tmp_path / "jedi")), first)
    with pytest.raises(FileNotFoundError, match="has no checkpoint.json"):
        load_jedi_pipeline(sd_dir, tmp_path)
