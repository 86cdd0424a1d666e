"""Matplotlib figures drawn off-screen (Agg) without pyplot, so plotting never touches a user's backend.

matplotlib is imported here, inside functions, so ``import dreamblend`` does not need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def new_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` (inches) attached to an Agg canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plots need matplotlib: pip install matplotlib (or the package's test extra)"
        ) from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write ``figure`` to a ``.png`` path (parent folders created) and return the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG: name a .png file, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png")
    return path
