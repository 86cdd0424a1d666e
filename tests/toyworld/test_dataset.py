"""The training dataset is deterministic per index and never shows a held-out combination."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dreamblend.toyworld import (
    BACKGROUNDS,
    CLASSES,
    COLOURS,
    HELD_OUT_COMBINATIONS,
    ToyWorldDataset,
    held_out_combinations,
    parse_caption,
    sample_scene,
)


def test_held_out_triples_are_valid_and_each_part_still_trains():
    held_out = held_out_combinations()
    assert len(held_out) == len(HELD_OUT_COMBINATIONS) >= 6
    assert {c for c, _, _ in held_out} == set(CLASSES)
    assert {b for _, _, b in held_out} == set(BACKGROUNDS)
    for cls, colour, background in held_out:
        assert cls in CLASSES and colour in COLOURS and background in BACKGROUNDS
    # A held-out triple tests composition only if each of its pairs is seen with other partners.
    triples = set(itertools.product(CLASSES, COLOURS, BACKGROUNDS)) - held_out
    for cls, colour, background in held_out:
        assert any(t[:2] == (cls, colour) for t in triples)
        assert any(t[0] == cls and t[2] == background for t in triples)
        assert any(t[1:] == (colour, background) for t in triples)


def test_the_training_sampler_never_draws_a_held_out_triple():
    held_out = held_out_combinations()
    rng = np.random.default_rng(0)
    drawn = {(s.cls, s.colour, s.background) for s in (sample_scene(rng) for _ in range(20000))}
    assert not drawn & held_out
    # Everything else is drawn: with 376 allowed triples, 20k draws see each of them.
    assert len(drawn) == len(CLASSES) * len(COLOURS) * len(BACKGROUNDS) - len(held_out)


@pytest.mark.parametrize("triple", HELD_OUT_COMBINATIONS)
def test_partly_fixed_draws_avoid_held_out_and_a_fully_fixed_one_is_allowed(triple):
    cls, colour, background = triple
    rng = np.random.default_rng(1)
    for _ in range(200):
        assert (sample_scene(rng, cls=cls, colour=colour).background) != background
        assert (sample_scene(rng, colour=colour, background=background).cls) != cls
    scene = sample_scene(rng, cls=cls, colour=colour, background=background)
    assert (scene.cls, scene.colour, scene.background) == triple


def test_dataset_captions_never_name_a_held_out_triple():
    dataset = ToyWorldDataset(seed=5, length=5000)
    held_out = held_out_combinations()
    for i in range(len(dataset)):
        scene, text = dataset.describe(i)
        facts = parse_caption(text)
        assert facts == scene.facts()
        assert (facts.cls, facts.colour, facts.background) not in held_out


def test_items_are_normalized_tensors_with_true_captions():
    dataset = ToyWorldDataset(seed=0, length=16)
    for i in range(len(dataset)):
        image, text = dataset[i]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert -1 <= image.min() and image.max() <= 1
        sample = dataset.sample(i)
        assert text == sample.caption
        assert parse_caption(text) == sample.scene.facts()
        expected = torch.from_numpy(sample.rendered.image).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(image, expected)


def test_items_depend_only_on_seed_and_index():
    forward = ToyWorldDataset(seed=7, length=8)
    backward = ToyWorldDataset(seed=7, length=8)
    later = [backward[i] for i in reversed(range(8))][::-1]
    for i in range(8):
        image, text = forward[i]
        assert torch.equal(image, later[i][0]) and text == later[i][1]
    other = ToyWorldDataset(seed=8, length=8)
    assert not torch.equal(forward[0][0], other[0][0])
    # Length does not change an item: a longer run sees the shorter run's items first.
    assert torch.equal(ToyWorldDataset(seed=7, length=100)[3][0], forward[3][0])
    with pytest.raises(IndexError):
        forward[8]


def test_a_dataloader_with_workers_gives_the_same_batches():
    dataset = ToyWorldDataset(seed=2, length=8)
    single = list(torch.utils.data.DataLoader(dataset, batch_size=4))
    workers = list(torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2))
    for (a, ta), (b, tb) in zip(single, workers, strict=True):
        assert torch.equal(a, b) and list(ta) == list(tb)
