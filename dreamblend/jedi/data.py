"""Image sets on disk: the JeDi supplement's stacked format, and folders.

Stacked (the supplement's): ``NAME.png`` holds the set's square images one above the other, so the set
size is ``height // width``; ``NAME.txt`` holds their captions joined by ``<|split|>``. Folders: a
folder per set holding its images, each with a caption file of the same stem (``0.png`` + ``0.txt``).
One data folder may mix both: its image files are stacked sets, its sub-folders folder sets.

Every image is VAE-encoded once (as the DreamBooth trainer does); a set is then a list of indices into
one :class:`~dreamblend.training.data.LatentBank`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dreamblend.training.data import IMAGE_SUFFIXES, LatentBank
from dreamblend.training.errors import TrainingInputError

SPLIT_TOKEN = "<|split|>"
CAPTION_SUFFIX = ".txt"


@dataclass(frozen=True)
class ImageSetFile:
    """One set on disk: a stacked image file, or a folder of images; ``size`` images with captions."""

    path: Path
    size: int
    captions: tuple[str, ...]

    @property
    def stacked(self) -> bool:
        return self.path.is_file()

    def images(self) -> list[Image.Image]:
        """The set's images (RGB), in caption order."""
        if self.stacked:
            return split_stacked(_open(self.path), source=self.path)
        return [_open(p) for p in _folder_images(self.path)]


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as raw:
            return raw.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise TrainingInputError(f"{path} is not a readable image ({exc}); remove it or replace it") from None


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _read_caption(path: Path, image: Path) -> str:
    if not path.is_file():
        raise TrainingInputError(
            f"{image} has no caption file {path.name}; every image set needs its captions "
            f"(stacked: one .txt with the captions joined by {SPLIT_TOKEN}; folders: one .txt per image)"
        )
    return path.read_text(encoding="utf-8").strip()


def set_size_of(width: int, height: int, *, source: object) -> int:
    """The number of square images stacked in a ``width`` x ``height`` image (the supplement's h // w)."""
    if width < 1 or height % width:
        raise TrainingInputError(
            f"{source} is {width}x{height}: a stacked image set is square images one above the other, "
            "so its height must be a whole multiple of its width"
        )
    return height // width


def split_stacked(image: Image.Image, *, source: object = "the image") -> list[Image.Image]:
    """The square images of a vertically stacked set."""
    width, height = image.size
    n = set_size_of(width, height, source=source)
    return [image.crop((0, i * width, width, (i + 1) * width)) for i in range(n)]


def split_captions(text: str, size: int, *, source: object = "the captions") -> list[str]:
    """The ``size`` captions of a set, split at ``<|split|>``; a count that differs is an error."""
    captions = [part.strip() for part in text.split(SPLIT_TOKEN)]
    if len(captions) != size:
        raise TrainingInputError(
            f"{source} holds {len(captions)} caption(s) separated by {SPLIT_TOKEN} for {size} image(s); "
            "write exactly one caption per image"
        )
    return captions


def stack_images(images: Sequence[Image.Image]) -> Image.Image:
    """Stack equal square images vertically: the supplement's set file."""
    width = images[0].width
    if any(im.size != (width, width) for im in images):
        raise ValueError(f"a stacked set needs square images of one size, got {[im.size for im in images]}")
    out = Image.new("RGB", (width, width * len(images)))
    for i, image in enumerate(images):
        out.paste(image.convert("RGB"), (0, i * width))
    return out


def write_stacked_set(path: Path, images: Sequence[Image.Image], captions: Sequence[str]) -> None:
    """Write ``path`` (an image file) and its caption file in the supplement's format."""
    if len(images) != len(captions) or any(SPLIT_TOKEN in c for c in captions):
        raise ValueError(f"need one caption per image, none containing {SPLIT_TOKEN}")
    stack_images(images).save(path)
    path.with_suffix(CAPTION_SUFFIX).write_text(SPLIT_TOKEN.join(captions) + "\n", encoding="utf-8")


def find_image_sets(folder: str | Path, *, flag: str = "--data") -> list[ImageSetFile]:
    """Every set in ``folder`` (stacked files and set folders), sorted by name, captions read and checked."""
    root = Path(folder)
    if not root.is_dir():
        raise TrainingInputError(f"{flag} {root} is not a folder; point it at a folder of image sets")
    sets = []
    for path in sorted(root.iterdir()):
        if _is_image(path):
            with Image.open(path) as probe:
                size = set_size_of(*probe.size, source=path)
            text = _read_caption(path.with_suffix(CAPTION_SUFFIX), path)
            sets.append(
                ImageSetFile(path, size, tuple(split_captions(text, size, source=path.with_suffix(".txt"))))
            )
        elif path.is_dir() and not path.name.startswith("."):
            images = _folder_images(path)
            if images:
                captions = tuple(_read_caption(p.with_suffix(CAPTION_SUFFIX), p) for p in images)
                sets.append(ImageSetFile(path, len(images), captions))
    if not sets:
        raise TrainingInputError(
            f"{flag} {root} holds no image sets: put stacked set images (NAME.png + NAME.txt) or one "
            "folder per set (images with a .txt caption each) in it"
        )
    return sets


def square_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """``(3, R, R)`` in [-1, 1]: the image's centre square resized to ``resolution``."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    square = square.resize((resolution, resolution), Image.Resampling.BILINEAR)
    array = np.asarray(square, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class EncodedSets:
    """All sets' images as one latent bank; ``members[i]`` are set ``i``'s rows, ``captions`` per row."""

    bank: LatentBank
    members: list[list[int]]
    captions: list[str]


@torch.no_grad()
def encode_sets(
    sets: Sequence[ImageSetFile],
    vae: torch.nn.Module,
    resolution: int,
    device: torch.device,
    batch_size: int = 16,
) -> EncodedSets:
    """VAE-encode every image of every set once (float32 posteriors), a batch at a time, so only the
    latents of a large data set are held in memory, never all of its pixels."""
    members: list[list[int]] = []
    captions: list[str] = []
    means, stds, pending = [], [], []

    def flush() -> None:
        batch = torch.stack(pending).to(device=device, dtype=vae.dtype)
        dist = vae.encode(batch).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
        pending.clear()

    count = 0
    for entry in sets:
        images = entry.images()
        members.append(list(range(count, count + len(images))))
        captions.extend(entry.captions)
        count += len(images)
        for image in images:
            pending.append(square_pixels(image, resolution))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    time_ids = torch.zeros(count, 6, device=device)  # SDXL micro-conditioning: unused (SD1.x/2.x only)
    bank = LatentBank(torch.cat(means), torch.cat(stds), time_ids, float(vae.config.scaling_factor))
    return EncodedSets(bank, members, captions)
