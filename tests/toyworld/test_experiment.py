"""The toy-world experiment: its plan follows the paper, smoke mode writes every output with finite
values, checkpoints and guidance change the images, and a rerun makes nothing it already made."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image

from dreamblend.toyworld.experiment import (
    CHECKPOINT,
    DREAMBLEND,
    Experiment,
    ExperimentError,
    background_words,
    main,
    make_plan,
    paper_steps,
    parse_settings,
    plan_points,
)

POINT_COLUMNS = (
    "method,guidance_step,edit_step,alpha,subject_fidelity,subject_fidelity_se,prompt_fidelity,"
    "prompt_fidelity_se,diversity,n_images"
).split(",")
FIGURES = ("pareto.png", "collapse.png", "fig9_alpha.png", "fig10_checkpoints.png", "fig3_dotted_cube.png")


def smoke(out: Path, *extra: str) -> int:
    """Run smoke mode in-process at the suite's thread count (smoke mode would otherwise set one)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return main(
            ["--smoke", "--out", str(out), "--quiet", "--threads", str(torch.get_num_threads()), *extra]
        )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def files_with_times(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("experiment")
    assert smoke(out) == 0
    return out


# ---------------------------------------------------------------------------------------------- the plan


def test_paper_schedule_edit_points_and_pairs():
    assert paper_steps(400) == [*range(5, 51, 5), *range(75, 401, 25)]
    assert paper_steps(800, scale=2) == [2 * s for s in paper_steps(400)]
    # The toy world's default is the paper's schedule stretched twice (its LoRA learns more slowly).
    default = make_plan(parse_settings(["--out", "unused"]))
    assert default.edit_steps == (200, 400) and default.fixed_guidance == 50
    assert default.steps == tuple(paper_steps(400, scale=2))
    settings = parse_settings(["--out", "unused", "--step-scale", "1"])
    plan = make_plan(settings)
    assert plan.edit_steps == (100, 200) and plan.edit_cfg == {100: 3.0, 200: 2.0}
    assert (plan.fixed_guidance, plan.fixed_edit, plan.fixed_alpha) == (25, 200, 0.1)
    assert plan.cfg_of(125) == 3.0 and plan.cfg_of(175) == 2.0 and plan.cfg_of(150) == 3.0
    points = plan_points(plan, settings)
    assert len(points) == len(set(points))
    alone = [p for p in points if p.method == CHECKPOINT]
    assert {(p.edit, p.cfg) for p in alone} == {(s, c) for s in (0, *plan.steps) for c in (3.0, 2.0)}
    blends = [p for p in points if p.method == DREAMBLEND]
    grid = {(p.guidance, p.edit) for p in blends if p.edit in plan.edit_steps and p.alpha in settings.alphas}
    # The paper's 28 pairs: E at 100 and 200, G at every earlier checkpoint and the base model.
    assert grid == {(g, e) for e in (100, 200) for g in (0, *(s for s in plan.steps if s < e))}
    assert len(grid) == 28
    assert all(p.cfg == plan.edit_cfg[p.edit] for p in blends if p.edit in plan.edit_steps)
    sweep = {p.alpha for p in blends if (p.guidance, p.edit) == (25, 200)}
    assert sweep == {*settings.alphas, *settings.sweep_alphas}
    by_edit = {p.edit for p in blends if p.guidance == 25 and p.alpha == 0.1}
    assert by_edit == {s for s in plan.steps if s > 25}


@pytest.mark.parametrize(
    "options, message",
    [
        (["--edit-steps", "95"], "edit steps"),
        (["--edit-cfg", "3"], "--edit-cfg"),
        (["--fixed-guidance", "400"], "--fixed-guidance"),
        (["--alphas", "0"], "positive"),
        (["--max-steps", "150"], "edit steps"),
    ],
)
def test_plans_that_cannot_work_are_refused_before_training(options, message):
    with pytest.raises(ExperimentError, match=message):
        make_plan(parse_settings(["--out", "unused", *options]))


def test_background_words_are_the_setting_nouns():
    assert background_words("a sks cube in front of a brick wall") == ["brick", "wall"]
    assert background_words("a sks cone under the night sky") == ["night", "sky"]
    assert background_words("a sks ring in the snow") == ["snow"]
    with pytest.raises(ExperimentError, match="names no setting"):
        background_words("a sks cube")


def test_image_ids_change_with_what_sets_the_pixels():
    def ids(*options: str) -> set[str]:
        experiment = Experiment(parse_settings(["--smoke", "--out", "unused", *options]))
        subject = experiment.subjects[0]
        return {i.id for p in experiment.points for i in experiment.items(subject, p)}

    same = ids()
    assert same == ids() and len(same) == 52
    assert not same & ids("--steps", "3")
    assert not same & ids("--learning-rate", "0.5")


def test_command_line_errors(tmp_path, capsys):
    assert main(["--smoke"]) == 2
    assert "--smoke needs --out" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--base", str(tmp_path / "missing")]) == 2
    assert "no base model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- smoke run


def test_smoke_run_writes_every_output_with_finite_values(run):
    points = read_csv(run / "points.csv")
    assert set(POINT_COLUMNS) <= set(points[0])
    numeric = [c for c in points[0] if c not in ("method", "beyond_checkpoint_front")]
    for row in points:
        for column in numeric:
            if row[column]:
                assert math.isfinite(float(row[column])), (column, row)
        assert row["subject_fidelity"] and row["prompt_fidelity"] and row["diversity"]
        assert int(row["n_images"]) == 4  # 1 subject x 2 prompts x 2 seeds
    methods = {r["method"] for r in points}
    assert methods == {CHECKPOINT, DREAMBLEND}
    alone = [r for r in points if r["method"] == CHECKPOINT]
    assert all(r["guidance_step"] == "" and r["alpha"] == "" for r in alone)
    assert {int(r["edit_step"]) for r in alone} == {0, 1, 2, 3}
    blends = [r for r in points if r["method"] == DREAMBLEND]
    assert {(int(r["guidance_step"]), int(r["edit_step"])) for r in blends} == {
        (0, 2),
        (1, 2),
        (0, 3),
        (1, 3),
        (2, 3),
    }
    assert all(r["beyond_checkpoint_front"] in ("True", "False") for r in blends)
    assert all((float(r["front_margin"]) > 0) == (r["beyond_checkpoint_front"] == "True") for r in blends)

    by_subject = read_csv(run / "points_by_subject.csv")
    assert {r["subject"] for r in by_subject} == {"dotted_cube"} and len(by_subject) == len(points)
    collapse = read_csv(run / "collapse.csv")
    assert {r["subject"] for r in collapse} == {"dotted_cube", "all"}
    for row in collapse:
        assert 0 <= float(row["collapse"]) <= 1 and 0 < float(row["region_share"]) < 1
        assert float(row["share_grass"]) >= 0 and float(row["share_beach"]) >= 0

    table = (run / "table.md").read_text()
    assert "| best DreamBlend by F1 |" in table and "| best checkpoint by F1 |" in table
    assert "= 4 images per operating point" in table
    info = json.loads((run / "run.json").read_text())
    assert {"versions", "device", "seconds", "options", "compute_seconds", "estimate"} <= set(info)
    assert info["images_made_this_run"] == 52 and info["options"]["smoke"] is True
    assert info["estimate"]["dreamblend_image_s"] > 0
    for name in FIGURES:
        with Image.open(run / "figures" / name) as image:
            assert image.format == "PNG" and min(image.size) > 100
    assert (run / "figures" / "subjects" / "dotted_cube.png").is_file()
    assert (run / ".gitignore").read_text() == "work/\n"


def test_checkpoints_and_guidance_change_the_images(run):
    folder = run / "work" / "dotted_cube"
    records = [json.loads(p.read_text()) for p in (folder / "records").glob("*.json")]

    def pixels(record: dict) -> np.ndarray:
        return np.asarray(Image.open(folder / "images" / record["file"]), dtype=np.float64)

    def same_start(record: dict) -> tuple:
        return record["prompt"], record["seed"], record["cfg"]

    alone = {(r["edit_step"], *same_start(r)): r for r in records if r["method"] == CHECKPOINT}
    drift = {
        step: np.mean(
            [np.abs(pixels(alone[(step, *k[1:])]) - pixels(alone[k])).mean() for k in alone if k[0] == 0]
        )
        for step in (1, 3)
    }
    assert 0 < drift[1] < drift[3]  # later checkpoints move further from the base model
    guided = [r for r in records if r["method"] == DREAMBLEND and r["edit_step"] == 3]
    assert all(np.abs(pixels(r) - pixels(alone[(3, *same_start(r))])).mean() > 0 for r in guided)


def test_rerun_makes_nothing_again_and_remakes_only_what_is_missing(run):
    before = files_with_times(run / "work")
    assert smoke(run) == 0
    assert files_with_times(run / "work") == before
    assert json.loads((run / "run.json").read_text())["images_made_this_run"] == 0

    record = next(json.loads(p.read_text()) for p in (run / "work/dotted_cube/records").glob("*.json"))
    image = run / "work/dotted_cube/images" / record["file"]
    pixels = np.asarray(Image.open(image))
    image.unlink()
    assert smoke(run) == 0
    assert json.loads((run / "run.json").read_text())["images_made_this_run"] == 1
    # Remade alone in a batch of one: equal up to float rounding across batch sizes.
    assert np.abs(np.asarray(Image.open(image), dtype=int) - pixels).max() <= 1


def test_changed_training_settings_are_refused_on_a_trained_folder(run, capsys):
    before = files_with_times(run / "work")
    assert smoke(run, "--learning-rate", "0.5") == 2
    assert "trained with other settings" in capsys.readouterr().err
    assert files_with_times(run / "work") == before
