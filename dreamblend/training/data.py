"""Instance/class images, their cached VAE latents, and a data order that is a pure function of the step.

DreamBooth trains on a handful of images, so every image is decoded, resized and VAE-encoded once up
front; a step only samples from the cached latent distributions. Which image a sample uses, and its
random numbers, are functions of the sample's global position (step, process, slot): a resumed run
draws exactly the batches an uninterrupted run would have drawn, without any sampler state to save,
and N processes with batch B draw the same samples as one process with batch N * B.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from dreamblend.training.errors import TrainingInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (seed, step, rank, ...); neighbours give unrelated streams."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def list_images(folder: str | Path, *, flag: str) -> list[Path]:
    """Image files directly in ``folder``, sorted; errors name the command-line ``flag`` to fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingInputError(
            f"{flag} {folder} is not a folder; point {flag} at a folder of .jpg/.png images"
        )
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        found = f"it holds {len(files)} other file(s), e.g. {files[0].name!r}" if files else "it is empty"
        raise TrainingInputError(
            f"{flag} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): {found}; "
            f"put the images in that folder or point {flag} at the folder that has them"
        )
    return images


@dataclass(frozen=True)
class PreparedImage:
    """A training image as the UNet sees it, plus SDXL's micro-conditioning numbers."""

    pixels: Tensor  # (3, R, R) in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]


def prepare_image(path: Path, resolution: int) -> PreparedImage:
    """Resize the shorter side to ``resolution`` and center-crop a square, as DreamBooth does."""
    try:
        with Image.open(path) as raw:
            image = ImageOps.exif_transpose(raw).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise TrainingInputError(f"{path} is not a readable image ({exc}); remove it or replace it") from None
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return PreparedImage(torch.from_numpy(array).permute(2, 0, 1).contiguous(), (height, width), (top, left))


@dataclass
class LatentBank:
    """Cached VAE posteriors; ``sample`` draws latents as ``latent_dist.sample`` would, shifted and scaled
    as the pipeline feeds its denoiser (SD3's and FLUX's VAEs have a shift; SD's none)."""

    mean: Tensor  # (N, C, h, w)
    std: Tensor
    time_ids: Tensor  # (N, 6): original size, crop top-left, target size (used by SDXL only)
    scaling_factor: float
    shift_factor: float = 0.0

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, index: Sequence[int], generators: Sequence[torch.Generator]) -> Tensor:
        """Latents of images ``index``, sample ``i`` drawn from ``generators[i]`` (CPU generators)."""
        idx = torch.as_tensor(index, device=self.mean.device)
        eps = torch.stack([torch.randn(self.mean.shape[1:], generator=g) for g in generators])
        latents = self.mean[idx] + self.std[idx] * eps.to(self.mean.device)
        return (latents - self.shift_factor) * self.scaling_factor


@torch.no_grad()
def encode_images(
    paths: Sequence[Path], vae: torch.nn.Module, resolution: int, device: torch.device, batch_size: int = 8
) -> LatentBank:
    """VAE-encode every image once (in float32: SDXL's VAE overflows in fp16) into a :class:`LatentBank`."""
    prepared = [prepare_image(p, resolution) for p in paths]
    means, stds = [], []
    for start in range(0, len(prepared), batch_size):
        pixels = torch.stack([p.pixels for p in prepared[start : start + batch_size]])
        dist = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    time_ids = torch.tensor(
        [[*p.original_size, *p.crop_top_left, resolution, resolution] for p in prepared],
        dtype=torch.float32,
        device=device,
    )
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return LatentBank(torch.cat(means), torch.cat(stds), time_ids, float(vae.config.scaling_factor), shift)


@functools.lru_cache(maxsize=64)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return tuple(torch.randperm(n, generator=generator).tolist())


def sample_positions(step: int, batch_size: int, *, rank: int = 0, world: int = 1) -> range:
    """Global sample positions of (1-based) ``step`` on process ``rank``.

    Step ``s`` owns positions ``[(s - 1) * world * batch_size, s * world * batch_size)`` and each
    process its own slice, so a position names one training sample whatever the process count.
    """
    start = ((step - 1) * world + rank) * batch_size
    return range(start, start + batch_size)


def image_at(n: int, position: int, *, seed: int) -> int:
    """The image drawn at global ``position``: an endless run of seeded permutations of ``range(n)``,
    so every image is seen once per epoch."""
    return _permutation(n, seed, position // n)[position % n]


def ensure_class_images(
    pipe,
    folder: str | Path,
    prompt: str,
    count: int,
    *,
    num_inference_steps: int,
    batch_size: int,
    seed: int,
) -> list[Path]:
    """The first ``count`` images of ``folder``, generating the missing ones with the base ``pipe``.

    Generated image ``i`` uses a generator seeded from ``(seed, i)``, so an interrupted generation
    continues with the same images it would have made.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    existing = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    missing = range(len(existing), count)
    for start in range(missing.start, missing.stop, batch_size):
        ids = list(range(start, min(start + batch_size, missing.stop)))
        generators = [torch.Generator().manual_seed(derive_seed(seed, i)) for i in ids]
        images = pipe(
            prompt,
            num_inference_steps=num_inference_steps,
            num_images_per_prompt=len(ids),
            generator=generators,
        ).images
        for i, image in zip(ids, images, strict=True):
            image.save(folder / f"class-{i:05d}.png")
    return list_images(folder, flag="--class-dir")[:count]
