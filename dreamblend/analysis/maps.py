"""Per-word cross-attention heatmaps of one image (the paper's Fig. 3).

A word's map is the conditional branch's head-mean cross-attention to its tokens (the mean over the
pieces of a word split by the tokenizer), averaged over every denoising step and over the layers of
one map size, then upsampled onto the image. Maps are recorded for a single checkpoint (any diffusers
Stable Diffusion pipeline) or for a DreamBlend run, whose rows are G's maps, E sampled alone and E
under G's guidance, all from one start latent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dreamblend.analysis.figures import new_figure, save_png
from dreamblend.store import AttentionStore
from dreamblend.tokens import word_positions

Size = tuple[int, int]


def map_grid(num_queries: int, latent_size: Size) -> Size:
    """The (rows, columns) of a layer's ``num_queries`` positions for latents of ``latent_size``.

    UNet levels halve the latent, rounding up (stride-2 convolutions with padding).
    """
    height, width = latent_size
    factor = 1
    while factor <= max(height, width):
        grid = (math.ceil(height / factor), math.ceil(width / factor))
        if grid[0] * grid[1] == num_queries:
            return grid
        factor *= 2
    raise ValueError(
        f"a map of {num_queries} positions does not fit {height}x{width} latents at any UNet level"
    )


class MapAverage:
    """Running mean of cross-attention maps over steps and layers, one per map size, heads averaged.

    ``add`` takes ``{layer: (B, H, M, T) or (B, M, T)}`` as a store records it; ``mean(size)`` is the
    ``(B, T, rows, columns)`` average of every layer and step of that size seen so far.
    """

    def __init__(self, latent_size: Size) -> None:
        self.latent_size = latent_size
        self._sums: dict[Size, Tensor] = {}
        self._counts: dict[Size, int] = {}

    def add(self, maps: Mapping[str, Tensor], rows: slice = slice(None)) -> None:
        for value in maps.values():
            value = value[rows].detach().float()
            if value.dim() == 4:
                value = value.mean(dim=1)
            batch, queries, tokens = value.shape
            grid = map_grid(queries, self.latent_size)
            value = value.transpose(1, 2).reshape(batch, tokens, *grid).cpu()
            self._sums[grid] = self._sums[grid] + value if grid in self._sums else value
            self._counts[grid] = self._counts.get(grid, 0) + 1

    @property
    def sizes(self) -> list[Size]:
        return sorted(self._sums)

    def pick(self, resolution: int | None = None) -> Size:
        """The map size for ``resolution`` (its shorter side); default: the one nearest a quarter of the
        latent's shorter side (16x16 for SD1.5 at 512 px), the larger on a tie."""
        if not self._sums:
            raise ValueError("no maps were recorded; the model has no cross-attention layers to read")
        if resolution is not None:
            for size in self.sizes:
                if min(size) == resolution:
                    return size
            available = [min(s) for s in self.sizes]
            raise ValueError(f"no cross-attention maps of resolution {resolution}; this run has {available}")
        target = min(self.latent_size) / 4
        return min(self.sizes, key=lambda s: (abs(min(s) - target), -min(s)))

    def mean(self, size: Size) -> Tensor:
        return self._sums[size] / self._counts[size]


@dataclass(frozen=True)
class WordMaps:
    """One image and its words' attention ``maps`` (words, rows, columns), averaged and unnormalized."""

    label: str
    image: np.ndarray  # (height, width, 3) uint8
    words: tuple[str, ...]
    maps: Tensor


def word_maps(average: MapAverage, tokenizer: Any, prompt: str, words: Sequence[str], size: Size) -> Tensor:
    """``(len(words), rows, columns)``: each word's mean map over its token positions (batch row 0)."""
    token_maps = average.mean(size)[0]
    return torch.stack([token_maps[word_positions(tokenizer, prompt, w)].mean(dim=0) for w in words])


def _check_call(words: Sequence[str], call_kwargs: Mapping[str, Any]) -> tuple[str, ...]:
    if isinstance(words, str) or not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"words must be a non-empty list of words of the prompt, got {words!r}")
    if call_kwargs.get("num_images_per_prompt", 1) != 1:
        raise ValueError(
            "maps are drawn for one image: leave num_images_per_prompt at 1 (use seeds for more)"
        )
    return tuple(words)


def _latent_size(pipe: Any, height: int | None, width: int | None) -> tuple[int, int, Size]:
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or default, width or default
    return height, width, (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)


def _uint8(image: Any) -> np.ndarray:
    return (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)


def load_plain_pipeline(
    model: str | Path,
    *,
    base_model: str | Path | None = None,
    torch_dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> Any:
    """A stock diffusers pipeline for a base model (folder or hub id) or a ``dreamblend train`` checkpoint.

    A checkpoint folder is applied to ``base_model`` if given, else to the base model its manifest names
    (pass ``base_model`` when the run was trained from a path that has moved).
    """
    from diffusers import DiffusionPipeline

    from dreamblend.hub import hub_errors
    from dreamblend.training.trajectory import MANIFEST_FILE, load_checkpoint, read_checkpoint

    def stock(name: str | Path) -> Any:
        with hub_errors(str(name)):
            return DiffusionPipeline.from_pretrained(
                str(name), torch_dtype=torch_dtype, use_safetensors=None if allow_pickle else True
            )

    if (Path(model) / MANIFEST_FILE).is_file():
        base = stock(base_model or read_checkpoint(model).base_model)
        return load_checkpoint(model, base, torch_dtype=torch_dtype)
    return stock(model)


def checkpoint_word_maps(
    pipe: Any,
    prompt: str,
    words: Sequence[str],
    *,
    seed: int = 0,
    resolution: int | None = None,
    height: int | None = None,
    width: int | None = None,
    label: str = "checkpoint",
    **call_kwargs: Any,
) -> WordMaps:
    """Sample ``prompt`` once with a diffusers SD/SDXL pipeline and return its words' maps.

    ``call_kwargs`` go to the pipeline (``num_inference_steps``, ``guidance_scale``, ...).
    """
    from dreamblend.custom_diffusion import attach_dreamblend

    words = _check_call(words, call_kwargs)
    height, width, latent = _latent_size(pipe, height, width)
    average = MapAverage(latent)
    store = AttentionStore(head_mean=True)

    def collect(pipeline: Any, i: int, t: Tensor, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        average.add(store.maps, rows=slice(-1, None))  # [uncond; cond] with CFG: the last row is cond
        return {}

    generator = torch.Generator().manual_seed(seed)
    with attach_dreamblend(pipe.unet, store), store.record():
        kwargs = {**call_kwargs, "height": height, "width": width, "generator": generator}
        out = pipe(prompt, output_type="np", callback_on_step_end=collect, **kwargs)
    maps = word_maps(average, pipe.tokenizer, prompt, words, average.pick(resolution))
    return WordMaps(label, _uint8(out.images[0]), words, maps)


def blend_word_maps(
    pipe: Any,
    prompt: str,
    words: Sequence[str],
    *,
    seed: int = 0,
    resolution: int | None = None,
    height: int | None = None,
    width: int | None = None,
    **call_kwargs: Any,
) -> list[WordMaps]:
    """Three rows from one start latent: G's maps, E sampled alone, and E under G's guidance.

    ``pipe`` is a DreamBlend pipeline; ``call_kwargs`` go to its call (``cross_attention_guidance_scale``,
    role adapters, ...). Guidance compares every token, as the paper does, so the maps hold all words.
    """
    if "attention_tokens" in call_kwargs:
        raise TypeError("blend_word_maps records every token; leave out attention_tokens")
    words = _check_call(words, call_kwargs)
    height, width, latent = _latent_size(pipe, height, width)
    guidance, alone, blend = (MapAverage(latent) for _ in range(3))

    def run(averages: dict[str, MapAverage], **extra: Any) -> Any:
        def collect(role: str, i: int, maps: dict[str, Tensor]) -> None:
            if role in averages:
                averages[role].add(maps)

        generator = torch.Generator().manual_seed(seed)
        kwargs = {**call_kwargs, **extra, "height": height, "width": width, "generator": generator}
        return pipe(prompt, output_type="np", attention_callback=collect, **kwargs)

    blended = run({"guidance": guidance, "edit": blend}, return_reference=True)
    plain = run({"edit": alone}, cross_attention_guidance_scale=0.0)
    size = blend.pick(resolution)
    rows = (
        ("G (guidance)", guidance, blended.reference_images[0]),
        ("E alone", alone, plain.images[0]),
        ("DreamBlend", blend, blended.images[0]),
    )
    return [
        WordMaps(label, _uint8(image), words, word_maps(average, pipe.tokenizer, prompt, words, size))
        for label, average, image in rows
    ]


def normalize_per_word(maps: Tensor) -> Tensor:
    """Each map scaled to [0, 1] by its own minimum and maximum (a flat map becomes 0)."""
    flat = maps.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    scale = torch.where(high > low, high - low, torch.ones_like(high))
    return ((flat - low[:, None]) / scale[:, None]).view_as(maps)


def overlay(image: np.ndarray, heat: Tensor, colormap: Any, strength: float = 0.6) -> np.ndarray:
    """``heat`` (rows, columns in [0, 1]) upsampled bilinearly onto ``image`` and blended over it."""
    size = image.shape[:2]
    up = F.interpolate(heat[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    colors = colormap(up.clamp(0, 1).numpy())[..., :3]
    return ((1 - strength) * image / 255.0 + strength * colors).clip(0, 1)


def plot_word_maps(rows: Sequence[WordMaps], path: str | Path, *, title: str | None = None) -> Path:
    """A PNG grid: one row per :class:`WordMaps` (its image, then each word's normalized map over it)."""
    if not rows:
        raise ValueError("no maps to plot")
    from matplotlib import colormaps

    words = rows[0].words
    if any(r.words != words for r in rows):
        raise ValueError("every row must show the same words")
    colormap = colormaps["jet"]
    figure = new_figure(1.9 * (len(words) + 1), 2.0 * len(rows) + (0.3 if title else 0))
    axes = figure.subplots(len(rows), len(words) + 1, squeeze=False)
    for r, row in enumerate(rows):
        axes[r, 0].imshow(row.image)
        axes[r, 0].set_ylabel(row.label)
        heat = normalize_per_word(row.maps)
        for c, word in enumerate(words, start=1):
            axes[r, c].imshow(overlay(row.image, heat[c - 1], colormap))
            if r == 0:
                axes[r, c].set_title(word)
    axes[0, 0].set_title("image")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        figure.suptitle(title)
    return save_png(figure, path)
