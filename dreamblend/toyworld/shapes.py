"""Objects: six shaded solids, plain for the base world or painted with a subject's pattern.

Each solid is drawn analytically in its own frame (x right, y up, z toward the viewer, unit half
extent) under an orthographic camera looking down by the scene's elevation. A solid returns its
coverage, unit normals for Lambert + Phong shading, and surface coordinates (u, v), roughly in [-1, 1]
over the visible surface, on which a pattern is painted so it wraps the solid instead of lying flat.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dreamblend.toyworld.vocab import CLASSES, COLOURS

__all__ = ["COLOUR_RGB", "PATTERNS", "Pattern", "Pose", "Surface", "nearest_colour", "paint_object"]

# Albedos (sRGB, 0-255). A lit object's pixels are these scaled by shading, plus a little highlight.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 30),
    "green": (40, 170, 55),
    "blue": (40, 80, 215),
    "yellow": (240, 210, 40),
    "purple": (135, 55, 180),
    "orange": (245, 125, 20),
    "white": (238, 238, 238),
    "black": (38, 38, 42),
}
assert tuple(COLOUR_RGB) == COLOURS
_PALETTE = np.asarray(list(COLOUR_RGB.values()), np.float64)
# The range of average shading over an object's pixels, so a dim yellow is not called orange.
_SHADING_RANGE = (0.5, 1.2)


def nearest_colour(rgb: np.ndarray | tuple[float, float, float]) -> str:
    """Name of the colour whose shaded albedo is closest to an observed mean colour `rgb` (0-255)."""
    rgb = np.asarray(rgb, np.float64)
    scale = np.clip(_PALETTE @ rgb / (_PALETTE * _PALETTE).sum(axis=1), *_SHADING_RANGE)
    distance = np.linalg.norm(scale[:, None] * _PALETTE - rgb, axis=1)
    return COLOURS[int(np.argmin(distance))]


PATTERNS: tuple[str, ...] = ("dots", "stripes", "bands", "checks", "zigzag", "emblem")


@dataclass(frozen=True)
class Pattern:
    """A subject's marking: `kind` of PATTERNS in `colour`, `frequency` repeats per surface unit."""

    kind: str
    colour: str
    frequency: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in PATTERNS:
            raise ValueError(f"unknown pattern {self.kind!r}; known: {PATTERNS}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown pattern colour {self.colour!r}; known: {COLOURS}")


@dataclass
class Surface:
    """What a solid looks like at each pixel: covered, facing `normal`, at surface point (u, v)."""

    cover: np.ndarray
    normal: tuple[np.ndarray, np.ndarray, np.ndarray]
    u: np.ndarray
    v: np.ndarray
    paintable: np.ndarray


@dataclass(frozen=True)
class Pose:
    """The pose parameters a solid needs (angles in radians); `aspect` stretches height."""

    yaw: float
    elevation: float
    aspect: float


Coordinate = np.ndarray | float
Triple = tuple[Coordinate, Coordinate, Coordinate]


def _view(x: Coordinate, y: Coordinate, z: Coordinate, elevation: float) -> Triple:
    """World (y up) to view (x right, y up on screen, z toward viewer) for a camera looking down."""
    c, s = math.cos(elevation), math.sin(elevation)
    return x, y * c - z * s, y * s + z * c


def _ball(x: np.ndarray, y: np.ndarray, pose: Pose) -> Surface:
    r2 = x * x + y * y
    cover = r2 <= 1
    z = np.sqrt(np.clip(1 - r2, 0, 1))
    u = np.arctan2(x, z) / (np.pi / 2)
    v = np.arcsin(np.clip(y, -1, 1)) / (np.pi / 2)
    return Surface(cover, (x, y, z), u, v, cover)


def _cube(x: np.ndarray, y: np.ndarray, pose: Pose) -> Surface:
    half = 0.58
    cy, sy = math.cos(pose.yaw), math.sin(pose.yaw)
    right, up, front = np.array([cy, 0, -sy]), np.array([0.0, 1, 0]), np.array([sy, 0, cy])
    cover = np.zeros(x.shape, bool)
    normal = [np.zeros(x.shape, np.float32) for _ in range(3)]
    u = np.zeros(x.shape, np.float32)
    v = np.zeros(x.shape, np.float32)
    # Faces as (normal, first edge, second edge); a face is visible when its normal faces the viewer.
    faces = [
        (up, right, -front),
        (right, -front, up),
        (-right, front, up),
        (front, right, up),
        (-front, -right, up),
    ]
    for n, e1, e2 in faces:
        view_n = np.array(_view(*n, pose.elevation))
        if view_n[2] <= 1e-3:
            continue
        origin = np.array(_view(*(half * (n - e1 - e2)), pose.elevation))[:2]
        a = np.array(_view(*(2 * half * e1), pose.elevation))[:2]
        b = np.array(_view(*(2 * half * e2), pose.elevation))[:2]
        det = a[0] * b[1] - a[1] * b[0]
        px, py = x - origin[0], y - origin[1]
        s = (px * b[1] - py * b[0]) / det
        t = (a[0] * py - a[1] * px) / det
        face = (s >= 0) & (s <= 1) & (t >= 0) & (t <= 1) & ~cover
        cover |= face
        for axis in range(3):
            normal[axis][face] = view_n[axis]
        u[face] = 2 * s[face] - 1
        v[face] = 2 * t[face] - 1
    return Surface(cover, (normal[0], normal[1], normal[2]), u, v, cover)


def _cylinder(x: np.ndarray, y: np.ndarray, pose: Pose) -> Surface:
    radius, half = 0.6, 0.6 * pose.aspect
    c, s = math.cos(pose.elevation), math.sin(pose.elevation)
    top_y, bottom_y = half * c, -half * c
    xr = x / radius
    front = np.sqrt(np.clip(1 - xr * xr, 0, 1))
    top = xr * xr + ((y - top_y) / (radius * s)) ** 2 <= 1
    body = (np.abs(xr) <= 1) & (y <= top_y) & (y >= bottom_y - radius * s * front) & ~top
    height = (y + front * s * radius) / c
    nx = np.where(top, 0, xr)
    ny = np.where(top, c, -front * s)
    nz = np.where(top, s, front * c)
    u = np.arcsin(np.clip(xr, -1, 1)) / (np.pi / 2)
    return Surface(top | body, (nx, ny, nz), u, height / half, body)


def _cone(x: np.ndarray, y: np.ndarray, pose: Pose) -> Surface:
    radius, half = 0.66, 0.6 * pose.aspect
    c, s = math.cos(pose.elevation), math.sin(pose.elevation)
    apex_y, base_y = half * c, -half * c
    spread = np.clip((apex_y - y) / (apex_y - base_y), 0, None)
    side = (y <= apex_y) & (y >= base_y) & (np.abs(x) <= radius * spread)
    foot = (y < base_y) & ((x / radius) ** 2 + ((y - base_y) / (radius * s)) ** 2 <= 1)
    rho = np.clip(np.maximum(spread, np.abs(x) / radius), 1e-3, 1)
    sin_a = np.clip(x / (radius * rho), -1, 1)
    cos_a = np.sqrt(1 - sin_a * sin_a)
    # The side's normal tilts up from horizontal by the angle whose tangent is radius / height.
    slope = math.atan2(radius, 2 * half)
    nx, ny, nz = _view(
        sin_a * math.cos(slope), np.full_like(x, math.sin(slope)), cos_a * math.cos(slope), pose.elevation
    )
    cover = side | foot
    return Surface(cover, (nx, ny, nz), np.arcsin(sin_a) / (np.pi / 2), 2 * rho - 1, cover)


def _ring(x: np.ndarray, y: np.ndarray, pose: Pose) -> Surface:
    major, tube = 0.74, 0.25
    squash = 0.4 + 0.6 * abs(math.cos(pose.yaw))
    # Orthographically a torus is a disc of the tube's radius swept along an ellipse: find the nearest
    # ellipse point (an eccentric-anomaly guess plus two Newton steps on the distance).
    t = np.arctan2(y / squash, x)
    for _ in range(2):
        ex, ey = major * np.cos(t), major * squash * np.sin(t)
        dx_dt, dy_dt = -major * np.sin(t), major * squash * np.cos(t)
        grad = (ex - x) * dx_dt + (ey - y) * dy_dt
        curvature = dx_dt**2 + dy_dt**2 + (ex - x) * -ex + (ey - y) * -ey
        t = t - grad / np.where(np.abs(curvature) < 1e-6, 1e-6, curvature)
    ox = (x - major * np.cos(t)) / tube
    oy = (y - major * squash * np.sin(t)) / tube
    r2 = ox * ox + oy * oy
    cover = r2 <= 1
    nz = np.sqrt(np.clip(1 - r2, 0, 1))
    radial = ox * np.cos(t) + oy * np.sin(t)
    return Surface(cover, (ox, oy, nz), t / np.pi * 4, radial, cover)


# A five-pointed star with a raised centre: ten flat facets, each between the centre, a tip and an
# inner corner; facet normals are fixed, so they are computed once.
_STAR_INNER = 0.42
_STAR_HEIGHT = 0.35


def _star_facets() -> np.ndarray:
    normals = []
    for k in range(10):
        tip_angle = np.pi / 5 * (k + (k % 2))
        inner_angle = np.pi / 5 * (k + 1 - (k % 2))
        tip = np.array([np.sin(tip_angle), np.cos(tip_angle), 0.0])
        inner = _STAR_INNER * np.array([np.sin(inner_angle), np.cos(inner_angle), 0.0])
        centre = np.array([0.0, 0.0, _STAR_HEIGHT])
        n = np.cross(tip - centre, inner - centre)
        normals.append(n / np.linalg.norm(n) * np.sign(n[2]))
    return np.stack(normals)


_FACETS = _star_facets()


def _star_radius(theta: np.ndarray) -> np.ndarray:
    """Distance from the centre to a star's outline at angle `theta` from its upward tip."""
    half = np.pi / 5
    a = np.abs(((theta + half) % (2 * half)) - half)
    tip = np.array([0.0, 1.0])
    inner = _STAR_INNER * np.array([np.sin(half), np.cos(half)])
    n = np.array([inner[1] - tip[1], tip[0] - inner[0]])
    return (n @ tip) / (n[0] * np.sin(a) + n[1] * np.cos(a))


def _star(x: np.ndarray, y: np.ndarray, pose: Pose) -> Surface:
    xs = x / (0.6 + 0.4 * abs(math.cos(pose.yaw)))
    theta = np.arctan2(xs, y) % (2 * np.pi)
    cover = np.hypot(xs, y) <= _star_radius(theta)
    facet = np.minimum((theta / (np.pi / 5)).astype(int), 9)
    n = _FACETS[facet]
    return Surface(cover, (n[..., 0], n[..., 1], n[..., 2]), xs, y, cover)


_SOLIDS: dict[str, Callable[[np.ndarray, np.ndarray, Pose], Surface]] = {
    "cube": _cube,
    "ball": _ball,
    "cone": _cone,
    "ring": _ring,
    "cylinder": _cylinder,
    "star": _star,
}
assert tuple(_SOLIDS) == CLASSES


def _pattern_mask(pattern: Pattern, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where `pattern` paints its colour, in surface coordinates."""
    fu, fv = u * pattern.frequency, v * pattern.frequency
    if pattern.kind == "dots":
        du = (fu + 0.5 * (np.floor(fv) % 2)) % 1 - 0.5
        dv = fv % 1 - 0.5
        return du * du + dv * dv < 0.3**2
    if pattern.kind == "stripes":
        return fu % 1 < 0.45
    if pattern.kind == "bands":
        return fv % 1 < 0.4
    if pattern.kind == "checks":
        return (np.floor(fu) + np.floor(fv)) % 2 == 0
    if pattern.kind == "zigzag":
        return (fv + 0.9 * np.abs(fu % 1 - 0.5)) % 1 < 0.4
    theta = np.arctan2(u, v) % (2 * np.pi)
    return np.hypot(u, v) <= 0.75 * _star_radius(theta)


def paint_object(
    cls: str,
    colour: str,
    x: np.ndarray,
    y: np.ndarray,
    pose: Pose,
    light: np.ndarray,
    brightness: float = 1.0,
    pattern: Pattern | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Shade solid `cls` over object-frame coordinates (x, y): (coverage bool, rgb float in [0, 1]).

    `light` is a unit direction in the object's view frame; a pattern takes the same shading as the
    body, so it reads as a marking on the surface rather than a decal.
    """
    surface = _SOLIDS[cls](x, y, pose)
    nx, ny, nz = surface.normal
    lambert = np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0, 1)
    halfway = light + np.array([0.0, 0.0, 1.0])
    halfway /= np.linalg.norm(halfway)
    specular = np.clip(nx * halfway[0] + ny * halfway[1] + nz * halfway[2], 0, 1) ** 24
    base = np.asarray(COLOUR_RGB[colour], np.float32) / 255
    albedo = np.broadcast_to(base, (*x.shape, 3))
    if pattern is not None:
        marked = surface.paintable & _pattern_mask(pattern, surface.u, surface.v)
        albedo = np.where(marked[..., None], np.asarray(COLOUR_RGB[pattern.colour], np.float32) / 255, albedo)
    shade = brightness * (0.45 + 0.7 * lambert)
    rgb = albedo * shade[..., None] + 0.3 * specular[..., None]
    return surface.cover, np.clip(rgb, 0, 1)
