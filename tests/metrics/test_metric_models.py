"""Loading the metric models from folders (as from the hub), their preprocessing, batching and caching.

Scores are checked against the models' own forward passes, called here independently of the metric
code: CLIP's ``logits_per_image`` (cosine times the logit scale) and ViT's CLS token.
"""

from __future__ import annotations

import huggingface_hub
import numpy as np
import pytest
import torch
from metric_helpers import random_images
from transformers import CLIPModel, CLIPProcessor, ViTImageProcessor, ViTModel

from dreamblend.hub import ModelUnavailableError
from dreamblend.metrics import build_metrics
from dreamblend.metrics.encoders import CLIPEncoder, DINOEncoder
from dreamblend.metrics.masking import CLIPSegSegmenter, apply_mask

PROMPTS = ["a sks dog in the jungle", "a sks dog in the jungle", "a red sks dog", "a red sks dog"]


def _cos(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    return (a @ b.T).double().numpy()


@pytest.fixture(scope="module")
def metrics(metric_models):
    names = ["dino", "clip_i", "clip_t", "diversity", "mdino", "mclip_i"]
    built = build_metrics(names, device="cpu", batch_size=3, models=metric_models, token="sks")
    return dict(zip(names, built, strict=True))


def test_clip_scores_match_clips_own_forward(metric_models, metrics):
    images, references = random_images(4, seed=1), random_images(3, seed=2, size=(60, 50))
    model = CLIPModel.from_pretrained(metric_models["clip"]).eval()
    processor = CLIPProcessor.from_pretrained(metric_models["clip"])
    texts = ["a dog in the jungle", "a dog in the jungle", "a red dog", "a red dog"]
    with torch.no_grad():
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        out = model(**inputs)
        scale = model.logit_scale.exp()
        clip_t = (out.logits_per_image / scale).diagonal().double().numpy()
        ref_pixels = processor(images=references, return_tensors="pt")["pixel_values"]
        ref_embeds = model(**processor(text=["x"], images=references, return_tensors="pt")).image_embeds
        assert ref_pixels.shape[-2:] == (32, 32)  # the folder's processor: resized and cropped to 32
        clip_i = _cos(out.image_embeds, ref_embeds).mean(axis=1)
    np.testing.assert_allclose(metrics["clip_t"].score(images, PROMPTS), clip_t, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        metrics["clip_i"].score(images, PROMPTS, references), clip_i, rtol=0, atol=1e-5
    )


def test_dino_uses_the_cls_token_of_the_last_hidden_state(metric_models, metrics):
    images, references = random_images(4, seed=3), random_images(2, seed=4)
    model = ViTModel.from_pretrained(metric_models["dino"], add_pooling_layer=False).eval()
    processor = ViTImageProcessor.from_pretrained(metric_models["dino"])
    with torch.no_grad():
        cls = lambda ims: model(**processor(images=ims, return_tensors="pt")).last_hidden_state[:, 0]
        generated, real = cls(images), cls(references)
    expected = _cos(generated, real).mean(axis=1)
    np.testing.assert_allclose(
        metrics["dino"].score(images, PROMPTS, references), expected, rtol=0, atol=1e-5
    )
    within = 1 - _cos(generated, generated)
    diversity = metrics["diversity"].score(images, PROMPTS)  # pairs of images share a prompt
    np.testing.assert_allclose(diversity, [within[0, 1], within[0, 1], within[2, 3], within[2, 3]], atol=1e-5)


def test_batches_and_the_cache_do_not_change_embeddings(metric_models):
    images = random_images(5, seed=5)
    one_batch = DINOEncoder(metric_models["dino"], batch_size=8).embed_images(images)
    encoder = DINOEncoder(metric_models["dino"], batch_size=2)
    np.testing.assert_allclose(encoder.embed_images(images), one_batch, rtol=0, atol=1e-5)
    calls = []
    original = encoder._embed_images
    encoder._embed_images = lambda batch: calls.append(len(batch)) or original(batch)
    again = encoder.embed_images([images[4], random_images(1, seed=6)[0], images[0]])
    assert calls == [1]  # only the new image went through the network
    np.testing.assert_allclose(again[[0, 2]], one_batch[[4, 0]], rtol=0, atol=1e-5)


def test_clip_texts_longer_than_77_tokens_are_truncated(metric_models):
    encoder = CLIPEncoder(metric_models["clip"])
    long = "a sks dog " + "on the beach " * 40
    assert encoder.embed_texts([long]).shape == (1, 16)


def test_masked_metrics_segment_with_clipseg(metric_models, metrics):
    images, references = random_images(2, seed=7), random_images(2, seed=8)
    segmenter = CLIPSegSegmenter(metric_models["clipseg"], threshold=0.5)
    masks = segmenter(images, ["dog", "dog"])
    assert [m.shape for m in masks] == [(48, 40), (48, 40)] and all(m.dtype == bool for m in masks)
    assert 0 < sum(m.sum() for m in masks) < sum(m.size for m in masks)  # some pixels in, some out
    cut = lambda ims: [
        apply_mask(im, m) for im, m in zip(ims, segmenter(ims, ["dog"] * len(ims)), strict=True)
    ]
    for masked, plain in (("mdino", "dino"), ("mclip_i", "clip_i")):
        scores = metrics[masked].score(images, PROMPTS[:2], references)
        expected = metrics[plain].score(cut(images), PROMPTS[:2], cut(references))
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        CLIPSegSegmenter(metric_models["clipseg"], threshold=1.0)


def test_an_unreachable_hub_id_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it too
    with pytest.raises(ModelUnavailableError) as info:
        build_metrics(["dino"], models={"dino": "no-such-org/no-such-dino"})
    message = str(info.value)
    assert "\n" not in message and "no-such-org/no-such-dino" in message and "HF_HUB_OFFLINE" in message
