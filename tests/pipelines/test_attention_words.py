"""Pipelines and `generate` take attention tokens by word; `attention_callback` hands out G's and E's maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import PROMPT, STEPS, blend_pipe, blend_xl_pipe, gen, sd_kwargs

from dreamblend.cli import main
from dreamblend.testing import save_tiny_pipeline, tiny_sd_components, tiny_sd_pipeline


def recorded(pipe, **kwargs) -> tuple[np.ndarray, list[tuple[str, int, dict[str, torch.Tensor]]]]:
    calls = []
    out = pipe(PROMPT, generator=gen(), attention_callback=lambda *a: calls.append(a), **kwargs)
    return out.images, calls


def test_words_and_indices_give_identical_maps_and_images():
    pipe = blend_pipe()
    kwargs = sd_kwargs(cross_attention_guidance_scale=1.0, head_mean=True)
    by_index, index_calls = recorded(pipe, attention_tokens=[2, 3], **kwargs)  # "a sks dog ...": BOS=0
    by_word, word_calls = recorded(pipe, attention_tokens=["sks", "dog"], **kwargs)
    np.testing.assert_array_equal(by_word, by_index)
    assert [c[:2] for c in word_calls] == [c[:2] for c in index_calls]
    for (_, _, word_maps), (_, _, index_maps) in zip(word_calls, index_calls, strict=True):
        assert word_maps.keys() == index_maps.keys()
        for name, value in index_maps.items():
            assert value.shape[-1] == 2
            torch.testing.assert_close(word_maps[name], value, rtol=0, atol=0)
    all_tokens = pipe(PROMPT, generator=gen(), **kwargs).images
    assert not np.array_equal(by_word, all_tokens)  # the selection reached the guidance

    xl = blend_xl_pipe()
    xl_kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np"}
    np.testing.assert_array_equal(
        xl(PROMPT, attention_tokens=["dog"], generator=gen(), **xl_kwargs).images,
        xl(PROMPT, attention_tokens=[3], generator=gen(), **xl_kwargs).images,
    )


def test_word_errors_name_the_problem():
    pipe = blend_pipe()
    with pytest.raises(ValueError, match=r"'cat' is not in the prompt .*\['a', 'sks', 'dog', 'in', 'the'"):
        pipe(PROMPT, attention_tokens=["cat"], **sd_kwargs())
    embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    with pytest.raises(ValueError, match="name words, but no prompt text"):
        pipe(prompt_embeds=embeds, attention_tokens=["dog"], **sd_kwargs(guidance_scale=1.0))


def test_attention_callback_sees_every_step_of_g_and_e_without_changing_the_image():
    pipe = blend_pipe()
    kwargs = sd_kwargs(cross_attention_guidance_scale=1.0, attention_layers=[4])  # 4x4 maps of 8x8 latents
    plain = pipe(PROMPT, generator=gen(), **kwargs).images
    images, calls = recorded(pipe, **kwargs)
    np.testing.assert_allclose(images, plain, rtol=0, atol=1e-4)  # capture equals SDPA within tolerance
    assert sorted(c[:2] for c in calls) == [(r, i) for r in ("edit", "guidance") for i in range(STEPS)]
    # down_blocks.1 and up_blocks.1 layers: the conditional row, 2 heads, 16 positions, 77 tokens
    for _, _, maps in calls:
        assert len(maps) == 5 and {m.shape for m in maps.values()} == {(1, 2, 16, 77)}
    # alpha 0: E samples alone, and G still reports all its steps
    _, calls = recorded(pipe, **{**kwargs, "cross_attention_guidance_scale": 0.0})
    assert sorted(role for role, *_ in calls) == ["edit"] * STEPS + ["guidance"] * STEPS


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("word_cli")
    tiny_sd_components(1)["unet"].save_pretrained(root / "g" / "unet")
    return save_tiny_pipeline(tiny_sd_pipeline(0), root / "base"), root / "g"


def test_generate_tokens_take_words(base, tmp_path, capsys):
    model, guidance = base
    args = ["generate", PROMPT, "--model", str(model), "--guidance-model", str(guidance), "--alpha", "1"]
    args += ["--steps", "2", "--height", "16", "--width", "16"]
    assert main([*args, "--tokens", "sks", "dog", "--out", str(tmp_path / "words.png")]) == 0
    assert main([*args, "--tokens", "2", "3", "--out", str(tmp_path / "indices.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "all.png")]) == 0
    pixels = {name: np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("words", "indices", "all")}
    np.testing.assert_array_equal(pixels["words"], pixels["indices"])
    assert not np.array_equal(pixels["words"], pixels["all"])
    capsys.readouterr()
    assert main([*args, "--tokens", "sks", "cat", "--out", str(tmp_path / "x.png")]) == 2
    assert "'cat' is not in the prompt" in capsys.readouterr().err
