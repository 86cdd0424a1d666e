"""Per-word heatmaps: averages over layers and steps, word maps, a tiny DreamBlend run, the grid, the CLI."""

from __future__ import annotations

import pytest
import torch
from analysis_helpers import check_png

from dreamblend.analysis.maps import (
    MapAverage,
    blend_word_maps,
    checkpoint_word_maps,
    map_grid,
    normalize_per_word,
    plot_word_maps,
    word_maps,
)
from dreamblend.cli import main
from dreamblend.pipelines import DreamBlendPipeline
from dreamblend.testing import save_tiny_pipeline, tiny_clip_tokenizer, tiny_sd_components, tiny_sd_pipeline

PROMPT = "a sks zebra on the beach"  # "zebra" is five pieces in the tiny vocabulary (positions 3-7)
WORDS = ["sks", "zebra", "beach"]
CALL = {"num_inference_steps": 3, "height": 16, "width": 16, "guidance_scale": 3.0, "resolution": 4}


def test_map_grid_follows_the_unet_levels():
    assert map_grid(64 * 64, (64, 64)) == (64, 64)
    assert map_grid(16 * 16, (64, 64)) == (16, 16)
    assert map_grid(8 * 12, (64, 96)) == (8, 12)
    assert map_grid(3 * 4, (9, 13)) == (3, 4)  # 9x13 -> 5x7 -> 3x4: halving rounds up
    with pytest.raises(ValueError, match="does not fit 8x8 latents"):
        map_grid(7, (8, 8))


def test_map_average_means_heads_layers_and_steps_per_size():
    average = MapAverage((4, 4))
    per_head = torch.zeros(1, 2, 16, 3)
    per_head[:, 0] = 1.0  # head mean: 0.5 everywhere
    average.add({"a": per_head, "b": torch.full((1, 4, 3), 2.0)})  # a 4x4 and a 2x2 layer
    average.add({"a": torch.full((1, 16, 3), 1.5)})  # a later step, head-mean recorded
    assert average.sizes == [(2, 2), (4, 4)]
    torch.testing.assert_close(average.mean((4, 4)), torch.ones(1, 3, 4, 4))  # (0.5 + 1.5) / 2
    torch.testing.assert_close(average.mean((2, 2)), torch.full((1, 3, 2, 2), 2.0))
    positions = torch.arange(16.0).view(1, 16, 1).expand(1, 16, 3)  # row-major positions
    single = MapAverage((4, 4))
    single.add({"a": positions})
    torch.testing.assert_close(single.mean((4, 4))[0, 0], torch.arange(16.0).view(4, 4))
    assert average.pick() == (2, 2) and average.pick(4) == (4, 4)  # default: a quarter of the latent side
    with pytest.raises(ValueError, match=r"no cross-attention maps of resolution 8; this run has \[2, 4\]"):
        average.pick(8)


def test_word_map_is_the_mean_of_its_pieces():
    tokenizer = tiny_clip_tokenizer()
    average = MapAverage((2, 2))
    tokens = torch.arange(77.0).view(1, 1, 77).expand(1, 4, 77)  # token t's map is t everywhere
    average.add({"layer": tokens})
    maps = word_maps(average, tokenizer, PROMPT, WORDS, (2, 2))
    assert maps.shape == (3, 2, 2)
    assert maps[:, 0, 0].tolist() == [2.0, 5.0, 10.0]  # sks = 2, zebra = mean(3..7), beach = 10
    with pytest.raises(ValueError, match=r"'dog' is not in the prompt .*'zebra'"):
        word_maps(average, tokenizer, PROMPT, ["dog"], (2, 2))


def test_normalize_per_word():
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[7.0, 7.0], [7.0, 7.0]]])
    torch.testing.assert_close(
        normalize_per_word(maps), torch.tensor([[[0, 0.5], [0.25, 1]], [[0.0, 0], [0, 0]]])
    )


@pytest.fixture(scope="module")
def blend_rows():
    pipe = DreamBlendPipeline(**tiny_sd_components(0), guidance_unet=tiny_sd_components(1)["unet"])
    pipe.set_progress_bar_config(disable=True)
    return blend_word_maps(pipe, PROMPT, WORDS, cross_attention_guidance_scale=10.0, **CALL)


def test_blend_rows_and_a_single_checkpoint(blend_rows):
    guidance, alone, blend = blend_rows
    assert [r.label for r in blend_rows] == ["G (guidance)", "E alone", "DreamBlend"]
    for row in blend_rows:
        assert row.words == tuple(WORDS) and row.maps.shape == (3, 4, 4) and row.image.shape == (16, 16, 3)
        assert row.image.dtype.name == "uint8" and torch.all(row.maps > 0)
    # guidance pulls E's maps toward G's
    assert (blend.maps - guidance.maps).abs().sum() < 0.95 * (alone.maps - guidance.maps).abs().sum()
    # E alone in the DreamBlend pipeline is the same sampling as E's own pipeline from the same seed
    pipe = tiny_sd_pipeline(0)
    single = checkpoint_word_maps(pipe, PROMPT, WORDS, **CALL)
    torch.testing.assert_close(single.maps, alone.maps, rtol=1e-4, atol=1e-6)
    assert (single.image.astype(int) - alone.image).max() <= 1
    with pytest.raises(ValueError, match="num_images_per_prompt at 1"):
        checkpoint_word_maps(pipe, PROMPT, WORDS, num_images_per_prompt=2, **CALL)
    with pytest.raises(ValueError, match="non-empty list of words"):
        checkpoint_word_maps(pipe, PROMPT, "sks", **CALL)


def test_grid_png(blend_rows, tmp_path):
    path = plot_word_maps(blend_rows, tmp_path / "grid.png", title=PROMPT)
    check_png(path, min_size=(600, 500))
    with pytest.raises(ValueError, match="same words"):
        plot_word_maps([blend_rows[0], checkpoint_like(blend_rows[1])], tmp_path / "x.png")


def checkpoint_like(row):
    return type(row)(row.label, row.image, row.words[:1], row.maps[:1])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("maps_cli")
    tiny_sd_components(1)["unet"].save_pretrained(root / "g" / "unet")
    return save_tiny_pipeline(tiny_sd_pipeline(0), root / "base"), root / "g"


def test_maps_command(models, tmp_path, capsys):
    base, guidance = models
    common = ["--steps", "2", "--height", "16", "--width", "16", "--words", "sks", "zebra", "beach"]
    out = tmp_path / "pair.png"
    assert main(["maps", PROMPT, "--model", str(base), "--guidance-model", str(guidance), *common,
                 "--alpha", "1", "--out", str(out)]) == 0  # fmt: skip
    check_png(out, min_size=(600, 500))
    single = tmp_path / "single.png"
    assert (
        main(["maps", PROMPT, "--model", str(base), *common, "--resolution", "8", "--out", str(single)]) == 0
    )
    check_png(single, min_size=(600, 150))
    capsys.readouterr()
    assert (
        main(["maps", PROMPT, "--model", str(base), "--steps", "2", "--words", "dog", "--out", str(single)])
        == 2
    )
    assert "'dog' is not in the prompt" in capsys.readouterr().err
    assert main(["maps", PROMPT, "--model", str(base), *common, "--alpha", "1", "--out", str(single)]) == 2
    assert "--alpha needs a pair" in capsys.readouterr().err
