"""Same-subject image sets for training JeDi in the toy world (the role of the supplement's S³ data set).

S³ pastes one object instance into many generated scenes; the toy world renders one instance directly
in many settings and poses. A training subject is a random patterned object (class, colour, pattern
kind and colour, frequency, aspect), drawn so that no training subject shares class, colour and
pattern kind with any of the evaluation subjects in :data:`~dreamblend.toyworld.subjects.SUBJECTS`:
JeDi is evaluated on subjects it never saw. A set is ``subject_set``'s photos of the instance, each
captioned with its setting ("a sks cube on the grass"), written in the supplement's stacked format.

    python -m dreamblend.toyworld.jedi_sets --out DIR [--sets 4000] [--set-size 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dreamblend.toyworld.shapes import PATTERNS, Pattern
from dreamblend.toyworld.subjects import SUBJECTS, Subject, subject_set
from dreamblend.toyworld.vocab import BACKGROUNDS, CLASSES, COLOURS

_HELD_OUT = frozenset((s.cls, s.colour, s.pattern.kind) for s in SUBJECTS)


def training_subject(index: int, seed: int = 0) -> Subject:
    """Training subject ``index``: random, never one of the evaluation subjects' (class, colour, pattern)."""
    rng = np.random.default_rng([seed, index, 0x5E7])
    while True:
        cls, colour, kind = str(rng.choice(CLASSES)), str(rng.choice(COLOURS)), str(rng.choice(PATTERNS))
        marking = str(rng.choice([c for c in COLOURS if c != colour]))
        if (cls, colour, kind) not in _HELD_OUT:
            break
    return Subject(
        f"train{seed}_{index:05d}",
        cls,
        colour,
        Pattern(kind, marking, float(rng.uniform(1.0, 2.5))),
        (str(rng.choice(BACKGROUNDS)),),
        float(rng.uniform(0.9, 1.2)),
    )


def set_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.png"


def write_training_sets(folder: Path, count: int, set_size: int, seed: int = 0) -> list[Path]:
    """Sets ``0..count-1`` in ``folder`` (stacked PNG + captions); finished sets are kept (reruns resume)."""
    from dreamblend.jedi.data import CAPTION_SUFFIX, write_stacked_set

    if count < 1 or set_size < 2:
        raise ValueError(f"need at least one set of at least two images, got {count} sets of {set_size}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = set_path(folder, index)
        if not (path.is_file() and path.with_suffix(CAPTION_SUFFIX).is_file()):
            samples = subject_set(training_subject(index, seed), set_size, seed=seed)
            tmp = path.with_name(f".{path.name}")  # the caption file is written last: it marks the set done
            write_stacked_set(
                tmp, [Image.fromarray(s.rendered.image) for s in samples], [s.caption for s in samples]
            )
            tmp.replace(path)
            tmp.with_suffix(CAPTION_SUFFIX).replace(path.with_suffix(CAPTION_SUFFIX))
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the sets")
    parser.add_argument("--sets", type=int, default=4000, help="number of sets (subjects) (default 4000)")
    parser.add_argument("--set-size", type=int, default=4, help="images per set (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="(default 0)")
    args = parser.parse_args(argv)
    try:
        paths = write_training_sets(args.out, args.sets, args.set_size, args.seed)
    except ValueError as exc:
        print(f"jedi_sets: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(paths)} sets of {args.set_size} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
