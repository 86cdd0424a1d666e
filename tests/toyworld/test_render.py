"""The base world's images agree with their ground truth, are reproducible, and render fast."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from toyworld_pixels import off_colour_fraction, solid

from dreamblend.toyworld import (
    BACKGROUNDS,
    CLASSES,
    COLOUR_RGB,
    COLOURS,
    ToyWorldDataset,
    nearest_colour,
    render,
    render_background,
    sample_scene,
)

N = 300


@pytest.fixture(scope="module")
def samples():
    dataset = ToyWorldDataset(seed=11, length=N)
    return [dataset.sample(i) for i in range(N)]


def test_same_seed_same_pixels_and_other_seed_other_pixels():
    a = render(sample_scene(np.random.default_rng(3)))
    b = render(sample_scene(np.random.default_rng(3)))
    c = render(sample_scene(np.random.default_rng(4)))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.uint8 and a.image.shape == (64, 64, 3)
    assert a.mask.dtype == bool and a.mask.shape == (64, 64)


def test_scenes_refuse_unknown_names():
    scene = sample_scene(np.random.default_rng(0))
    for field in ("cls", "colour", "background"):
        with pytest.raises(ValueError):
            dataclasses.replace(scene, **{field: "moon"})


def test_render_at_other_sizes():
    scene = sample_scene(np.random.default_rng(0))
    small, large = render(scene, size=32), render(scene, size=128)
    assert small.image.shape == (32, 32, 3) and large.image.shape == (128, 128, 3)
    # The object covers the same fraction of the frame at any resolution.
    assert small.mask.mean() == pytest.approx(large.mask.mean(), rel=0.15)


def test_samples_cover_every_class_colour_and_background(samples):
    scenes = [s.scene for s in samples]
    assert {s.cls for s in scenes} == set(CLASSES)
    assert {s.colour for s in scenes} == set(COLOURS)
    assert {s.background for s in scenes} == set(BACKGROUNDS)


def test_object_is_whole_and_bbox_matches_mask(samples):
    for sample in samples:
        mask = sample.rendered.mask
        assert np.array_equal(mask, sample.rendered.coverage >= 0.5)
        x0, y0, x1, y1 = sample.rendered.bbox
        assert 80 <= mask.sum() <= 0.35 * mask.size
        assert 0 < x0 < x1 < 64 and 0 < y0 < y1 < 64, "object cut by the frame"
        assert mask[y0:y1, x0:x1].sum() == mask.sum()
        assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()


def test_object_pixels_have_the_named_colour(samples):
    for sample in samples:
        pixels = sample.rendered.image[solid(sample.rendered)]
        assert nearest_colour(pixels.mean(axis=0)) == sample.scene.colour, sample.caption


def test_nearest_colour_names_every_colour_under_any_lighting():
    for colour, rgb in COLOUR_RGB.items():
        for shading in (0.55, 0.8, 1.0, 1.15):
            assert nearest_colour(np.asarray(rgb) * shading) == colour, (colour, shading)
    assert nearest_colour((120, 105, 20)) == "yellow"  # dim yellow, nearer to orange in plain RGB
    assert nearest_colour((110, 110, 110)) == "white"
    assert nearest_colour((60, 60, 64)) == "black"


def test_object_pixels_do_not_depend_on_the_background(samples):
    for sample in samples[:50]:
        moved = dataclasses.replace(sample.scene, background_seed=sample.scene.background_seed + 1)
        other = render(moved)
        inside = solid(sample.rendered)
        assert inside.sum() > 0.5 * sample.rendered.mask.sum()
        assert np.array_equal(other.coverage, sample.rendered.coverage)
        assert np.array_equal(other.image[inside], sample.rendered.image[inside])


def test_outside_the_mask_is_the_background_up_to_a_shadow(samples):
    for sample in samples:
        bare = np.round(render_background(sample.scene.background, sample.scene.background_seed) * 255)
        outside = sample.rendered.coverage == 0
        diff = sample.rendered.image[outside].astype(np.float64) - bare[outside]
        assert diff.max() <= 1, "something other than a shadow was drawn outside the object"
        assert np.mean(np.abs(diff).max(axis=1) > 1) < 0.12, "shadow larger than the object's footprint"


def _background_features(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Mean and spread of RGB in the upper and lower half: enough to tell the settings apart."""
    features = []
    for half in (slice(0, 32), slice(32, 64)):
        pixels = image[half][keep[half]].astype(np.float64)
        features += [*pixels.mean(axis=0), *pixels.std(axis=0)]
    return np.asarray(features)


def test_background_pixels_match_their_setting(samples):
    everywhere = np.ones((64, 64), bool)
    centroids = {}
    for name in BACKGROUNDS:
        bare = [render_background(name, seed) * 255 for seed in range(20)]
        centroids[name] = np.mean([_background_features(image, everywhere) for image in bare], axis=0)
    spread = np.std(list(centroids.values()), axis=0) + 1
    for sample in samples:
        features = _background_features(sample.rendered.image, sample.rendered.coverage == 0)
        distance = {name: np.linalg.norm((features - c) / spread) for name, c in centroids.items()}
        assert min(distance, key=distance.get) == sample.scene.background, sample.caption


def test_base_world_objects_are_plain(samples):
    for sample in samples:
        assert sample.scene.pattern is None and not sample.scene.is_subject
        assert off_colour_fraction(sample.rendered, sample.scene.colour) < 0.05, sample.caption


def test_render_speed():
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(100)]
    render(scenes[0])
    start = time.perf_counter()
    for scene in scenes:
        render(scene)
    per_image = (time.perf_counter() - start) / len(scenes)
    # About 2 ms on one busy core; the bound leaves room for a loaded shared machine.
    assert per_image < 0.015, f"{per_image * 1e3:.1f} ms per image"
