"""Contact sheets of the toy world, to check by eye that every class, colour, setting and subject reads.

    python -m dreamblend.toyworld.preview --out DIR [--seed 0] [--zoom 2]

writes DIR/base.png (captioned base-world samples) and DIR/subjects.png (per subject: its instance
photos, then the same instance in other settings).
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from dreamblend.toyworld.dataset import ToyWorldDataset
from dreamblend.toyworld.scenes import Sample
from dreamblend.toyworld.subjects import SUBJECTS, instance_images, subject_set

__all__ = ["contact_sheet", "main", "write_previews"]

_LINE_HEIGHT = 11
_CHAR_WIDTH = 6


def contact_sheet(rows: Sequence[Sequence[Sample]], zoom: int = 2) -> Image.Image:
    """A grid of samples, each enlarged `zoom` times (nearest neighbour) above its wrapped caption."""
    size = rows[0][0].rendered.image.shape[0] * zoom
    captions = [[textwrap.wrap(s.caption, width=max(size // _CHAR_WIDTH, 8)) for s in row] for row in rows]
    lines = max(len(text) for row in captions for text in row)
    cell_h = size + lines * _LINE_HEIGHT + 4
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (columns * (size + 4), len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        for c, (sample, text) in enumerate(zip(row, captions[r], strict=True)):
            left, top = c * (size + 4), r * cell_h
            tile = Image.fromarray(sample.rendered.image).resize((size, size), Image.Resampling.NEAREST)
            sheet.paste(tile, (left, top))
            for k, line in enumerate(text):
                draw.text((left, top + size + 2 + k * _LINE_HEIGHT), line, fill="black")
    return sheet


def write_previews(out: Path, seed: int = 0, zoom: int = 2, rows: int = 6, columns: int = 8) -> list[Path]:
    """Write base.png and subjects.png into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    dataset = ToyWorldDataset(seed, rows * columns)
    base = [[dataset.sample(r * columns + c) for c in range(columns)] for r in range(rows)]
    subjects = [instance_images(s, 5, seed) + subject_set(s, 5, seed) for s in SUBJECTS]
    paths = [out / "base.png", out / "subjects.png"]
    contact_sheet(base, zoom).save(paths[0])
    contact_sheet(subjects, zoom).save(paths[1])
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dreamblend.toyworld.preview", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for base.png and subjects.png")
    parser.add_argument("--seed", type=int, default=0, help="dataset and subject seed")
    parser.add_argument("--zoom", type=int, default=2, help="enlargement of each 64 px image")
    args = parser.parse_args(argv)
    for path in write_previews(args.out, args.seed, args.zoom):
        print(path)


if __name__ == "__main__":
    main()
