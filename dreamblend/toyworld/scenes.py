"""Scenes of the base world: one plain object of a class and colour in a background setting.

A `Scene` is the full ground truth of an image: everything `render` needs is in it, so the same scene
always gives the same pixels. Continuous pose, size, position, light and texture seeds make the number
of distinct images far larger than any training run sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dreamblend.toyworld.backgrounds import pixel_grid, render_background
from dreamblend.toyworld.shapes import Pattern, Pose, paint_object
from dreamblend.toyworld.vocab import BACKGROUNDS, CLASSES, COLOURS, CaptionFacts, compose_caption

__all__ = [
    "HELD_OUT_COMBINATIONS",
    "RenderedImage",
    "Sample",
    "Scene",
    "caption",
    "held_out_combinations",
    "make_sample",
    "render",
    "sample_pose",
    "sample_scene",
]

# (class, colour, background) triples the base world's training sampler never draws, so a model can be
# asked for them to test compositional generalization. Every class, colour and background occurs in
# one or two triples, and every pair inside a triple still occurs in training with other third elements.
HELD_OUT_COMBINATIONS: tuple[tuple[str, str, str], ...] = (
    ("cube", "red", "snow"),
    ("ball", "blue", "beach"),
    ("cone", "green", "street"),
    ("ring", "yellow", "wood"),
    ("cylinder", "white", "grass"),
    ("star", "purple", "water"),
    ("cube", "orange", "night"),
    ("ball", "black", "brick"),
)


def held_out_combinations() -> frozenset[tuple[str, str, str]]:
    """The (class, colour, background) triples that training data never shows."""
    return frozenset(HELD_OUT_COMBINATIONS)


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image. Positions and `size` (object half extent) are fractions of the side."""

    cls: str
    colour: str
    background: str
    x: float
    y: float
    size: float
    yaw: float
    elevation: float
    roll: float
    aspect: float
    light: float
    brightness: float
    background_seed: int
    pattern: Pattern | None = None

    def __post_init__(self) -> None:
        for value, known in ((self.cls, CLASSES), (self.colour, COLOURS), (self.background, BACKGROUNDS)):
            if value not in known:
                raise ValueError(f"unknown {value!r}; expected one of {known}")

    @property
    def is_subject(self) -> bool:
        """Only subjects carry a pattern; the base world's objects are always plain."""
        return self.pattern is not None

    def facts(self) -> CaptionFacts:
        """What a caption of this scene asserts; subjects are named by token, not colour."""
        colour = None if self.is_subject else self.colour
        return CaptionFacts(self.cls, colour, self.background, self.is_subject)


@dataclass(frozen=True)
class RenderedImage:
    """Pixels (uint8 HxWx3) with the object's `coverage` of each pixel (float32 HxW in [0, 1]).

    `mask` marks pixels at least half covered; pixels with coverage 0 show only the background (and
    the object's shadow), pixels with coverage 1 only the object.
    """

    image: np.ndarray
    mask: np.ndarray
    coverage: np.ndarray

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """The mask's bounding box as (x0, y0, x1, y1), end-exclusive."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        cols = np.flatnonzero(self.mask.any(axis=0))
        if rows.size == 0:
            return (0, 0, 0, 0)
        return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


@dataclass(frozen=True)
class Sample:
    """A scene, its caption and its rendering: one training or reference example."""

    scene: Scene
    caption: str
    rendered: RenderedImage


def sample_pose(rng: np.random.Generator) -> dict[str, float]:
    """Random placement, pose and lighting of an object, as Scene keyword arguments."""
    return {
        "x": float(rng.uniform(0.32, 0.68)),
        "y": float(rng.uniform(0.46, 0.64)),
        "size": float(rng.uniform(0.18, 0.28)),
        "yaw": float(rng.uniform(0, 2 * np.pi)),
        "elevation": float(rng.uniform(0.3, 0.6)),
        "roll": float(np.clip(rng.normal(0, 0.12), -0.3, 0.3)),
        "light": float(rng.uniform(-1, 1)),
    }


def sample_scene(
    rng: np.random.Generator,
    *,
    cls: str | None = None,
    colour: str | None = None,
    background: str | None = None,
) -> Scene:
    """A random base-world scene; fixed `cls`/`colour`/`background` override the draw.

    Drawn combinations are never held out. Fixing all three to a held-out triple is allowed on purpose:
    it is how a reference image of an unseen combination is made.
    """
    held_out = held_out_combinations()
    while True:
        triple = (
            cls if cls is not None else str(rng.choice(CLASSES)),
            colour if colour is not None else str(rng.choice(COLOURS)),
            background if background is not None else str(rng.choice(BACKGROUNDS)),
        )
        if triple not in held_out or None not in (cls, colour, background):
            break
    return Scene(
        *triple,
        **sample_pose(rng),
        aspect=float(rng.uniform(0.8, 1.25)),
        brightness=float(rng.uniform(0.9, 1.1)),
        background_seed=int(rng.integers(2**31)),
    )


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of `scene`, with or without the "a photo of" prefix at random."""
    return compose_caption(scene.facts(), photo=bool(rng.integers(2)))


def _block_mean(values: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping `factor` x `factor` blocks of the first two axes."""
    total = sum(values[i::factor, j::factor] for i in range(factor) for j in range(factor))
    return total / np.float32(factor * factor)


def _object_box(scene: Scene, size: int) -> tuple[int, int, int, int]:
    """Pixel rows and columns (y0, y1, x0, x1) that can hold the object: every solid fits the unit disc."""
    x0 = max(int(np.floor((scene.x - scene.size) * size)) - 1, 0)
    x1 = min(int(np.ceil((scene.x + scene.size) * size)) + 1, size)
    y0 = max(int(np.floor((scene.y - scene.size) * size)) - 1, 0)
    y1 = min(int(np.ceil((scene.y + scene.size) * size)) + 1, size)
    return y0, y1, x0, x1


def render(scene: Scene, size: int = 64, supersample: int = 2) -> RenderedImage:
    """Draw `scene` at `size` x `size`; the object is anti-aliased by `supersample`^2 samples per pixel."""
    image = render_background(scene.background, scene.background_seed, size)
    gy, gx = pixel_grid(size)
    # A soft contact shadow under the object, offset away from the light.
    sx = scene.x - 0.25 * scene.size * float(np.sin(scene.light))
    sy = scene.y + 0.8 * scene.size
    d = ((gx - sx) / (0.95 * scene.size)) ** 2 + ((gy - sy) / (0.28 * scene.size)) ** 2
    image *= (1 - 0.4 * np.clip(1.5 * (1 - d), 0, 1))[..., None]

    # Solids are drawn only inside their box, at `supersample` times the resolution.
    y0, y1, x0, x1 = _object_box(scene, size)
    fine = size * supersample
    ticks = (np.arange(fine, dtype=np.float32) + 0.5) / fine
    hy, hx = np.meshgrid(
        ticks[y0 * supersample : y1 * supersample], ticks[x0 * supersample : x1 * supersample], indexing="ij"
    )
    cos_r, sin_r = float(np.cos(scene.roll)), float(np.sin(scene.roll))
    dx, dy = (hx - scene.x) / scene.size, (scene.y - hy) / scene.size
    x, y = cos_r * dx + sin_r * dy, -sin_r * dx + cos_r * dy
    lx, ly = 0.6 * float(np.sin(scene.light)), 0.65
    light = np.array([cos_r * lx + sin_r * ly, -sin_r * lx + cos_r * ly, 0.6], np.float32)
    pose = Pose(scene.yaw, scene.elevation, scene.aspect)
    cover, rgb = paint_object(
        scene.cls, scene.colour, x, y, pose, light / np.linalg.norm(light), scene.brightness, scene.pattern
    )
    alpha = np.zeros((size, size), np.float32)
    alpha[y0:y1, x0:x1] = _block_mean(cover.astype(np.float32), supersample)
    premultiplied = _block_mean(rgb * cover[..., None], supersample)
    box = image[y0:y1, x0:x1]
    box *= 1 - alpha[y0:y1, x0:x1, None]
    box += premultiplied
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    return RenderedImage(pixels, alpha >= 0.5, alpha)


def make_sample(scene: Scene, caption_text: str, size: int = 64) -> Sample:
    """Render `scene` and bundle it with its caption."""
    return Sample(scene, caption_text, render(scene, size))
