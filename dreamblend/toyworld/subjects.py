"""Unique subjects for personalization, photographed the way DreamBooth photos are taken.

A subject is one object instance, a class and colour with a pattern the base world never draws, so a
model can only learn it from its instance photos. Those photos share one or two settings (the same
room, the same texture seed), which is what lets a long fine-tune tie every prompt to that setting.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from dreamblend.toyworld.scenes import Sample, Scene, caption, make_sample, sample_pose
from dreamblend.toyworld.shapes import Pattern
from dreamblend.toyworld.vocab import BACKGROUNDS, CLASSES, COLOURS, CaptionFacts, compose_caption

__all__ = [
    "SUBJECTS",
    "Subject",
    "class_prompt",
    "evaluation_prompts",
    "get_subject",
    "instance_images",
    "subject_set",
]


@dataclass(frozen=True)
class Subject:
    """One object instance: `cls` in `colour` with `pattern`, photographed in its `homes` settings."""

    name: str
    cls: str
    colour: str
    pattern: Pattern
    homes: tuple[str, ...]
    aspect: float = 1.0

    def __post_init__(self) -> None:
        if self.cls not in CLASSES or self.colour not in COLOURS:
            raise ValueError(
                f"subject {self.name!r}: unknown class or colour ({self.cls!r}, {self.colour!r})"
            )
        if not 1 <= len(self.homes) <= 2 or not set(self.homes) <= set(BACKGROUNDS):
            raise ValueError(f"subject {self.name!r}: homes must be one or two of {BACKGROUNDS}")

    @property
    def instance_prompt(self) -> str:
        """DreamBooth's caption for every instance photo, e.g. "a photo of sks cube"."""
        return compose_caption(CaptionFacts(self.cls, is_subject=True))

    def scene(self, rng: np.random.Generator, background: str, background_seed: int) -> Scene:
        """This instance in a random pose in `background` drawn from `background_seed`."""
        return Scene(
            self.cls,
            self.colour,
            background,
            **sample_pose(rng),
            aspect=self.aspect,
            brightness=1.0,
            background_seed=background_seed,
            pattern=self.pattern,
        )


SUBJECTS: tuple[Subject, ...] = (
    Subject("dotted_cube", "cube", "blue", Pattern("dots", "yellow", 1.5), ("wood",)),
    Subject("emblem_ball", "ball", "red", Pattern("emblem", "white"), ("grass",)),
    Subject("striped_ring", "ring", "green", Pattern("stripes", "white", 1.0), ("beach",)),
    Subject(
        "zigzag_cylinder", "cylinder", "purple", Pattern("zigzag", "yellow", 1.5), ("brick", "wood"), 1.1
    ),
    Subject("banded_cone", "cone", "orange", Pattern("bands", "white", 1.5), ("street",), 1.2),
    Subject("checkered_star", "star", "yellow", Pattern("checks", "black", 2.5), ("snow", "grass")),
)


def get_subject(name: str) -> Subject:
    """The subject called `name`."""
    for subject in SUBJECTS:
        if subject.name == name:
            return subject
    raise KeyError(f"unknown subject {name!r}; known: {[s.name for s in SUBJECTS]}")


def _rng(subject: Subject, seed: int, purpose: str) -> np.random.Generator:
    """A generator per (subject, seed, purpose), independent of Python's salted string hashing."""
    return np.random.default_rng([seed, zlib.crc32(f"{subject.name}/{purpose}".encode())])


def instance_images(subject: Subject, n: int = 5, seed: int = 0, size: int = 64) -> list[Sample]:
    """`n` DreamBooth instance photos: varied poses, in the subject's one or two home settings.

    Each home is one fixed room (one texture seed for the whole shoot), and every photo is captioned
    with the instance prompt, which names no setting, as in DreamBooth.
    """
    rng = _rng(subject, seed, "instances")
    rooms = {home: int(rng.integers(2**31)) for home in subject.homes}
    samples = []
    for i in range(n):
        home = subject.homes[i % len(subject.homes)]
        samples.append(make_sample(subject.scene(rng, home, rooms[home]), subject.instance_prompt, size))
    return samples


def subject_set(subject: Subject, n: int, seed: int = 0, size: int = 64) -> list[Sample]:
    """`n` photos of the same instance across all settings and poses, each captioned with its setting."""
    rng = _rng(subject, seed, "set")
    order = rng.permutation(len(BACKGROUNDS))
    samples = []
    for i in range(n):
        scene = subject.scene(rng, BACKGROUNDS[order[i % len(order)]], int(rng.integers(2**31)))
        samples.append(make_sample(scene, caption(scene, rng), size))
    return samples


def evaluation_prompts(subject: Subject) -> list[str]:
    """Prompts placing the subject in every setting its instance photos never show."""
    return [
        compose_caption(CaptionFacts(subject.cls, background=background, is_subject=True), photo=False)
        for background in BACKGROUNDS
        if background not in subject.homes
    ]


def class_prompt(cls: str) -> str:
    """DreamBooth's prior-preservation prompt for a class, e.g. "a photo of a cube"."""
    return compose_caption(CaptionFacts(cls))
