"""Image and text embeddings from CLIP and DINO, batched, on any device, cached by content.

Several metrics embed the same pictures (CLIP-I and CLIP-T share each generated image; DINO and
diversity too; the subject's references recur in every batch), so encoders keep a bounded cache keyed
by the image's pixels or the text: each distinct input goes through the network once.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamblend.hub import hub_errors

CLIP_MODEL = "openai/clip-vit-base-patch32"
DINO_MODEL = "facebook/dino-vits16"


def image_key(image: Image.Image) -> tuple[str, tuple[int, int], str]:
    """A cache key for an image's pixels (mode, size and a digest of the bytes)."""
    return image.mode, image.size, hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest()


class ContentCache:
    """The last ``capacity`` results (embeddings, masks) by input; computes only the misses, in one call."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()

    def get(
        self, keys: Sequence[Hashable], items: Sequence[Any], compute: Callable[[list], Sequence[Any]]
    ) -> list[Any]:
        """Results for ``items`` in order; ``compute`` maps a list of the uncached items to their results."""
        missing = list({k: i for i, k in enumerate(keys) if k not in self._entries}.items())
        if missing:
            rows = compute([items[i] for _, i in missing])
            for (key, _), row in zip(missing, rows, strict=True):
                self._entries[key] = row
        out = []
        for key in keys:
            self._entries.move_to_end(key)
            out.append(self._entries[key])
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return out


def load_pretrained(name: str, load: Callable[[], Any]) -> Any:
    """``load()`` with one-line errors for a hub id that cannot be fetched (offline, missing, gated)."""
    with hub_errors(name):
        return load()


class ImageEncoder(ABC):
    """Batched, cached image embeddings; subclasses load a model and say which features to take."""

    processor: Any
    """The model's image processor (resizing, cropping and normalization as the model expects)."""
    dtype: torch.dtype

    def __init__(self, device: str | torch.device, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._images = ContentCache()

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Float64 embeddings ``(len(images), dim)`` of RGB versions of ``images``."""
        rgb = [image.convert("RGB") for image in images]
        return np.stack(self._images.get([image_key(im) for im in rgb], rgb, self._embed_images))

    @torch.inference_mode()
    def _embed_images(self, images: list[Image.Image]) -> np.ndarray:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = self.processor(images=images[start : start + self.batch_size], return_tensors="pt")
            pixels = batch["pixel_values"].to(self.device, self.dtype)
            chunks.append(self._image_features(pixels).double().cpu().numpy())
        return np.concatenate(chunks)

    @abstractmethod
    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """One embedding row per preprocessed image."""


class CLIPEncoder(ImageEncoder):
    """CLIP's projected image and text embeddings (the space CLIP-I and CLIP-T compare in)."""

    def __init__(self, model: str = CLIP_MODEL, *, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        super().__init__(device, batch_size)
        self.model = load_pretrained(model, lambda: CLIPModel.from_pretrained(model)).to(self.device).eval()
        self.dtype = self.model.dtype
        self.processor = load_pretrained(model, lambda: CLIPImageProcessor.from_pretrained(model))
        self.tokenizer = load_pretrained(model, lambda: CLIPTokenizer.from_pretrained(model))
        self._texts = ContentCache()

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Float64 embeddings ``(len(texts), dim)``; texts past CLIP's 77 tokens are truncated."""
        return np.stack(self._texts.get(list(texts), list(texts), self._embed_texts))

    @torch.inference_mode()
    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                texts[start : start + self.batch_size], padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            pooled = self.model.text_model(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).pooler_output
            chunks.append(self.model.text_projection(pooled).double().cpu().numpy())
        return np.concatenate(chunks)


class DINOEncoder(ImageEncoder):
    """DINO's CLS token of the last hidden state (after the final layer norm), as the benchmark uses."""

    def __init__(self, model: str = DINO_MODEL, *, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        super().__init__(device, batch_size)
        config = load_pretrained(model, lambda: AutoConfig.from_pretrained(model))
        # DINO checkpoints ship no pooler; ViT would otherwise add a randomly initialized one and warn.
        options = {"add_pooling_layer": False} if config.model_type == "vit" else {}
        self.model = load_pretrained(model, lambda: AutoModel.from_pretrained(model, **options))
        self.model = self.model.to(self.device).eval()
        self.dtype = self.model.dtype
        self.processor = load_pretrained(model, lambda: AutoImageProcessor.from_pretrained(model))

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]
