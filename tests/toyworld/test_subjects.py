"""Subjects are unique patterned instances, photographed DreamBooth-style in one or two settings."""

from __future__ import annotations

import numpy as np
import pytest
from toyworld_pixels import off_colour_fraction

from dreamblend.toyworld import (
    BACKGROUNDS,
    SUBJECTS,
    CaptionFacts,
    Pattern,
    Subject,
    evaluation_prompts,
    get_subject,
    instance_images,
    parse_caption,
    subject_set,
)


def test_at_least_five_distinct_subjects_with_distinct_patterns():
    assert len(SUBJECTS) >= 5
    assert len({s.name for s in SUBJECTS}) == len(SUBJECTS)
    assert len({(s.cls, s.colour, s.pattern) for s in SUBJECTS}) == len(SUBJECTS)
    for subject in SUBJECTS:
        assert subject.pattern.colour != subject.colour
        assert get_subject(subject.name) is subject
    with pytest.raises(KeyError):
        get_subject("plain_cube")


def test_invalid_subjects_are_refused():
    with pytest.raises(ValueError):
        Subject("x", "cube", "red", Pattern("dots", "white"), ("grass", "snow", "wood"))
    with pytest.raises(ValueError):
        Subject("x", "dog", "red", Pattern("dots", "white"), ("grass",))
    with pytest.raises(ValueError):
        Pattern("spirals", "white")


@pytest.mark.parametrize("subject", SUBJECTS, ids=lambda s: s.name)
def test_instance_photos_share_their_homes_and_vary_the_pose(subject):
    photos = instance_images(subject, n=6, seed=0)
    assert len(photos) == 6
    assert {p.scene.background for p in photos} == set(subject.homes)
    for home in subject.homes:
        rooms = {p.scene.background_seed for p in photos if p.scene.background == home}
        assert len(rooms) == 1, "a home is one room: one texture for the whole shoot"
    assert len({(p.scene.x, p.scene.y, p.scene.size) for p in photos}) == 6
    for photo in photos:
        assert photo.caption == subject.instance_prompt == f"a photo of sks {subject.cls}"
        assert (photo.scene.cls, photo.scene.colour, photo.scene.pattern) == (
            subject.cls,
            subject.colour,
            subject.pattern,
        )
        assert photo.scene.is_subject


@pytest.mark.parametrize("subject", SUBJECTS, ids=lambda s: s.name)
def test_the_pattern_is_visible_in_every_photo(subject):
    for photo in instance_images(subject, n=6) + subject_set(subject, n=16):
        assert off_colour_fraction(photo.rendered, subject.colour) > 0.15, photo.caption


def test_instance_photos_are_reproducible_and_seeded():
    subject = SUBJECTS[0]
    a, b = instance_images(subject, 4, seed=1), instance_images(subject, 4, seed=1)
    c = instance_images(subject, 4, seed=2)
    assert all(np.array_equal(x.rendered.image, y.rendered.image) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0].rendered.image, c[0].rendered.image)


@pytest.mark.parametrize("subject", SUBJECTS, ids=lambda s: s.name)
def test_evaluation_prompts_cover_exactly_the_unseen_settings(subject):
    prompts = evaluation_prompts(subject)
    facts = [parse_caption(p) for p in prompts]
    assert {f.background for f in facts} == set(BACKGROUNDS) - set(subject.homes)
    assert len(prompts) == len(BACKGROUNDS) - len(subject.homes)
    assert all(f == CaptionFacts(subject.cls, None, f.background, True) for f in facts)
    assert all(p.startswith(f"a sks {subject.cls} ") for p in prompts)


def test_same_subject_set_is_one_instance_in_many_settings():
    subject = get_subject("striped_ring")
    photos = subject_set(subject, n=12, seed=3)
    assert {p.scene.background for p in photos} == set(BACKGROUNDS)
    assert len({p.scene.background_seed for p in photos}) == 12
    for photo in photos:
        assert photo.scene.pattern == subject.pattern and photo.scene.aspect == subject.aspect
        assert parse_caption(photo.caption) == CaptionFacts(subject.cls, None, photo.scene.background, True)
