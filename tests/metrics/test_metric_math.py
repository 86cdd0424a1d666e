"""Metric math on fixed embeddings, against values worked out by hand.

Images are solid colours; a fake encoder maps each colour to a chosen vector, so every expected score
is a cosine of small vectors (1, 1/sqrt(2), 0 ...) computed on paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from dreamblend.metrics import (
    CLIPImageSimilarity,
    CLIPTextSimilarity,
    DINOSimilarity,
    Diversity,
    MaskedDINOSimilarity,
    Metric,
    MetricContext,
    available_metrics,
    build_metrics,
    register_metric,
)
from dreamblend.metrics.masking import SubjectMasker, apply_mask, with_mask

R2 = 1 / math.sqrt(2)
RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)


def solid(colour: tuple[int, int, int], size: int = 4) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


class FakeEncoder:
    """Embeds an image as the vector of its top-left pixel's colour, a text as its table entry."""

    def __init__(
        self, vectors: dict[tuple, Sequence[float]], texts: dict[str, Sequence[float]] | None = None
    ):
        self.vectors, self.text_vectors = vectors, texts or {}
        self.images_seen: list[Image.Image] = []
        self.texts_seen: list[str] = []

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.images_seen += images
        return np.array([self.vectors[im.convert("RGB").getpixel((0, 0))] for im in images], dtype=float)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.texts_seen += texts
        return np.array([self.text_vectors[t] for t in texts], dtype=float)


def test_reference_similarity_is_the_mean_cosine_to_each_real_image():
    encoder = FakeEncoder({RED: (1, 0), GREEN: (0, 1), BLUE: (2, 2)})
    metric = DINOSimilarity(encoder)
    scores = metric.score([solid(RED), solid(BLUE)], ["a sks dog"] * 2, [solid(RED), solid(GREEN)])
    # red: cos 1 to red, 0 to green; blue (2, 2): 1/sqrt(2) to both (the length does not matter)
    np.testing.assert_allclose(scores, [0.5, R2], rtol=0, atol=1e-12)
    assert scores.dtype == np.float64 and metric.role == "subject" and metric.needs_references
    assert CLIPImageSimilarity(encoder).name == "clip_i" and metric.name == "dino"


def test_clip_t_compares_each_image_with_its_prompt_without_the_rare_token():
    encoder = FakeEncoder(
        {RED: (1, 0, 0), GREEN: (0, 3, 4)},
        {"a dog on the beach": (1, 0, 0), "a red dog, wet": (0, 0, 1)},
    )
    metric = CLIPTextSimilarity(encoder, token="sks")
    scores = metric.score([solid(RED), solid(GREEN)], ["a sks dog on the beach", "a red sks dog, wet"])
    np.testing.assert_allclose(scores, [1.0, 0.8], rtol=0, atol=1e-12)  # (0,3,4).(0,0,1) / 5
    assert encoder.texts_seen == ["a dog on the beach", "a red dog, wet"]
    assert metric.role == "prompt" and not metric.needs_references


def test_diversity_is_the_mean_distance_to_the_other_images_of_the_same_prompt():
    encoder = FakeEncoder({RED: (1, 0), GREEN: (0, 1), BLUE: (1, 1), GREY: (5, 0)})
    prompts = ["on the beach", "on the beach", "in the snow", "on the beach", "in the snow", "alone"]
    images = [solid(c) for c in (RED, GREEN, RED, BLUE, GREY, BLUE)]
    scores = Diversity(encoder).score(images, prompts)
    # beach: red-green distance 1, red-blue and green-blue 1 - 1/sqrt(2); snow: red and grey are parallel
    beach_red = (1 + (1 - R2)) / 2
    expected = [beach_red, beach_red, 0.0, 1 - R2, 0.0, np.nan]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12)


def test_masked_similarity_masks_generated_and_real_images_with_the_class_noun():
    calls = []

    def segmenter(images, texts):  # the subject is the left half of every image
        calls.append(list(texts))
        return [np.arange(im.width)[None, :].repeat(im.height, 0) < im.width // 2 for im in images]

    encoder = FakeEncoder({RED: (1, 0), GREY: (0, 1)})
    masker = SubjectMasker(segmenter, token="sks")
    metric = MaskedDINOSimilarity(encoder, masker)
    generated = solid(RED)
    scores = metric.score([generated], ["a sks stuffed animal on the beach"], [solid(RED), solid(RED)])
    np.testing.assert_allclose(scores, [1.0], rtol=0, atol=1e-12)
    assert calls == [["stuffed animal"], ["stuffed animal", "stuffed animal"]]
    masked = np.asarray(encoder.images_seen[0])
    assert (masked[:, :2] == RED).all() and (masked[:, 2:] == GREY).all()  # background: mid-grey
    assert len(encoder.images_seen) == 3  # the references are masked too
    assert all(np.asarray(im)[0, 3].tolist() == list(GREY) for im in encoder.images_seen)


def test_a_mask_in_the_alpha_channel_is_used_without_segmenting(tmp_path):
    mask = Image.new("L", (4, 4), 0)
    mask.paste(255, (0, 0, 1, 4))  # the subject is the first column
    mask.save(tmp_path / "m.png")
    image = with_mask(solid(RED), tmp_path / "m.png")
    masker = SubjectMasker(None)
    (out,) = masker([image], "dog")
    pixels = np.asarray(out)
    assert (pixels[:, 0] == RED).all() and (pixels[:, 1:] == GREY).all()
    with pytest.raises(ValueError, match="carry no mask and no segmentation model"):
        masker([solid(RED)], "dog")
    with pytest.raises(ValueError, match="no mask .* add it"):
        with_mask(solid(RED), tmp_path / "missing.png")
    with pytest.raises(ValueError, match="masks must have their image's size"):
        with_mask(solid(RED, size=5), tmp_path / "m.png")
    with pytest.raises(ValueError, match="does not match"):
        apply_mask(solid(RED), np.ones((3, 3), bool))


def test_class_noun_comes_from_the_prompt_or_the_option():
    masker = SubjectMasker(None, token="sks")
    assert masker.subject_word(["a sks dog in the snow", "a red sks dog"]) == "dog"
    with pytest.raises(ValueError, match="different subject classes"):
        masker.subject_word(["a sks dog", "a sks cat"])
    with pytest.raises(ValueError, match="lacks the rare token 'sks'.*--token"):
        masker.subject_word(["a dog"])
    assert SubjectMasker(None, token="sks", class_word="corgi").subject_word(["a dog"]) == "corgi"


def test_bad_inputs_name_the_problem():
    metric = DINOSimilarity(FakeEncoder({RED: (1, 0)}))
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        metric.score([solid(RED)] * 2, ["a"])
    with pytest.raises(ValueError, match="no references given"):
        metric.score([solid(RED)], ["a"])
    with pytest.raises(ValueError, match="all zeros"):
        DINOSimilarity(FakeEncoder({RED: (0, 0)})).score([solid(RED)], ["a"], [solid(RED)])
    assert metric.score([], [], [solid(RED)]).shape == (0,)


class ConstantMetric(Metric):
    name = "toy_constant"
    role = "prompt"

    def __init__(self, value: float) -> None:
        self.value = value

    def compute(self, images, prompts, references):
        return np.full(len(images), self.value)


def test_registered_metrics_are_built_by_name_with_the_context(monkeypatch, scratch_registry):
    seen: list[MetricContext] = []

    def factory(context: MetricContext) -> Metric:
        seen.append(context)
        return ConstantMetric(float(context.model("toy") == "toy-model"))

    register_metric("toy_constant", factory)
    assert "toy_constant" in available_metrics()
    (metric,) = build_metrics(["toy_constant"], device="cpu", models={"toy": "toy-model"}, batch_size=3)
    assert metric.score([solid(RED)], ["x"]).tolist() == [1.0]
    assert seen[0].batch_size == 3 and seen[0].device == "cpu"
    with pytest.raises(ValueError, match="already registered"):
        register_metric("toy_constant", factory)
    register_metric("toy_constant", factory, replace=True)
    register_metric("toy_other", factory)
    with pytest.raises(ValueError, match="built a metric named 'toy_constant'"):
        build_metrics(["toy_other"], models={"toy": "x"})
    with pytest.raises(ValueError, match="unknown metric.*'nope'.*available"):
        build_metrics(["nope"])
    with pytest.raises(ValueError, match="repeat"):
        build_metrics(["toy_constant", "toy_constant"])
    with pytest.raises(ValueError, match="unknown option.*'colour'"):
        build_metrics(["toy_constant"], colour="red")
    with pytest.raises(ValueError, match="identifier"):
        register_metric("toy metric", factory)
    with pytest.raises(ValueError, match="no model given for 'unknown'"):
        MetricContext().model("unknown")
