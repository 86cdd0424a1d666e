"""Procedural backgrounds: eight settings that a person tells apart at 64 px.

Each setting is drawn from a texture seed with vectorized numpy (value noise is two small matrix
products), so a training run can draw a fresh background for every image at negligible cost.
Images are float32 HxWx3 in [0, 1].
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from dreamblend.toyworld.vocab import BACKGROUNDS

__all__ = ["pixel_grid", "render_background"]

Rng = np.random.Generator


@functools.cache
def _interpolation(cells: int, size: int) -> np.ndarray:
    """(size, cells + 1) smoothstep weights from a lattice of `cells` cells to `size` pixel centres."""
    t = (np.arange(size) + 0.5) / size * cells
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    f = f * f * (3 - 2 * f)
    weights = np.zeros((size, cells + 1), np.float32)
    weights[np.arange(size), i] = 1 - f
    weights[np.arange(size), i + 1] = f
    weights.setflags(write=False)
    return weights


def _noise(rng: Rng, size: int, cells_y: int, cells_x: int | None = None) -> np.ndarray:
    """Smooth value noise in [0, 1] with `cells_y` x `cells_x` features across the image."""
    cells_x = cells_y if cells_x is None else cells_x
    lattice = rng.random((cells_y + 1, cells_x + 1), dtype=np.float32)
    return _interpolation(cells_y, size) @ lattice @ _interpolation(cells_x, size).T


def _fractal(rng: Rng, size: int, cells: int, octaves: int = 3) -> np.ndarray:
    """Sum of noise octaves, roughly in [0, 1], for natural-looking mottling."""
    total = np.zeros((size, size), np.float32)
    weight = 0.0
    for octave in range(octaves):
        amplitude = 0.5**octave
        total += amplitude * _noise(rng, size, min(cells * 2**octave, size))
        weight += amplitude
    return total / weight


@functools.cache
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) as fractions of the image side, y down."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(t, t, indexing="ij")
    y.setflags(write=False)
    x.setflags(write=False)
    return y, x


def _rgb(*values: float) -> np.ndarray:
    return np.asarray(values, np.float32) / 255.0


def _gradient(
    size: int, top: np.ndarray, bottom: np.ndarray, start: float = 0.0, end: float = 1.0
) -> np.ndarray:
    """Vertical colour ramp from `top` at row fraction `start` to `bottom` at `end`."""
    y, _ = pixel_grid(size)
    t = np.clip((y - start) / max(end - start, 1e-6), 0, 1)[..., None]
    return top * (1 - t) + bottom * t


def _tint(colour: np.ndarray, brightness: np.ndarray) -> np.ndarray:
    """An HxWx3 image of `colour` scaled per pixel by `brightness`."""
    return colour * brightness[..., None]


def _horizon(rng: Rng, size: int, low: float, high: float, wobble: float, cells: int = 3) -> np.ndarray:
    """A per-column horizon row fraction, gently uneven."""
    level = rng.uniform(low, high)
    return level + wobble * (_noise(rng, size, 1, cells)[0] - 0.5)


def _grass(rng: Rng, size: int) -> np.ndarray:
    y, _ = pixel_grid(size)
    horizon = _horizon(rng, size, 0.12, 0.3, 0.06)
    sky = _gradient(size, _rgb(105, 160, 225), _rgb(195, 222, 245), 0.0, 0.35)
    patches = _fractal(rng, size, 4)
    blades = _noise(rng, size, 3, size // 2)
    brightness = 0.7 + 0.35 * patches + 0.45 * (blades - 0.5) + 0.1 * (y - 0.5)
    hue = _noise(rng, size, 3)[..., None]
    grass = _tint(_rgb(70, 145, 40) * (1 - hue) + _rgb(110, 160, 40) * hue, brightness)
    return np.where((y < horizon)[..., None], sky, grass)


def _beach(rng: Rng, size: int) -> np.ndarray:
    y, _ = pixel_grid(size)
    horizon = rng.uniform(0.14, 0.26)
    shore = _horizon(rng, size, horizon + 0.1, horizon + 0.18, 0.08, cells=2)
    sky = _gradient(size, _rgb(90, 160, 230), _rgb(185, 220, 245), 0.0, horizon)
    swell = _noise(rng, size, 2, 6)
    sea = _tint(_rgb(30, 105, 165), 0.85 + 0.3 * swell + 0.25 * (y - horizon))
    sea = np.where((np.sin(90 * y + 5 * swell) > 0.85)[..., None], _rgb(120, 185, 220), sea)
    grain = rng.random((size, size), dtype=np.float32)
    ripples = np.sin(70 * y + 12 * _noise(rng, size, 3))
    sand = _tint(_rgb(228, 200, 140), 0.92 + 0.1 * _fractal(rng, size, 3) + 0.07 * grain + 0.03 * ripples)
    foam = np.abs(y - shore) < 0.025
    image = np.where((y < shore)[..., None], sea, sand)
    image = np.where(foam[..., None], _rgb(240, 245, 245), image)
    return np.where((y < horizon)[..., None], sky, image)


def _snow(rng: Rng, size: int) -> np.ndarray:
    y, x = pixel_grid(size)
    horizon = _horizon(rng, size, 0.18, 0.32, 0.05)
    sky = _gradient(size, _rgb(160, 175, 200), _rgb(215, 222, 232), 0.0, 0.35)
    # A row of dark pines along the horizon: triangles whose width shrinks toward the tip.
    trees = np.zeros((size, size), bool)
    for centre in np.sort(rng.uniform(0, 1, rng.integers(4, 9))):
        height = rng.uniform(0.08, 0.16)
        base = horizon[min(int(centre * size), size - 1)] + 0.01
        up = (base - y) / height
        trees |= (up >= 0) & (up <= 1) & (np.abs(x - centre) <= 0.045 * (1 - up) + 0.004)
    sky = np.where(trees[..., None], _rgb(35, 65, 50), sky)
    drifts = _fractal(rng, size, 3) ** 2
    snow = _rgb(242, 246, 252) * (1 - drifts[..., None]) + _rgb(180, 198, 228) * drifts[..., None]
    sparkle = rng.random((size, size)) > 0.985
    snow = np.where(sparkle[..., None], _rgb(255, 255, 255), snow)
    flakes = (rng.random((size, size)) > 0.97) & (y < horizon)
    sky = np.where(flakes[..., None], _rgb(245, 248, 252), sky)
    return np.where((y < horizon)[..., None], sky, snow)


def _water(rng: Rng, size: int) -> np.ndarray:
    y, x = pixel_grid(size)
    horizon = rng.uniform(0.06, 0.16)
    sky = _gradient(size, _rgb(150, 190, 230), _rgb(215, 232, 245), 0.0, horizon)
    depth = np.clip((y - horizon) / (1 - horizon), 0, 1)
    # Waves crowd toward the horizon, as on a receding surface.
    phase = 7.0 * np.log(depth + 0.08) + 1.2 * _noise(rng, size, 2, 4)
    crest = 0.5 + 0.5 * np.sin(2 * np.pi * phase + 3 * (x - 0.5))
    base = _rgb(20, 80, 140) * (1 - depth[..., None]) + _rgb(25, 105, 150) * depth[..., None]
    water = _tint(base, 0.8 + 0.35 * crest)
    highlights = (crest > 0.93) & (_noise(rng, size, 4, 8) > 0.45)
    water = np.where(highlights[..., None], _rgb(175, 215, 235), water)
    return np.where((y < horizon)[..., None], sky, water)


def _brick(rng: Rng, size: int) -> np.ndarray:
    y, x = pixel_grid(size)
    ground = rng.uniform(0.74, 0.86)
    rows = rng.uniform(9, 12)
    row_coord = y * rows + rng.uniform(0, 1)
    row = np.floor(row_coord)
    column_coord = x * rows / 2.2 + 0.5 * (row % 2) + rng.uniform(0, 1)
    column = np.floor(column_coord)
    shades = rng.uniform(0.75, 1.15, (64, 64)).astype(np.float32)
    shade = shades[row.astype(int) % 64, column.astype(int) % 64]
    mortar_width = 1.0 / size
    in_row = row_coord % 1 < mortar_width * rows * 1.2
    in_column = (column_coord % 1) < mortar_width * rows / 2.2 * 1.2
    grain = 0.9 + 0.15 * rng.random((size, size), dtype=np.float32)
    wall = _tint(_rgb(165, 68, 48), shade * grain)
    wall = np.where((in_row | in_column)[..., None], _rgb(200, 192, 178), wall)
    pavement = _tint(_rgb(125, 120, 115), 0.85 + 0.25 * _fractal(rng, size, 6))
    return np.where((y < ground)[..., None], wall, pavement)


def _night(rng: Rng, size: int) -> np.ndarray:
    y, x = pixel_grid(size)
    horizon = _horizon(rng, size, 0.62, 0.74, 0.12)
    sky = _gradient(size, _rgb(5, 8, 30), _rgb(35, 45, 95), 0.0, 0.75)
    stars = rng.random((size, size)) ** 40
    sky = sky + (stars[..., None] * 1.5).clip(0, 1)
    moon_y, moon_x, radius = rng.uniform(0.1, 0.3), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.08)
    moon = (y - moon_y) ** 2 + (x - moon_x) ** 2 < radius**2
    sky = np.where(moon[..., None], _rgb(245, 240, 200), sky)
    ground = _tint(_rgb(25, 32, 35), 0.7 + 0.5 * _fractal(rng, size, 5))
    return np.where((y < horizon)[..., None], sky, ground)


def _wood(rng: Rng, size: int) -> np.ndarray:
    y, x = pixel_grid(size)
    wall_end = rng.uniform(0.12, 0.28)
    wall = _tint(_rgb(215, 200, 172), 0.92 + 0.1 * _noise(rng, size, 4))
    # Planks widen toward the viewer; `depth` is constant along a plank.
    depth = np.log(np.clip(y - wall_end, 0, None) + 0.12) * 6 + rng.uniform(0, 1)
    plank = np.floor(depth).astype(int)
    tones = rng.uniform(0.75, 1.15, 64).astype(np.float32)
    offsets = rng.uniform(0, 1, 64).astype(np.float32)
    lengths = rng.uniform(0.6, 1.2, 64).astype(np.float32)
    within = depth - plank
    grain = np.sin(2 * np.pi * (within * 3 + 0.5 * _noise(rng, size, 2, 8) + 0.8 * x))
    floor = _tint(_rgb(160, 100, 52), tones[plank % 64] * (0.9 + 0.1 * grain))
    seam = within < 0.08
    joint = ((x / lengths[plank % 64] + offsets[plank % 64]) % 1) < 0.012
    floor = np.where((seam | joint)[..., None], _rgb(70, 40, 20), floor)
    baseboard = np.abs(y - wall_end) < 0.02
    image = np.where((y < wall_end)[..., None], wall, floor)
    return np.where(baseboard[..., None], _rgb(235, 230, 220), image)


def _street(rng: Rng, size: int) -> np.ndarray:
    y, x = pixel_grid(size)
    ground = rng.uniform(0.42, 0.55)
    # A row of facades: one width, roof line and colour per building, looked up per column.
    widths = rng.uniform(0.16, 0.32, 8)
    edges = np.cumsum(widths) - rng.uniform(0.0, 0.1)
    building = np.searchsorted(edges, x)
    left = (edges - widths)[building]
    top = rng.uniform(0.02, ground - 0.18, 8)[building]
    palette = np.stack([_rgb(150, 140, 130), _rgb(120, 125, 135), _rgb(175, 150, 120), _rgb(105, 95, 90)])
    colour = palette[rng.integers(0, len(palette), 8)][building]
    win_x = ((x - left) * size / 5) % 1
    win_y = ((y - top) * size / 6) % 1
    window = (win_x > 0.35) & (win_x < 0.85) & (win_y > 0.3) & (win_y < 0.8)
    lit = _noise(rng, size, 8) > 0.55
    window_colour = np.where(lit[..., None], _rgb(235, 215, 140), _rgb(60, 70, 90))
    facade = np.where(window[..., None], window_colour, colour)
    sky = _gradient(size, _rgb(110, 165, 225), _rgb(185, 210, 235), 0.0, ground)
    image = np.where(((y >= top) & (y < ground))[..., None], facade, sky)
    # Cobblestones: rounded cells on a staggered lattice that shrinks toward the buildings.
    depth = np.clip(y - ground, 0, None)
    rows = np.log(depth + 0.06) * 9
    cols = (x - 0.5) * 10 / (depth + 0.12) + 0.5 * np.floor(rows)
    dy, dx = (rows % 1) - 0.5, (cols % 1) - 0.5
    stone = np.sqrt(dx * dx + dy * dy)
    tone = 0.75 + 0.3 * _noise(rng, size, 16)
    cobbles = _tint(_rgb(140, 135, 128), tone * np.clip(1.15 - stone * 0.9, 0, 1))
    cobbles = np.where((stone > 0.5)[..., None], _rgb(70, 66, 62), cobbles)
    return np.where((y < ground)[..., None], image, cobbles)


_PAINTERS: dict[str, Callable[[Rng, int], np.ndarray]] = {
    "grass": _grass,
    "beach": _beach,
    "snow": _snow,
    "water": _water,
    "brick": _brick,
    "night": _night,
    "wood": _wood,
    "street": _street,
}
assert tuple(_PAINTERS) == BACKGROUNDS


def render_background(background: str, seed: int, size: int = 64) -> np.ndarray:
    """The `background` setting drawn from texture `seed`: float32 (size, size, 3) in [0, 1]."""
    rng = np.random.default_rng(seed)
    return np.clip(_PAINTERS[background](rng, size), 0, 1).astype(np.float32)
