"""Operating points: reading tables, F1 choice, Pareto fronts with ties and duplicates, averages, plots."""

from __future__ import annotations

import csv
import math

import pytest
from analysis_helpers import check_png

from dreamblend.analysis.points import (
    OperatingPoint,
    PointColumns,
    average_over_subjects,
    best_by_f1,
    best_points,
    f1_score,
    pareto_front,
    plot_operating_points,
    plot_subjects,
    read_points,
)

HEADER = [
    "subject", "method", "guidance_step", "edit_step", "alpha",
    "subject_fidelity", "subject_fidelity_se", "prompt_fidelity", "prompt_fidelity_se",
]  # fmt: skip
# subject, method, G, E, alpha, DINO, se, CLIP-T, se
ROWS = [
    ("dog", "dreambooth", "", 5, "", 0.40, 0.02, 0.32, 0.01),
    ("dog", "dreambooth", "", 100, "", 0.60, 0.02, 0.28, 0.01),
    ("dog", "dreambooth", "", 200, "", 0.70, 0.02, 0.24, 0.01),
    ("dog", "dreambooth", "", 300, "", 0.65, 0.02, 0.24, 0.01),  # same CLIP-T as step 200, lower DINO
    ("dog", "dreamblend", 5, 100, 0.1, 0.62, 0.02, 0.31, 0.01),
    ("dog", "dreamblend", 5, 100, 0.07, 0.62, 0.02, 0.31, 0.01),  # identical scores to the row above
    ("cat", "dreambooth", "", 5, "", 0.30, 0.04, 0.30, 0.02),
    ("cat", "dreambooth", "", 100, "", 0.50, 0.03, 0.26, 0.02),
    ("cat", "dreamblend", 5, 100, 0.1, 0.54, 0.02, 0.29, 0.01),
]


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "points.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows(ROWS)
    return path


def point(clip_t: float, dino: float, **kwargs) -> OperatingPoint:
    return OperatingPoint(method="m", prompt_fidelity=clip_t, subject_fidelity=dino, **kwargs)


def test_read_points_and_classify(table):
    points = read_points(table)
    assert len(points) == len(ROWS)
    first, blend = points[0], points[4]
    assert (first.subject, first.method, first.guidance_step, first.edit_step, first.alpha) == (
        "dog", "dreambooth", None, 5, None,
    )  # fmt: skip
    assert not first.is_blend and first.step == 5 and first.label == "dreambooth step 5"
    assert blend.is_blend and blend.label == "dreamblend G 5 / E 100, alpha 0.1"
    assert (blend.subject_fidelity_se, blend.prompt_fidelity_se) == (0.02, 0.01)
    e_alone = point(0.2, 0.3, guidance_step=5, edit_step=100, alpha=0.0)
    assert not e_alone.is_blend and e_alone.step == 100  # alpha 0 samples E alone


def test_f1_is_the_harmonic_mean_of_raw_scores():
    assert f1_score(0.28, 0.60) == pytest.approx(2 * 0.28 * 0.60 / 0.88)
    assert f1_score(0.3, 0.0) == 0.0 and f1_score(-0.1, 0.5) == 0.0
    assert point(0.31, 0.62).f1 == pytest.approx(0.41333333)


def test_best_by_f1_overall_per_method_and_ties(table):
    dog = [p for p in read_points(table) if p.subject == "dog"]
    best = best_by_f1(dog)
    assert best is dog[4]  # the first of the two identical DreamBlend rows
    per_method = best_points(dog, per=("method",))
    assert per_method[("dreambooth",)].edit_step == 100  # F1 0.382 beats steps 5 (0.356) and 200 (0.357)
    assert per_method[("dreamblend",)] is dog[4]
    by_subject = best_points(read_points(table))
    assert list(by_subject) == [("dog", "dreambooth"), ("dog", "dreamblend"), ("cat", "dreambooth"),
                                ("cat", "dreamblend")]  # fmt: skip
    # equal F1: the higher subject fidelity wins, whatever the order
    balanced = [point(0.4, 0.3, edit_step=1), point(0.3, 0.4, edit_step=2)]
    assert best_by_f1(balanced).edit_step == 2 and best_by_f1(balanced[::-1]).edit_step == 2
    with pytest.raises(ValueError, match="no operating points"):
        best_by_f1([])


def test_pareto_front_drops_dominated_points_and_duplicates(table):
    dog = [p for p in read_points(table) if p.subject == "dog"]
    front = pareto_front(dog)
    assert front == [dog[2], dog[4], dog[0]]  # by increasing CLIP-T: step 200, DreamBlend (first row), step 5
    # step 100 is dominated by DreamBlend; step 300 ties step 200 on CLIP-T but has lower DINO
    assert pareto_front([dog[5], dog[4]]) == [dog[5]]  # identical scores: the earlier row stands for both
    same = [point(0.3, 0.5, edit_step=1), point(0.3, 0.5, edit_step=2), point(0.3, 0.5, edit_step=3)]
    assert pareto_front(same) == [same[0]]
    assert pareto_front([point(0.2, 0.5), point(0.3, 0.5)]) == [point(0.3, 0.5)]  # equal DINO, better CLIP-T
    assert pareto_front([]) == []


def test_average_over_subjects_keeps_shared_points(table):
    with pytest.warns(UserWarning, match="3 operating point"):  # dog-only: steps 200, 300 and alpha 0.07
        average = average_over_subjects(read_points(table))
    assert [p.label for p in average] == [
        "dreambooth step 5", "dreambooth step 100", "dreamblend G 5 / E 100, alpha 0.1",
    ]  # fmt: skip
    step5 = average[0]
    assert step5.subject is None
    assert step5.subject_fidelity == pytest.approx(0.35) and step5.prompt_fidelity == pytest.approx(0.31)
    assert step5.subject_fidelity_se == pytest.approx(math.sqrt(0.02**2 + 0.04**2) / 2)
    with pytest.raises(ValueError, match="appears twice for subject 'dog'"):
        average_over_subjects([point(0.3, 0.5, subject="dog"), point(0.3, 0.6, subject="dog")])


def test_columns_are_configurable_and_errors_name_the_fix(tmp_path):
    rows = [{"model": "db", "step": "50", "dino": "0.5", "clip_t": "0.3"}]
    columns = PointColumns(
        method="model", edit_step="step", subject_fidelity="dino", prompt_fidelity="clip_t"
    )
    (p,) = read_points(rows, columns)
    assert (p.method, p.edit_step, p.subject_fidelity, p.prompt_fidelity) == ("db", 50, 0.5, 0.3)
    assert p.alpha is None and p.subject is None
    missing = r"lacks column\(s\) \['subject_fidelity', 'prompt_fidelity'\].*PointColumns"
    with pytest.raises(ValueError, match=missing):
        read_points(rows)
    with pytest.raises(ValueError, match="row 0: column 'dino' holds 'high', not a number"):
        read_points([{**rows[0], "dino": "high"}], columns)
    for step in ("12.5", "-5", "latest"):
        with pytest.raises(ValueError, match=f"row 0: column 'step' holds '{step}', which names no step"):
            read_points([{**rows[0], "step": step}], columns)
    with pytest.raises(ValueError, match="scores must be finite"):
        read_points([{**rows[0], "clip_t": "nan"}], columns)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_points(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("method,subject_fidelity,prompt_fidelity\ndb,0.5,\n")
    with pytest.raises(ValueError, match="row 2: column 'prompt_fidelity' is empty"):
        read_points(bad)


def test_eval_summary_is_read_as_it_is_written():
    """`dreamblend eval` names checkpoints (not steps) and writes dino_mean/clip_t_mean and their errors."""
    common = {"subject": "dog", "pair": "p", "cfg": "2.0", "images": "10", "dino_se": "0.01", "clip_t_se": ""}
    rows = [
        {**common, "guidance": "base", "edit": "runs/dog/checkpoint-200", "alpha": "0.07",
         "dino_mean": "0.6", "clip_t_mean": "0.3"},
        {**common, "guidance": "base", "edit": "runs/dog/checkpoint-200", "alpha": "0",
         "dino_mean": "0.7", "clip_t_mean": "0.25"},
        {**common, "guidance": "base + runs/dog/checkpoint-50/pytorch_lora_weights.safetensors",
         "edit": "runs/dog/checkpoint-100", "alpha": "0.1", "dino_mean": "0.55", "clip_t_mean": "0.31"},
    ]  # fmt: skip
    blend, alone, lora = read_points(rows)
    assert blend.label == "DreamBlend G 0 / E 200, alpha 0.07, cfg 2" and blend.subject_fidelity_se == 0.01
    assert alone.label == "fine-tuning step 200, cfg 2" and alone.prompt_fidelity_se is None
    assert (lora.guidance_step, lora.edit_step) == (50, 100)


def test_plots_per_subject_and_averaged(table, tmp_path):
    points = read_points(table)
    with pytest.warns(UserWarning, match="left out of the average"):
        written = plot_subjects(points, tmp_path / "fig7")
    assert [p.name for p in written] == ["dog.png", "cat.png", "average.png"]
    for path in written:
        check_png(path, min_size=(500, 400))
    single = plot_operating_points(points[:4], tmp_path / "one.png", title="no DreamBlend points")
    check_png(single)
    with pytest.raises(ValueError, match="name a .png file"):
        plot_operating_points(points, tmp_path / "fig.jpg")
