"""Pixel statistics the toy-world tests check ground truth with."""

from __future__ import annotations

import numpy as np

from dreamblend.toyworld import COLOUR_RGB, RenderedImage


def solid(rendered: RenderedImage) -> np.ndarray:
    """Pixels wholly covered by the object, free of anti-aliasing with the background."""
    return rendered.coverage == 1


def off_colour_fraction(rendered: RenderedImage, colour: str, degrees: float = 20.0) -> float:
    """Fraction of the object's solid pixels whose RGB direction is off `colour`'s by > `degrees`.

    Shading scales a plain object's colour, so it keeps the direction; a pattern in another colour
    does not.
    """
    pixels = rendered.image[solid(rendered)].astype(np.float64)
    reference = np.asarray(COLOUR_RGB[colour], np.float64)
    cosine = pixels @ reference / (np.linalg.norm(pixels, axis=1) * np.linalg.norm(reference) + 1e-9)
    return float(np.mean(cosine < np.cos(np.radians(degrees))))
