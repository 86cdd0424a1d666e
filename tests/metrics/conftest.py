"""Tiny CLIP, DINO (ViT) and CLIPSeg models built from configs and saved like hub checkpoints.

The metrics load them through the same ``from_pretrained`` path as the real models, so loading,
preprocessing and batching are tested without a download.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from dreamblend.testing import BOS_TOKEN, EOS_TOKEN, build_bpe_vocab, write_tiny_tokenizer_files

SIZE = 32  # model input resolution


def _text_config() -> dict:
    vocab, _ = build_bpe_vocab()
    return dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )


VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=SIZE,
    patch_size=8,
)


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


@pytest.fixture(scope="session")
def metric_models(tmp_path_factory) -> dict[str, str]:
    """Folders of a tiny CLIP (with tokenizer and image processor), DINO ViT and CLIPSeg."""
    root = tmp_path_factory.mktemp("metric-models")
    clip = _seeded(
        0, lambda: CLIPModel(CLIPConfig(text_config=_text_config(), vision_config=VISION, projection_dim=16))
    )
    clip.save_pretrained(root / "clip")
    CLIPImageProcessor(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
    ).save_pretrained(root / "clip")
    write_tiny_tokenizer_files(root / "clip")
    _seeded(1, lambda: ViTModel(ViTConfig(**VISION), add_pooling_layer=False)).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(root / "dino")
    config = CLIPSegConfig(
        text_config=_text_config(),
        vision_config=VISION,
        projection_dim=16,
        extract_layers=[0, 1],
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    _seeded(2, lambda: CLIPSegForImageSegmentation(config)).save_pretrained(root / "clipseg")
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(root / "clipseg")
    write_tiny_tokenizer_files(root / "clipseg")
    return {name: str(root / name) for name in ("clip", "dino", "clipseg")}


@pytest.fixture
def scratch_registry(monkeypatch):
    """The metric registry as a copy a test may add to; installed plugins load into the original first,
    or restoring it would drop them while the registry believes they are loaded."""
    from dreamblend.metrics import registry

    registry.available_metrics()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry
