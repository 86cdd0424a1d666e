"""The DreamBooth benchmark's metrics, per image: DINO, CLIP-I, CLIP-T, diversity, and JeDi's MDINO, MCLIP-I.

Definitions (DreamBooth, Ruiz et al. 2023; the DreamBlend supplement fixes the models: CLIP ViT-B/32,
DINO ViT-S/16):

- CLIP-I / DINO: mean cosine similarity between the image's embedding and each of the subject's real
  images' embeddings (DINO: CLS token of the last hidden state); averaged over images it is the
  benchmark's "average pairwise cosine similarity".
- CLIP-T: cosine similarity between the image's and its prompt's CLIP embeddings, with the rare token
  removed from the prompt ("a sks dog" -> "a dog").
- diversity: mean DINO distance (1 - cosine) from the image to the other images of the same prompt.
- MCLIP-I / MDINO (JeDi): CLIP-I / DINO with generated and real images masked to the subject.

Scores are plain cosines in [-1, 1] (higher is better). No maintained library computes these exact
quantities: torchmetrics' ``CLIPScore`` reports ``100 * max(cos, 0)`` for matched image-text (or
image-image) pairs, a rescaled and clipped CLIP-T that cannot average over all reference images, and
no library computes DINO subject fidelity or the masked variants as defined above.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

import numpy as np
from PIL import Image

from dreamblend.benchmark import remove_token
from dreamblend.metrics.base import Metric, Role
from dreamblend.metrics.masking import SubjectMasker


class ImageEmbedder(Protocol):
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...


class TextImageEmbedder(ImageEmbedder, Protocol):
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("an embedding is all zeros; its cosine similarity is undefined")
    return rows / norms


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarities ``(len(a), len(b))`` between the rows of ``a`` and ``b``, in float64."""
    return _unit(a) @ _unit(b).T


def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row ``i`` of ``a`` with row ``i`` of ``b``."""
    return np.einsum("id,id->i", _unit(a), _unit(b))


def mean_pairwise_distance(embeddings: np.ndarray, groups: Sequence[object]) -> np.ndarray:
    """Per row: mean ``1 - cos`` to the other rows of its group; NaN for a row alone in its group."""
    keys = list(groups)
    out = np.full(len(keys), np.nan)
    for key in dict.fromkeys(keys):
        members = [i for i, k in enumerate(keys) if k == key]
        if len(members) > 1:
            distance = 1.0 - cosine_matrix(embeddings[members], embeddings[members])
            out[members] = (distance.sum(axis=1) - np.diag(distance)) / (len(members) - 1)
    return out


class ReferenceSimilarity(Metric):
    """Subject fidelity: mean cosine similarity to the subject's real images (CLIP-I, DINO)."""

    role: ClassVar[Role] = "subject"
    needs_references: ClassVar[bool] = True

    def __init__(self, encoder: ImageEmbedder, masker: SubjectMasker | None = None) -> None:
        self.encoder, self.masker = encoder, masker

    def compute(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image]
    ) -> np.ndarray:
        if self.masker is not None:
            word = self.masker.subject_word(prompts)
            images, references = self.masker(images, word), self.masker(references, word)
        similarity = cosine_matrix(self.encoder.embed_images(images), self.encoder.embed_images(references))
        return similarity.mean(axis=1)


class _MaskedReferenceSimilarity(ReferenceSimilarity):
    """The same similarity after cutting the subject out of both sides (JeDi's masked metrics)."""

    def __init__(self, encoder: ImageEmbedder, masker: SubjectMasker) -> None:
        super().__init__(encoder, masker)


class DINOSimilarity(ReferenceSimilarity):
    name = "dino"


class CLIPImageSimilarity(ReferenceSimilarity):
    name = "clip_i"


class MaskedDINOSimilarity(_MaskedReferenceSimilarity):
    name = "mdino"


class MaskedCLIPImageSimilarity(_MaskedReferenceSimilarity):
    name = "mclip_i"


class CLIPTextSimilarity(Metric):
    """Prompt fidelity: cosine similarity of the image and its prompt without the rare token (CLIP-T)."""

    name = "clip_t"
    role: ClassVar[Role] = "prompt"

    def __init__(self, encoder: TextImageEmbedder, token: str | None = "sks") -> None:
        self.encoder, self.token = encoder, token

    def compute(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image]
    ) -> np.ndarray:
        texts = [remove_token(prompt, self.token) for prompt in prompts]
        return paired_cosine(self.encoder.embed_images(images), self.encoder.embed_texts(texts))


class Diversity(Metric):
    """Mean DINO distance (1 - cosine) to the other images of the same prompt; NaN for a lone image.

    Give it every image of one prompt (and one operating point) at once: images are grouped by prompt
    text, so images of several prompts may share a call.
    """

    name = "diversity"
    role: ClassVar[Role] = "diversity"

    def __init__(self, encoder: ImageEmbedder) -> None:
        self.encoder = encoder

    def compute(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image]
    ) -> np.ndarray:
        return mean_pairwise_distance(self.encoder.embed_images(images), prompts)
