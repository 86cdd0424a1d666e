"""Operating points: the paper's F1 choice of the best point, Pareto fronts, and the Fig. 7 plot.

An operating point is one way of sampling a subject: a fine-tuning checkpoint alone, or a DreamBlend
pair (G step, E step, alpha), with the mean subject fidelity (e.g. DINO) and prompt fidelity (e.g.
CLIP-T) of its images and their standard errors. Tables come from a CSV file (``points.csv``) or a
list of dicts, one row per (subject, operating point), columns as in :class:`PointColumns`.

Conventions (all deterministic):

- **F1** is ``2ab / (a + b)`` of the two raw means, as in the paper (no normalisation); it is 0 when
  either mean is <= 0, where the harmonic mean has no meaning.
- **Best by F1**: highest F1; ties go to the higher subject fidelity, then the higher prompt
  fidelity, then the earlier row.
- **Pareto front** (both scores maximised): a point is on it when no other point is at least as good
  on both scores and better on one. Of points with identical scores the earliest row stands for all.
- A row is a **DreamBlend point** when it names both a guidance and an edit step and its alpha is not
  0; otherwise it is a fine-tuning checkpoint sampled alone, at its edit step (or guidance step).
  Steps are numbers, or checkpoint names (``runs/dog/checkpoint-50``; ``base`` is step 0) as
  ``dreamblend eval``'s ``summary.csv`` writes them.
"""

from __future__ import annotations

import csv
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from dreamblend.analysis.figures import new_figure, save_png


@dataclass(frozen=True)
class PointColumns:
    """Column names of a points table; only the two fidelity means are required."""

    subject: str = "subject"
    method: str = "method"
    guidance_step: str = "guidance_step"
    edit_step: str = "edit_step"
    alpha: str = "alpha"
    cfg: str = "cfg"
    subject_fidelity: str = "subject_fidelity"
    subject_fidelity_se: str = "subject_fidelity_se"
    prompt_fidelity: str = "prompt_fidelity"
    prompt_fidelity_se: str = "prompt_fidelity_se"


# ``dreamblend eval``'s summary.csv: checkpoints by name, DINO and CLIP-T means and standard errors.
EVAL_SUMMARY_COLUMNS = PointColumns(
    guidance_step="guidance",
    edit_step="edit",
    subject_fidelity="dino_mean",
    subject_fidelity_se="dino_se",
    prompt_fidelity="clip_t_mean",
    prompt_fidelity_se="clip_t_se",
)
REQUIRED = ("subject_fidelity", "prompt_fidelity")
_CHECKPOINT_STEP = re.compile(r"checkpoint-(\d+)")


def f1_score(prompt_fidelity: float, subject_fidelity: float) -> float:
    """The harmonic mean ``2ab / (a + b)`` of the raw scores; 0 when either is <= 0."""
    a, b = prompt_fidelity, subject_fidelity
    if a <= 0 or b <= 0:
        return 0.0
    return 2 * a * b / (a + b)


def _is_blend(guidance_step: int | None, edit_step: int | None, alpha: float | None) -> bool:
    return guidance_step is not None and edit_step is not None and alpha != 0


@dataclass(frozen=True)
class OperatingPoint:
    """One row of a points table (``subject`` None: one subject, or an average over subjects)."""

    method: str
    subject_fidelity: float
    prompt_fidelity: float
    guidance_step: int | None = None
    edit_step: int | None = None
    alpha: float | None = None
    cfg: float | None = None
    subject_fidelity_se: float | None = None
    prompt_fidelity_se: float | None = None
    subject: str | None = None

    @property
    def is_blend(self) -> bool:
        return _is_blend(self.guidance_step, self.edit_step, self.alpha)

    @property
    def step(self) -> int | None:
        """The checkpoint step of a fine-tuning point (its edit step, else its guidance step)."""
        return self.edit_step if self.edit_step is not None else self.guidance_step

    @property
    def f1(self) -> float:
        return f1_score(self.prompt_fidelity, self.subject_fidelity)

    @property
    def key(self) -> tuple[str, int | None, int | None, float | None, float | None]:
        """What identifies the operating point across subjects."""
        return self.method, self.guidance_step, self.edit_step, self.alpha, self.cfg

    @property
    def label(self) -> str:
        cfg = "" if self.cfg is None else f", cfg {self.cfg:g}"
        if self.is_blend:
            alpha = "" if self.alpha is None else f", alpha {self.alpha:g}"
            return f"{self.method} G {self.guidance_step} / E {self.edit_step}{alpha}{cfg}"
        return (self.method if self.step is None else f"{self.method} step {self.step}") + cfg


def _cell(row: Mapping[str, object], column: str) -> str | None:
    value = row.get(column)
    return None if value is None or not str(value).strip() else str(value).strip()


def _number(row: Mapping[str, object], column: str, line: int) -> float | None:
    text = _cell(row, column)
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"row {line}: column {column!r} holds {text!r}, not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"row {line}: column {column!r} is {text!r}; scores must be finite")
    return number


def _step(row: Mapping[str, object], column: str, line: int) -> int | None:
    """A step number, a checkpoint name ending in ``checkpoint-STEP``, or ``base`` (step 0)."""
    text = _cell(row, column)
    if text is None:
        return None
    if text.lower() == "base":
        return 0
    found = _CHECKPOINT_STEP.findall(text)
    if found:
        return int(found[-1])
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not number.is_integer() or number < 0:
        raise ValueError(
            f"row {line}: column {column!r} holds {text!r}, which names no step: use a step number, a "
            "checkpoint name like runs/dog/checkpoint-50, or 'base'"
        )
    return int(number)


def _default_columns(present: set[str]) -> PointColumns:
    """The default names, or ``dreamblend eval``'s when the table is its summary."""
    eval_names = {EVAL_SUMMARY_COLUMNS.subject_fidelity, EVAL_SUMMARY_COLUMNS.prompt_fidelity}
    if not {PointColumns.subject_fidelity, PointColumns.prompt_fidelity} & present and eval_names <= present:
        return EVAL_SUMMARY_COLUMNS
    return PointColumns()


def read_points(
    source: str | Path | Iterable[Mapping[str, object]], columns: PointColumns | None = None
) -> list[OperatingPoint]:
    """Operating points from a CSV file or rows of dicts; empty cells and absent columns are None.

    Without ``columns`` the names of :class:`PointColumns` are used, or those of ``dreamblend eval``'s
    ``summary.csv`` (:data:`EVAL_SUMMARY_COLUMNS`) when the table has them instead. A row without a
    method is "DreamBlend" (a G/E pair) or "fine-tuning" (one checkpoint).
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"points table {path} does not exist")
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = [dict(row) for row in source]
    if not rows:
        raise ValueError("the points table has no rows")
    present = set().union(*(row.keys() for row in rows))
    columns = columns or _default_columns(present)
    missing = [getattr(columns, name) for name in REQUIRED if getattr(columns, name) not in present]
    if missing:
        raise ValueError(
            f"the points table lacks column(s) {missing}; it has {sorted(present)}. Name yours with "
            f"PointColumns(subject_fidelity='dino', prompt_fidelity='clip_t', ...) (CLI: --column)"
        )
    points = []
    for line, row in enumerate(rows, start=2 if isinstance(source, (str, Path)) else 0):
        values: dict[str, object] = {}
        for field in fields(OperatingPoint):
            column = getattr(columns, field.name)
            if field.name in ("method", "subject"):
                values[field.name] = _cell(row, column)
            elif field.name in ("guidance_step", "edit_step"):
                values[field.name] = _step(row, column, line)
            else:
                values[field.name] = _number(row, column, line)
        for name in REQUIRED:
            if values[name] is None:
                raise ValueError(f"row {line}: column {getattr(columns, name)!r} is empty")
        if values["method"] is None:
            blend = _is_blend(values["guidance_step"], values["edit_step"], values["alpha"])
            values["method"] = "DreamBlend" if blend else "fine-tuning"
        points.append(OperatingPoint(**values))
    return points


def _preference(indexed: tuple[int, OperatingPoint]) -> tuple[float, float, float, int]:
    index, p = indexed
    return p.f1, p.subject_fidelity, p.prompt_fidelity, -index


def best_by_f1(points: Sequence[OperatingPoint]) -> OperatingPoint:
    """The point of highest F1 (ties: higher subject fidelity, higher prompt fidelity, earlier row)."""
    if not points:
        raise ValueError("no operating points to choose from")
    return max(enumerate(points), key=_preference)[1]


def best_points(
    points: Sequence[OperatingPoint], per: Sequence[str] = ("subject", "method")
) -> dict[tuple, OperatingPoint]:
    """The best point by F1 of each group, keyed by the values of the ``per`` attributes."""
    groups: dict[tuple, list[OperatingPoint]] = {}
    for point in points:
        groups.setdefault(tuple(getattr(point, name) for name in per), []).append(point)
    return {key: best_by_f1(group) for key, group in groups.items()}


def pareto_front(points: Sequence[OperatingPoint]) -> list[OperatingPoint]:
    """The non-dominated points (both scores maximised), by increasing prompt fidelity.

    Of points with identical scores only the earliest is kept; a point equal to another on one score
    and worse on the other is dominated.
    """
    order = sorted(
        range(len(points)), key=lambda i: (-points[i].prompt_fidelity, -points[i].subject_fidelity, i)
    )
    front: list[OperatingPoint] = []
    best_subject = -math.inf
    for i in order:
        if points[i].subject_fidelity > best_subject:
            front.append(points[i])
            best_subject = points[i].subject_fidelity
    return front[::-1]


def _combined_se(errors: Sequence[float | None]) -> float | None:
    """Standard error of a mean of independent means."""
    if any(e is None for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors)) / len(errors)


def average_over_subjects(points: Sequence[OperatingPoint]) -> list[OperatingPoint]:
    """Per operating point, the mean over subjects of the subject means (and their combined error).

    Only operating points measured for every subject are averaged (fine-tuning trajectories need not
    share steps across subjects); the others are left out with a warning.
    """
    subjects = list(dict.fromkeys(p.subject for p in points))
    table: dict[tuple, dict[str | None, OperatingPoint]] = {}
    for p in points:
        row = table.setdefault(p.key, {})
        if p.subject in row:
            raise ValueError(f"operating point {p.label!r} appears twice for subject {p.subject!r}")
        row[p.subject] = p
    complete = {key: row for key, row in table.items() if len(row) == len(subjects)}
    if len(complete) < len(table):
        dropped = [next(iter(row.values())).label for key, row in table.items() if key not in complete]
        warnings.warn(
            f"{len(dropped)} operating point(s) not measured for all {len(subjects)} subjects are left "
            f"out of the average, e.g. {dropped[:3]}",
            UserWarning,
            stacklevel=2,
        )
    averaged = []
    for (method, g, e, alpha, cfg), row in complete.items():
        members = [row[s] for s in subjects]
        averaged.append(
            OperatingPoint(
                method=method,
                guidance_step=g,
                edit_step=e,
                alpha=alpha,
                cfg=cfg,
                subject_fidelity=sum(p.subject_fidelity for p in members) / len(members),
                prompt_fidelity=sum(p.prompt_fidelity for p in members) / len(members),
                subject_fidelity_se=_combined_se([p.subject_fidelity_se for p in members]),
                prompt_fidelity_se=_combined_se([p.prompt_fidelity_se for p in members]),
            )
        )
    return averaged


def plot_operating_points(
    points: Sequence[OperatingPoint],
    path: str | Path,
    *,
    title: str | None = None,
    x_label: str = "prompt fidelity (CLIP-T)",
    y_label: str = "subject fidelity (DINO)",
) -> Path:
    """The paper's Fig. 7 as a PNG: prompt fidelity (x) against subject fidelity (y).

    Fine-tuning checkpoints of each method form a line of points labelled by step; DreamBlend points
    are stars; error bars show standard errors where given; the dashed line is the Pareto front of all
    points and rings mark each method's best point by F1.
    """
    if not points:
        raise ValueError("no operating points to plot")
    figure = new_figure(6.4, 5.2)
    ax = figure.add_subplot()
    methods = list(dict.fromkeys(p.method for p in points))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for method in methods:
        mine = [p for p in points if p.method == method]
        checkpoints = sorted((p for p in mine if not p.is_blend), key=lambda p: (p.step is None, p.step or 0))
        blends = [p for p in mine if p.is_blend]
        for group, style in ((checkpoints, {"marker": "o", "linestyle": "-"}), (blends, {"marker": "*"})):
            if not group:
                continue
            x = [p.prompt_fidelity for p in group]
            y = [p.subject_fidelity for p in group]
            kind = "checkpoints" if group is checkpoints else "G/E pairs"
            ax.plot(
                x,
                y,
                color=colors[method],
                label=f"{method} ({kind})",
                marker=style["marker"],
                linestyle=style.get("linestyle", "none"),
                markersize=7,
                linewidth=1,
            )
            xerr = [p.prompt_fidelity_se or 0.0 for p in group]
            yerr = [p.subject_fidelity_se or 0.0 for p in group]
            if any(xerr) or any(yerr):
                ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor=colors[method], alpha=0.35)
        for p in checkpoints:
            if p.step is not None:
                xy = (p.prompt_fidelity, p.subject_fidelity)
                ax.annotate(str(p.step), xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
        best = best_by_f1(mine)
        ring = {"marker": "o", "markersize": 14, "markerfacecolor": "none", "linestyle": "none"}
        label = "best by F1" if method == methods[0] else None
        ax.plot(
            [best.prompt_fidelity],
            [best.subject_fidelity],
            markeredgecolor=colors[method],
            label=label,
            **ring,
        )
    front = pareto_front(points)
    x, y = [p.prompt_fidelity for p in front], [p.subject_fidelity for p in front]
    ax.plot(x, y, "k--", linewidth=1, label="Pareto front")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return save_png(figure, path)


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "subject"


def plot_subjects(points: Sequence[OperatingPoint], folder: str | Path, **kwargs: object) -> list[Path]:
    """One Fig. 7 plot per subject (``SUBJECT.png``) and, for several subjects, ``average.png``."""
    folder = Path(folder)
    subjects = list(dict.fromkeys(p.subject for p in points))
    written = []
    for subject in subjects:
        name = "points" if subject is None else subject
        mine = [p for p in points if p.subject == subject]
        written.append(plot_operating_points(mine, folder / f"{_file_stem(name)}.png", title=name, **kwargs))
    if len(subjects) > 1:
        average = average_over_subjects(points)
        if average:
            title = f"average over {len(subjects)} subjects"
            written.append(plot_operating_points(average, folder / "average.png", title=title, **kwargs))
    return written
