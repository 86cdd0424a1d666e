"""Subject masks for the masked metrics MCLIP-I and MDINO (JeDi): score the subject, not its background.

A generated image that copies a reference photo's background scores high CLIP-I/DINO without showing
the subject well; masking both sides to the subject removes that shortcut. A mask comes from the
image's alpha channel when it has one (masks given by the user, see :func:`with_mask`), else from a
text-prompted segmentation model, CLIPSeg, prompted with the subject's class noun. Pixels outside the
mask are set to one constant colour before embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamblend.benchmark import class_in_prompt
from dreamblend.metrics.encoders import ContentCache, image_key, load_pretrained

CLIPSEG_MODEL = "CIDAS/clipseg-rd64-refined"
BACKGROUND = (128, 128, 128)
"""Mid-grey: close to zero after CLIP's and DINO's input normalization, so it carries no feature."""


class CLIPSegSegmenter:
    """Binary masks of the region CLIPSeg matches with a text (probability >= ``threshold``).

    CLIPSeg is trained with a per-pixel binary cross-entropy, so 0.5 is its own decision boundary.
    Its low-resolution logits are resized bilinearly to the image before thresholding.
    """

    def __init__(
        self,
        model: str = CLIPSEG_MODEL,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        threshold: float = 0.5,
    ) -> None:
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
        self.device = torch.device(device)
        self.batch_size, self.threshold = batch_size, threshold
        loaded = load_pretrained(model, lambda: CLIPSegForImageSegmentation.from_pretrained(model))
        self.model = loaded.to(self.device).eval()
        self.processor = load_pretrained(model, lambda: CLIPSegProcessor.from_pretrained(model))
        self._masks = ContentCache(capacity=256)  # full-size masks: keep fewer

    def __call__(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[np.ndarray]:
        """One boolean ``(height, width)`` mask per image, for the text at the same position."""
        rgb = [image.convert("RGB") for image in images]
        keys = [(image_key(im), text) for im, text in zip(rgb, texts, strict=True)]
        return self._masks.get(keys, list(zip(rgb, texts, strict=True)), self._segment)

    @torch.inference_mode()
    def _segment(self, pairs: list[tuple[Image.Image, str]]) -> list[np.ndarray]:
        masks = []
        for start in range(0, len(pairs), self.batch_size):
            images, texts = zip(*pairs[start : start + self.batch_size], strict=True)
            inputs = self.processor(text=list(texts), images=list(images), padding=True, return_tensors="pt")
            logits = self.model(**inputs.to(self.device)).logits.float()
            logits = logits.reshape(len(images), 1, *logits.shape[-2:])  # older releases squeeze a batch of 1
            for image, row in zip(images, logits, strict=True):
                resized = torch.nn.functional.interpolate(
                    row[None], size=(image.height, image.width), mode="bilinear", align_corners=False
                )
                masks.append((resized[0, 0].sigmoid() >= self.threshold).cpu().numpy())
        return masks


def apply_mask(
    image: Image.Image, mask: np.ndarray, background: tuple[int, int, int] = BACKGROUND
) -> Image.Image:
    """The RGB image with every pixel outside ``mask`` (bool, image-sized) set to ``background``."""
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask of shape {mask.shape} does not match the {image.width}x{image.height} image")
    pixels = np.array(image.convert("RGB"))
    pixels[~mask] = background
    return Image.fromarray(pixels)


def with_mask(image: Image.Image, mask_path: Path) -> Image.Image:
    """``image`` carrying the user's mask (white = subject) as its alpha channel, for the masked metrics."""
    try:
        with Image.open(mask_path) as raw:
            mask = raw.convert("L")
    except FileNotFoundError:
        raise ValueError(
            f"no mask {mask_path} for this image; add it or leave out the masks folder"
        ) from None
    except OSError as exc:
        raise ValueError(f"mask {mask_path} is not a readable image ({exc}); replace it") from None
    if mask.size != image.size:
        raise ValueError(
            f"mask {mask_path} is {mask.width}x{mask.height} but its image is {image.width}x{image.height}; "
            "masks must have their image's size"
        )
    masked = image.convert("RGBA")
    masked.putalpha(mask)
    return masked


Segmenter = Callable[[Sequence[Image.Image], Sequence[str]], list[np.ndarray]]
"""Boolean subject masks for images, one text (the class noun) each: :class:`CLIPSegSegmenter`'s call."""


class SubjectMasker:
    """Cuts the subject out of images: the alpha channel when present, else CLIPSeg on the class noun.

    The class noun is the word(s) after the rare ``token`` in each image's prompt ("a sks dog on the
    beach" -> "dog"), or ``class_word`` when given.
    """

    def __init__(
        self,
        segmenter: Segmenter | None,
        *,
        token: str | None = "sks",
        class_word: str | None = None,
        background: tuple[int, int, int] = BACKGROUND,
    ) -> None:
        self.segmenter, self.token, self.class_word, self.background = (
            segmenter,
            token,
            class_word,
            background,
        )

    def subject_word(self, prompts: Sequence[str]) -> str:
        """The one class noun of a set of prompts about one subject."""
        if self.class_word:
            return self.class_word
        words = sorted({class_in_prompt(p, self.token) for p in prompts})
        if len(words) != 1:
            raise ValueError(
                f"prompts name different subject classes {words}; score one subject at a time or set "
                "class_word"
            )
        return words[0]

    def __call__(self, images: Sequence[Image.Image], word: str) -> list[Image.Image]:
        """``images`` with everything but the subject (``word``) replaced by the background colour."""
        masks: list[np.ndarray | None] = [
            np.asarray(im.getchannel("A")) >= 128 if im.mode == "RGBA" else None for im in images
        ]
        unmasked = [i for i, m in enumerate(masks) if m is None]
        if unmasked:
            if self.segmenter is None:
                raise ValueError(
                    f"{len(unmasked)} image(s) carry no mask and no segmentation model is loaded; give every "
                    "image a mask or let CLIPSeg segment them"
                )
            found = self.segmenter([images[i] for i in unmasked], [word] * len(unmasked))
            for i, mask in zip(unmasked, found, strict=True):
                masks[i] = mask
        return [apply_mask(im, m, self.background) for im, m in zip(images, masks, strict=True)]
