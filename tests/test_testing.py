"""Tests for the offline tiny-model fixtures in `dreamblend.testing`."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer

from dreamblend.testing import (
    BOS_TOKEN,
    EOS_TOKEN,
    MODEL_MAX_LENGTH,
    TINY_WORDS,
    build_bpe_vocab,
    save_tiny_pipeline,
    tiny_clip_tokenizer,
    tiny_sd_components,
    tiny_sd_pipeline,
    tiny_sdxl_components,
    tiny_sdxl_pipeline,
    token_index,
    token_indices,
    write_tiny_tokenizer_files,
)

REQUIRED_WORDS = """
a photo of the in on sks dog cat backpack bowl can candle clock vase teapot toy sneaker boot glasses
stuffed animal jungle snow beach street cobblestone pink fabric wooden floor city background mountain
blue house purple rug forest wheat field tree autumn leaves water red green grass with top
""".split()

BENCHMARK_PROMPTS = [
    "a sks backpack on top of a purple rug in a forest",
    "a sks dog with a tree and autumn leaves in the background",
    "a sks vase with the Eiffel Tower in the background",
    "a sks toy floating in an ocean of milk",
    "a sks sneaker on top of green grass with sunflowers around it",
    "a sks cat on top of the sidewalk in a crowded street",
    "a sks dog wearing a black top hat and a monocle",
    "a sks teapot in a purple wizard outfit",
    "a cube shaped sks candle",
]

SD_ATTN2 = {
    f"{block}.attentions.{i}.transformer_blocks.0.attn2.processor"
    for block, n in [("down_blocks.0", 2), ("down_blocks.1", 2), ("up_blocks.1", 3), ("up_blocks.2", 3)]
    for i in range(n)
} | {"mid_block.attentions.0.transformer_blocks.0.attn2.processor"}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return tiny_clip_tokenizer()


@pytest.fixture(scope="module")
def sd_pipe() -> StableDiffusionPipeline:
    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def sdxl_pipe() -> StableDiffusionXLPipeline:
    return tiny_sdxl_pipeline(seed=0)


# -- tokenizer --------------------------------------------------------------------------------------


def test_required_and_listed_words_are_single_tokens(tokenizer):
    assert set(REQUIRED_WORDS) <= set(TINY_WORDS)
    multi = {w: tokenizer.tokenize(w) for w in TINY_WORDS if len(tokenizer.tokenize(w)) != 1}
    assert not multi
    assert tokenizer.convert_ids_to_tokens(tokenizer("cobblestone", add_special_tokens=False).input_ids) == [
        "cobblestone</w>"
    ]
    ids = {tokenizer.convert_tokens_to_ids(w + "</w>") for w in TINY_WORDS}
    assert len(ids) == len(TINY_WORDS)


def test_benchmark_prompts_are_one_token_per_word(tokenizer):
    for prompt in BENCHMARK_PROMPTS:
        ids = tokenizer(prompt).input_ids
        assert len(ids) == len(prompt.split()) + 2, prompt


def test_special_tokens_and_length(tokenizer):
    assert tokenizer.model_max_length == MODEL_MAX_LENGTH
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.eos_token == EOS_TOKEN
    # CLIP layout: specials hold the two highest ids.
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (len(tokenizer) - 2, len(tokenizer) - 1)
    ids = tokenizer("a sks dog", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id and ids[4:] == [tokenizer.eos_token_id] * 73


@pytest.mark.parametrize(
    "text",
    [
        "A photo of SKS dog, on the beach!!! (4k) #1 -- 100% @night; it's fine",
        "Café crème brûlée — naïve façade, Zürich",
        "日本の犬 🐶🎒 \t  multiple   spaces\nnewline",
        'x2 [sks] {dog} <cat> ~`^|\\/ "quotes" ‘curly’ ½ ÿ ĀĂ',
    ],
)
def test_any_text_tokenizes_without_unknowns(tokenizer, text):
    ids = tokenizer(text).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ids[0] == bos and ids[-1] == eos
    assert bos not in ids[1:-1] and eos not in ids[1:-1]  # unk_token is <|endoftext|>
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    expected = "".join(unicodedata.normalize("NFC", text).lower().split())
    assert decoded.replace(" ", "") == expected


def test_tokenizer_files_in_explicit_dir(tmp_path: Path, tokenizer):
    folder = write_tiny_tokenizer_files(tmp_path / "tok")
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    # The positional (vocab_file, merges_file) constructor reads the same files.
    direct = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    loaded = CLIPTokenizer.from_pretrained(str(folder))
    explicit = tiny_clip_tokenizer(tmp_path / "tok2")
    prompt = BENCHMARK_PROMPTS[1]
    assert direct(prompt).input_ids == loaded(prompt).input_ids == tokenizer(prompt).input_ids
    assert explicit(prompt).input_ids == tokenizer(prompt).input_ids
    assert loaded.model_max_length == MODEL_MAX_LENGTH
    assert tiny_clip_tokenizer() is not tokenizer  # fresh, independently mutable objects


def test_extra_words_and_invalid_words():
    tok = tiny_clip_tokenizer(extra_words=["corgi", "Tuxedo"])
    assert len(tok.tokenize("corgi")) == 1 and len(tok.tokenize("tuxedo")) == 1
    # Extra words only append merges: ids of the built-in words stay put (the specials move up).
    assert tok.convert_tokens_to_ids("dog</w>") == tiny_clip_tokenizer().convert_tokens_to_ids("dog</w>")
    with pytest.raises(ValueError, match="letters only"):
        build_bpe_vocab(["ice cream"])
    with pytest.raises(ValueError, match="letters only"):
        build_bpe_vocab(["r2d2"])


def test_vocab_is_deterministic_and_covers_all_bytes():
    vocab, merges = build_bpe_vocab()
    assert (vocab, merges) == build_bpe_vocab()
    alphabet = set(ByteLevel.alphabet())
    assert alphabet <= set(vocab) and {c + "</w>" for c in alphabet} <= set(vocab)
    assert all(a + b in vocab for a, b in merges)


# -- token positions --------------------------------------------------------------------------------


def test_token_index(tokenizer):
    prompt = "a photo of sks dog in the jungle"
    assert token_index(tokenizer, prompt, "dog") == 5
    assert token_index(tokenizer, prompt, "sks") == 4
    assert token_index(tokenizer, prompt, "a") == 1
    assert token_index(tokenizer, "A Photo of a DOG", "dog") == 5
    assert token_indices(tokenizer, "a sks stuffed animal", "stuffed animal") == [3, 4]
    assert token_index(tokenizer, "a dog, a cat.", "cat") == 5


def test_token_index_errors(tokenizer):
    with pytest.raises(ValueError, match="'cat' .*not found"):
        token_index(tokenizer, "a sks dog", "cat")
    with pytest.raises(ValueError, match="not found"):
        token_index(tokenizer, "two cats", "cat")  # 'cats' is cat + s</w>, not cat</w>
    with pytest.raises(ValueError, match="spans 2 tokens"):
        token_index(tokenizer, "a sks stuffed animal", "stuffed animal")
    with pytest.raises(ValueError, match="spans"):
        token_index(tokenizer, "a photo of a zebra", "zebra")
    with pytest.raises(ValueError, match="no tokens"):
        token_index(tokenizer, "a dog", "  ")
    long_prompt = "a " * 80 + "dog"
    with pytest.raises(ValueError, match="within the first 77"):
        token_index(tokenizer, long_prompt, "dog")


# -- SD ---------------------------------------------------------------------------------------------


def test_sd_pipeline_runs(sd_pipe):
    images = sd_pipe("a sks dog", num_inference_steps=2, output_type="np", generator=_gen()).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    other = sd_pipe("a red cat", num_inference_steps=2, output_type="np", generator=_gen()).images
    assert not np.allclose(images, other)  # the text conditioning reaches the UNet
    images = sd_pipe(
        ["a sks dog"] * 2, num_inference_steps=2, height=16, width=24, output_type="np", generator=_gen()
    ).images
    assert images.shape == (2, 16, 24, 3) and np.isfinite(images).all()


def test_sd_architecture(sd_pipe):
    unet = sd_pipe.unet
    assert {n for n in unet.attn_processors if n.endswith("attn2.processor")} == SD_ATTN2
    assert unet.config.cross_attention_dim == sd_pipe.text_encoder.config.hidden_size == 32
    assert sd_pipe.text_encoder.config.vocab_size == len(sd_pipe.tokenizer)
    assert sd_pipe.text_encoder.config.eos_token_id == sd_pipe.tokenizer.eos_token_id
    assert sd_pipe.vae_scale_factor == 2 and sd_pipe.vae.config.latent_channels == 4
    cfg = sd_pipe.scheduler.config
    assert isinstance(sd_pipe.scheduler, DDIMScheduler)
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (cfg.set_alpha_to_one, cfg.steps_offset, cfg.clip_sample) == (False, 1, False)
    assert cfg.prediction_type == "epsilon"
    assert sd_pipe.safety_checker is None and not sd_pipe.config.requires_safety_checker


def test_sd_weights_are_seeded_and_leave_global_rng_alone(sd_pipe):
    state = torch.random.get_rng_state()
    again = tiny_sd_components(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in ("unet", "vae", "text_encoder"):
        ref = getattr(sd_pipe, name).state_dict()
        assert all(torch.equal(ref[k], v) for k, v in again[name].state_dict().items()), name
    other = tiny_sd_components(seed=1)["unet"].state_dict()
    ref = sd_pipe.unet.state_dict()
    assert not torch.equal(ref["conv_in.weight"], other["conv_in.weight"])


def test_sd2_like_options():
    comps = tiny_sd_components(
        prediction_type="v_prediction", upcast_attention=True, use_linear_projection=True, num_heads=(2, 4, 4)
    )
    assert comps["scheduler"].config.prediction_type == "v_prediction"
    assert comps["unet"].config.upcast_attention and comps["unet"].config.use_linear_projection
    assert comps["unet"].down_blocks[1].attentions[0].transformer_blocks[0].attn2.heads == 4
    pipe = StableDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a sks dog", num_inference_steps=2, output_type="np", generator=_gen()).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    with pytest.raises(ValueError, match="prediction_type"):
        tiny_sd_components(prediction_type="sample")


def test_sd_save_and_reload(sd_pipe, tmp_path: Path):
    path = save_tiny_pipeline(sd_pipe, tmp_path / "sd")
    names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert {
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    } <= names
    assert not [n for n in names if n.endswith(".bin")]
    loaded = StableDiffusionPipeline.from_pretrained(path)
    loaded.set_progress_bar_config(disable=True)
    assert (
        loaded.tokenizer(BENCHMARK_PROMPTS[0]).input_ids == sd_pipe.tokenizer(BENCHMARK_PROMPTS[0]).input_ids
    )
    assert loaded.tokenizer.model_max_length == MODEL_MAX_LENGTH
    kwargs = {"num_inference_steps": 2, "output_type": "np"}
    expected = sd_pipe("a sks dog", generator=_gen(3), **kwargs).images
    actual = loaded("a sks dog", generator=_gen(3), **kwargs).images
    np.testing.assert_array_equal(actual, expected)


# -- SDXL -------------------------------------------------------------------------------------------


def test_sdxl_pipeline_runs(sdxl_pipe):
    images = sdxl_pipe("a sks dog", num_inference_steps=2, output_type="np", generator=_gen()).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_sdxl_architecture(sdxl_pipe):
    unet = sdxl_pipe.unet
    te1, te2 = sdxl_pipe.text_encoder.config, sdxl_pipe.text_encoder_2.config
    assert unet.config.cross_attention_dim == te1.hidden_size + te2.hidden_size == 96
    assert unet.config.addition_embed_type == "text_time"
    assert (
        unet.add_embedding.linear_1.in_features
        == 6 * unet.config.addition_time_embed_dim + te2.projection_dim
    )
    assert tuple(unet.config.transformer_layers_per_block) == (1, 1, 2)
    assert len(unet.down_blocks[2].attentions[0].transformer_blocks) == 2
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 2
    assert not any(n.startswith("down_blocks.0.") for n in unet.attn_processors)
    assert sdxl_pipe.tokenizer_2.pad_token == "!"
    assert sdxl_pipe.tokenizer_2("a dog").input_ids == sdxl_pipe.tokenizer("a dog").input_ids
    assert isinstance(sdxl_pipe.scheduler, EulerDiscreteScheduler)
    assert sdxl_pipe.scheduler.config.timestep_spacing == "leading"
    assert sdxl_pipe.vae.config.scaling_factor == 0.13025


def test_sdxl_options():
    comps = tiny_sdxl_components(prediction_type="v_prediction", scheduler="ddim")
    assert isinstance(comps["scheduler"], DDIMScheduler)
    assert comps["scheduler"].config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="scheduler"):
        tiny_sdxl_components(scheduler="pndm")


def test_sdxl_save_and_reload(sdxl_pipe, tmp_path: Path):
    path = save_tiny_pipeline(sdxl_pipe, tmp_path / "sdxl")
    assert (path / "text_encoder_2" / "model.safetensors").is_file()
    assert not list(path.rglob("*.bin"))
    loaded = StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.tokenizer_2.pad_token == "!"
    kwargs = {"num_inference_steps": 2, "output_type": "np"}
    expected = sdxl_pipe("a sks cat", generator=_gen(1), **kwargs).images
    np.testing.assert_array_equal(loaded("a sks cat", generator=_gen(1), **kwargs).images, expected)
