"""Which optimizer steps get a checkpoint (`--save-at`).

The DreamBlend paper samples a 1000-step fine-tuning run every 5 steps up to 50 and every 25 steps
after that: 48 operating points from which the underfit guidance checkpoint G and the overfit edit
checkpoint E are picked.
"""

from __future__ import annotations

from collections.abc import Iterable

from dreamblend.training.errors import TrainingInputError

PAPER_STEPS = 1000


def paper_schedule(max_steps: int = PAPER_STEPS) -> list[int]:
    """The paper's 48 checkpoint steps (5, 10, ..., 50, 75, ..., 1000) that are <= ``max_steps``."""
    steps = [*range(5, 51, 5), *range(75, PAPER_STEPS + 1, 25)]
    return [s for s in steps if s <= max_steps]


def parse_save_at(spec: str | Iterable[int], max_steps: int) -> list[int]:
    """Sorted checkpoint steps from ``"paper"``, ``"5,10,100"`` or a sequence of ints.

    Raises TrainingInputError (a ValueError) for steps outside ``[1, max_steps]``, so a run never ends
    silently short of a requested checkpoint.
    """
    if max_steps < 1:
        raise TrainingInputError(f"max steps must be >= 1, got {max_steps}")
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "paper":
            if max_steps < 5:
                raise TrainingInputError(
                    f"the paper schedule has no step within {max_steps} training steps (its first is 5); "
                    "pass --save-at explicitly, e.g. --save-at 1,2"
                )
            return paper_schedule(max_steps)
        try:
            steps = [int(part) for part in text.replace(" ", "").split(",") if part]
        except ValueError:
            raise TrainingInputError(
                f"--save-at {spec!r} is neither 'paper' nor a comma-separated list of steps like '5,10,100'"
            ) from None
    else:
        steps = [int(s) for s in spec]
    if not steps:
        raise TrainingInputError("--save-at lists no step; pass 'paper' or steps like '5,10,100'")
    too_small = [s for s in steps if s < 1]
    if too_small:
        raise TrainingInputError(
            f"--save-at steps must be >= 1 (step 0 is the base model itself), got {too_small}"
        )
    beyond = sorted(s for s in steps if s > max_steps)
    if beyond:
        raise TrainingInputError(
            f"--save-at asks for steps {beyond} beyond the {max_steps} training steps; raise the number of "
            f"training steps to at least {beyond[-1]} or drop those steps"
        )
    return sorted(set(steps))
