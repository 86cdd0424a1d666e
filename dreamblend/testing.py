"""Tiny, offline, deterministic Stable Diffusion fixtures.

Tests and demos need pipelines that are architecturally faithful to SD1.x/2.x and SDXL (same module
types, layer names, scheduler settings, tokenizer behaviour) but small enough to run on a CPU in a
fraction of a second, and buildable without any model hub. Everything here is built from configs with
seeded random weights; the only files written are tokenizer files in a directory you pass (or a
per-process temporary directory that is removed at exit).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = [
    "TINY_WORDS",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "MODEL_MAX_LENGTH",
    "build_bpe_vocab",
    "write_tiny_tokenizer_files",
    "tiny_clip_tokenizer",
    "tiny_sd_components",
    "tiny_sd_pipeline",
    "tiny_sdxl_components",
    "tiny_sdxl_pipeline",
    "save_tiny_pipeline",
    "token_indices",
    "token_index",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

# Whole words that must be single tokens: the DreamBooth benchmark's class names and prompt words, plus
# common prompt vocabulary, so attention maps can be taken for a word with one token index.
TINY_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        """
        a an the of in on at with and top around it its is by to for from under over near inside
        photo photograph picture image painting drawing sketch render portrait style art
        sks zwx ohwx
        dog cat backpack bowl can candle clock vase teapot toy sneaker boot glasses sunglasses
        stuffed animal plushie bear sloth wolf duck monster robot car cartoon emoji poop berry
        fancy colorful grey gray shiny wet cube shaped
        jungle snow beach street cobblestone fabric wooden floor city background mountain house
        rug forest wheat field tree autumn leaves water grass sunflowers mirror sidewalk crowded dirt
        road ocean milk floating eiffel tower table desk room sky sunset night river lake garden park
        pink blue purple red green white black yellow orange brown golden
        wearing hat santa rainbow scarf monocle chef outfit firefighter police shirt wizard
        man woman person sitting standing high quality detailed realistic close up view light
        """.split()
    )
)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """The 256 byte-level characters in byte order (printable bytes map to themselves).

    This is the reversible byte-to-unicode table CLIP's BPE works on; having every entry in the vocab
    (with and without the end-of-word suffix) guarantees that any text encodes without unknown tokens.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Segment one pre-tokenized word the way the `tokenizers` BPE model does.

    It repeatedly merges the adjacent pair with the lowest rank (leftmost on ties), one occurrence at a
    time, until no ranked pair remains.
    """
    symbols = list(symbols)
    while len(symbols) > 1:
        best: tuple[int, int] | None = None
        for pos in range(len(symbols) - 1):
            rank = ranks.get((symbols[pos], symbols[pos + 1]))
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, pos)
        if best is None:
            break
        pos = best[1]
        symbols[pos : pos + 2] = [symbols[pos] + symbols[pos + 1]]
    return symbols


def _word_symbols(word: str) -> list[str]:
    """Initial BPE symbols of a lowercase ASCII word: its characters, the last one with `</w>`."""
    return [*word[:-1], word[-1] + END_OF_WORD]


def build_bpe_vocab(words: Iterable[str] = TINY_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build a CLIP-style BPE vocabulary in which every word in `words` is exactly one token.

    Layout follows CLIP's: 256 byte characters, the same with `</w>`, merge results in merge order, then
    the start/end special tokens (so they hold the highest ids, as in real checkpoints). Merges are
    generated greedily: a word is segmented with the merges so far and, while it is still split, the
    merge of its leftmost pair is appended. Appended merges rank after all earlier ones, so they never
    change the segmentation of a word that is already a single token, and the loop terminates because
    each appended merge is new.
    """
    alphabet = _byte_alphabet()
    allowed = set(alphabet)
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + END_OF_WORD] = len(vocab)

    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for raw in words:
        word = raw.strip().lower()
        if not word:
            continue
        if not word.isalpha() or not set(word) <= allowed:
            raise ValueError(
                f"word {raw!r} cannot become a single CLIP token: use letters only (CLIP's pre-tokenizer "
                "splits digits, punctuation and spaces into separate words)"
            )
        while len(segments := _apply_merges(_word_symbols(word), ranks)) > 1:
            pair = (segments[0], segments[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


def write_tiny_tokenizer_files(path: str | Path, words: Iterable[str] = TINY_WORDS) -> Path:
    """Write `vocab.json`, `merges.txt` and `tokenizer_config.json` into `path` and return it.

    The layout matches a real SD1.5 `tokenizer/` folder (no `tokenizer.json`), so loading it goes
    through the same vocab/merges code path as a local checkpoint does.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_bpe_vocab(words)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


@functools.cache
def _default_tokenizer_dir(words: tuple[str, ...]) -> Path:
    """One temporary tokenizer folder per word list per process, removed at interpreter exit."""
    tmp = tempfile.mkdtemp(prefix="dreamblend-tiny-tokenizer-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return write_tiny_tokenizer_files(tmp, words)


def tiny_clip_tokenizer(
    path: str | Path | None = None,
    *,
    extra_words: Sequence[str] = (),
    pad_token: str = EOS_TOKEN,
) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocab makes `TINY_WORDS` (plus `extra_words`) single tokens.

    Files go to `path` if given, else to a cached per-process temporary folder. A fresh tokenizer object
    is returned on every call because tokenizers are mutable (e.g. textual inversion adds tokens).
    `pad_token="!"` mimics SDXL's second (OpenCLIP) tokenizer.
    """
    words = tuple(dict.fromkeys((*TINY_WORDS, *extra_words)))
    folder = write_tiny_tokenizer_files(path, words) if path is not None else _default_tokenizer_dir(words)
    # Note: in transformers 5, `CLIPTokenizer(vocab_file=..., merges_file=...)` silently builds a
    # 3-token vocab; the positional form or `from_pretrained` on the folder reads the files.
    tokenizer = CLIPTokenizer.from_pretrained(
        str(folder), pad_token=pad_token, model_max_length=MODEL_MAX_LENGTH, local_files_only=True
    )
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

# Offsets keep each component's weights independent of the others' construction order (a transformer
# takes the UNet's: it is the denoiser of the MMDiT fixtures in dreamblend.testing_mmdit).
_SEED_OFFSETS = {
    "unet": 0,
    "transformer": 0,
    "vae": 1,
    "text_encoder": 2,
    "text_encoder_2": 3,
    "text_encoder_3": 4,
}


def _seeded(seed: int, component: str, build: Any) -> Any:
    """Build a module under a fixed seed without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 16 + _SEED_OFFSETS[component])
        module = build()
    return module.eval()


def _text_config(tokenizer: CLIPTokenizer, hidden_size: int, *, projection_dim: int, hidden_act: str):
    """A tiny CLIP text config with special-token ids taken from the tokenizer.

    Setting `eos_token_id` to the real id (not the legacy value 2) makes the pooled output pick the
    first end-of-text position, as current CLIP checkpoints do.
    """
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae(seed: int, sample_size: int, scaling_factor: float, **config: Any) -> AutoencoderKL:
    """A two-level KL autoencoder (4 latent channels, downscale 2) with the checkpoint's scaling factor.

    ``config`` adds what a model family's VAE sets beyond that (SD3/FLUX: ``shift_factor``, no quant convs).
    """
    return _seeded(
        seed,
        "vae",
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            **config,
        ),
    )


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def sd_ddim_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """DDIM with SD1.x/2.x's training schedule (the DreamBlend paper's sampler)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_sd_components(
    seed: int = 0,
    *,
    prediction_type: str = "epsilon",
    upcast_attention: bool = False,
    num_heads: int | tuple[int, int, int] = 2,
    use_linear_projection: bool = False,
    sample_size: int = 16,
    tokenizer_path: str | Path | None = None,
) -> dict[str, Any]:
    """Components for a tiny SD1.x-shaped `StableDiffusionPipeline` (SD2.x-shaped with options).

    UNet: CrossAttnDown(32) -> CrossAttnDown(64) -> Down(64), cross-attention mid block, mirrored up
    path, two layers per block, cross_attention_dim 32. `num_heads` is passed as diffusers'
    `attention_head_dim`, which for these UNets means the number of heads. For an SD2.x-like model use
    `prediction_type="v_prediction", upcast_attention=True, use_linear_projection=True`.
    """
    _check_prediction_type(prediction_type)
    tokenizer = tiny_clip_tokenizer(tokenizer_path)
    cross_attention_dim = 32
    unet = _seeded(
        seed,
        "unet",
        lambda: UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            norm_num_groups=32,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=num_heads,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
        ),
    )
    vae = _tiny_vae(seed, sample_size * 2, scaling_factor=0.18215)
    text_config = _text_config(
        tokenizer, cross_attention_dim, projection_dim=cross_attention_dim, hidden_act="quick_gelu"
    )
    text_encoder = _seeded(seed, "text_encoder", lambda: CLIPTextModel(text_config))
    scheduler = sd_ddim_scheduler(prediction_type)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def tiny_sd_pipeline(seed: int = 0, **kwargs: Any) -> StableDiffusionPipeline:
    """A CPU-fast `StableDiffusionPipeline` built by `tiny_sd_components` (same keyword options)."""
    pipe = StableDiffusionPipeline(**tiny_sd_components(seed, **kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_components(
    seed: int = 0,
    *,
    prediction_type: str = "epsilon",
    scheduler: str = "euler",
    upcast_attention: bool = False,
    sample_size: int = 32,
    tokenizer_path: str | Path | None = None,
) -> dict[str, Any]:
    """Components for a tiny SDXL-shaped `StableDiffusionXLPipeline`.

    Like SDXL: Down(32) -> CrossAttnDown(64) -> CrossAttnDown(64) with transformer depths (1, 1, 2)
    (mid block depth 2), linear projections, `text_time` added conditioning, two text encoders of
    different widths (32 + 64 = cross_attention_dim 96; the second with a projection of 32 feeding the
    pooled embedding), a second tokenizer padding with "!", and SDXL's scheduler settings.
    `scheduler` is "euler" (SDXL's default) or "ddim".
    """
    _check_prediction_type(prediction_type)
    if scheduler not in ("euler", "ddim"):
        raise ValueError(f"scheduler must be 'euler' or 'ddim', got {scheduler!r}")
    tokenizer = tiny_clip_tokenizer(tokenizer_path)
    tokenizer_2 = tiny_clip_tokenizer(tokenizer_path, pad_token="!")
    hidden_1, hidden_2, projection_dim, time_dim = 32, 64, 32, 8
    unet = _seeded(
        seed,
        "unet",
        lambda: UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            norm_num_groups=32,
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4),
            cross_attention_dim=hidden_1 + hidden_2,
            use_linear_projection=True,
            upcast_attention=upcast_attention,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # six micro-conditioning numbers (original size, crop, target size) plus the pooled text
            projection_class_embeddings_input_dim=6 * time_dim + projection_dim,
        ),
    )
    vae = _tiny_vae(seed, sample_size * 2, scaling_factor=0.13025)
    config_1 = _text_config(tokenizer, hidden_1, projection_dim=hidden_1, hidden_act="quick_gelu")
    config_2 = _text_config(tokenizer_2, hidden_2, projection_dim=projection_dim, hidden_act="gelu")
    text_encoder = _seeded(seed, "text_encoder", lambda: CLIPTextModel(config_1))
    text_encoder_2 = _seeded(seed, "text_encoder_2", lambda: CLIPTextModelWithProjection(config_2))
    common = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": prediction_type,
    }
    if scheduler == "euler":
        sched: EulerDiscreteScheduler | DDIMScheduler = EulerDiscreteScheduler(
            interpolation_type="linear", use_karras_sigmas=False, **common
        )
    else:
        sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": sched,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sdxl_pipeline(seed: int = 0, **kwargs: Any) -> StableDiffusionXLPipeline:
    """A CPU-fast `StableDiffusionXLPipeline` built by `tiny_sdxl_components` (same keyword options).

    The invisible watermark is off so outputs do not depend on an optional package being installed.
    """
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed, **kwargs), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(pipe: DiffusionPipeline, path: str | Path) -> Path:
    """Save `pipe` to `path` as safetensors so tests exercise the real `from_pretrained` loading path."""
    path = Path(path)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


# --------------------------------------------------------------------------------------------------
# Token positions
# --------------------------------------------------------------------------------------------------


def token_indices(tokenizer: Any, prompt: str, word: str) -> list[int]:
    """Positions of `word`'s tokens at its first occurrence in the padded prompt sequence.

    Positions count the start token (position 0), matching the key axis of cross-attention maps. A word
    matches only as whole tokens, so "cat" is not found inside "cats". Raises ValueError if the word is
    empty or does not occur within the tokenizer's `model_max_length` tokens.
    """
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    if not word_ids:
        raise ValueError(f"word {word!r} produces no tokens")
    max_length = min(int(tokenizer.model_max_length), 4096)
    prompt_ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True).input_ids
    n = len(word_ids)
    for start in range(len(prompt_ids) - n + 1):
        if prompt_ids[start : start + n] == word_ids:
            return list(range(start, start + n))
    pieces = tokenizer.convert_ids_to_tokens(word_ids)
    raise ValueError(
        f"word {word!r} (tokens {pieces}) not found in prompt {prompt!r} as whole tokens within the first "
        f"{max_length} positions; words only match whole tokens (e.g. 'cat' is not in 'cats')"
    )


def token_index(tokenizer: Any, prompt: str, word: str) -> int:
    """Position of a single-token `word` in the tokenized prompt, for picking attention-map `tokens=`.

    Raises ValueError if the word is absent or spans several tokens (use `token_indices` then).
    """
    positions = token_indices(tokenizer, prompt, word)
    if len(positions) != 1:
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False).input_ids)
        raise ValueError(
            f"word {word!r} spans {len(positions)} tokens {pieces} at positions {positions}; "
            "use token_indices() to get all of them"
        )
    return positions[0]
