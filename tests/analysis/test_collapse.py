"""Attention collapse: region and score on synthetic maps, the G/E rule, `suggest` on a tiny trajectory."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from analysis_helpers import check_png
from PIL import Image

from dreamblend.analysis.collapse import (
    CollapsePoint,
    attention_on_subject,
    context_words,
    plot_collapse,
    subject_region,
    suggest_checkpoints,
    trajectory_collapse,
)
from dreamblend.cli import main
from dreamblend.testing import save_tiny_pipeline, tiny_clip_tokenizer, tiny_sd_pipeline
from dreamblend.training import DreamBoothConfig, train_dreambooth


def test_subject_region_and_share_of_attention():
    subject = torch.zeros(4, 4)
    subject[:2, :2] = 1.0  # the subject sits top-left; the map's mean is 0.25
    region = subject_region(subject)
    assert region.sum() == 4 and region[:2, :2].all()
    uniform = torch.ones(4, 4)
    on_subject = torch.full((4, 4), 0.25 / 12)  # 3/4 of the mass on the 4 region cells, 1/4 on 12 others
    on_subject[:2, :2] = 0.75 / 4
    elsewhere = 1 - subject
    shares = attention_on_subject(torch.stack([uniform, on_subject, elsewhere, 2 * on_subject]), region)
    torch.testing.assert_close(shares, torch.tensor([0.25, 0.75, 0.0, 0.75]))  # scale does not matter

    graded = torch.arange(16.0).view(4, 4)
    assert subject_region(graded, top=0.25).flatten().nonzero().flatten().tolist() == [12, 13, 14, 15]
    assert subject_region(graded, top=0.01).sum() == 1  # at least one cell
    assert subject_region(subject, top=0.125).sum() == 4  # cells tied with the last chosen one join it
    with pytest.raises(ValueError, match=r"top must be a fraction of the cells in \(0, 1\)"):
        subject_region(subject, top=1.5)


def test_context_words_leave_out_subject_class_and_function_words():
    tokenizer = tiny_clip_tokenizer()
    words = context_words(tokenizer, "A sks dog on a cobblestone street, near the tree.", ["sks", "Dog"])
    assert words == ["cobblestone", "street", "near", "tree"]


def points(scores: list[float]) -> list[CollapsePoint]:
    steps = [0, 5, 10, 25, 50, 100, 200, 300][: len(scores)]
    return [
        CollapsePoint(step, None if step == 0 else Path(f"checkpoint-{step}"), s, {"street": s}, 0.3)
        for step, s in zip(steps, scores, strict=True)
    ]


def test_suggestion_rule_on_known_scores():
    # rise 0.405 from the base model: levels 0, .02, .07, .25, .62, .94, .99, 1
    run = points([0.30, 0.31, 0.33, 0.40, 0.55, 0.68, 0.70, 0.705])
    choice = suggest_checkpoints(run[::-1])  # order does not matter
    assert (choice.guidance.step, choice.edit.step) == (25, 100)
    assert [round(level, 2) for level in choice.levels] == [0, 0.02, 0.07, 0.25, 0.62, 0.94, 0.99, 1]
    assert "94% of its rise" in choice.why_edit and "within 25% of the rise" in choice.why_guidance
    assert suggest_checkpoints(run, guidance_level=0.1, saturation=0.6).edit.step == 50
    assert suggest_checkpoints(run, guidance_level=0.1, saturation=0.6).guidance.step == 10
    # G stops before the first crossing even if collapse dips below the ceiling again later
    dip = points([0.30, 0.50, 0.31, 0.32, 0.70])
    assert (suggest_checkpoints(dip).guidance.step, suggest_checkpoints(dip).edit.step) == (0, 50)
    flat = suggest_checkpoints(points([0.40, 0.41, 0.405, 0.40]))
    assert (flat.guidance.step, flat.edit.step) == (0, 25) and "no collapse to read" in flat.why_edit
    with pytest.raises(ValueError, match="at least two points"):
        suggest_checkpoints(run[:1])
    with pytest.raises(ValueError, match="guidance_level < saturation"):
        suggest_checkpoints(run, guidance_level=0.9, saturation=0.5)


def test_collapse_plot(tmp_path):
    run = points([0.30, 0.31, 0.33, 0.40, 0.55, 0.68, 0.70, 0.705])
    path = plot_collapse(
        run, tmp_path / "collapse.png", suggestion=suggest_checkpoints(run), title="synthetic"
    )
    check_png(path, min_size=(500, 350))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny DreamBooth trajectory (checkpoints at steps 2, 4, 6) trained on two random images."""
    root = tmp_path_factory.mktemp("trajectory")
    base = save_tiny_pipeline(tiny_sd_pipeline(0), root / "base")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    config = DreamBoothConfig(pretrained_model=str(base), instance_dir=images, output_dir=root / "run",
                              class_word="dog", max_steps=6, save_at="2,4,6", learning_rate=1e-3,
                              progress=False)  # fmt: skip
    train_dreambooth(config)
    return root / "run"


def test_trajectory_collapse_scores_every_checkpoint(run_dir):
    seen = []
    scored = trajectory_collapse(run_dir, seeds=(0, 1), num_inference_steps=2, report=seen.append)
    assert [p.step for p in scored] == [0, 2, 4, 6] and [p.step for p in seen] == [2, 4, 6, 0]
    assert scored[0].path is None and scored[-1].path == run_dir / "checkpoint-6"
    for point in scored:
        assert set(point.words) == {"cobblestone", "street"}  # the default Fig. 3 prompt's context words
        assert 0 < point.score < 1 and 0 < point.region < 1
        assert point.score == pytest.approx(sum(point.words.values()) / 2)
    with pytest.raises(ValueError, match="lacks the trajectory's subject token 'sks'"):
        trajectory_collapse(run_dir, ["a dog on the beach"], num_inference_steps=1)


def test_suggest_command(run_dir, tmp_path, capsys):
    plot = tmp_path / "collapse.png"
    args = ["suggest", str(run_dir), "--prompt", "a sks dog on the beach", "--steps", "2"]
    assert main([*args, "--seeds", "0", "1", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "<- G" in out and "<- E" in out and "\nG: " in out and "\nE: " in out
    assert "try: dreamblend generate 'a sks dog on the beach' --model" in out and "--edit-model" in out
    check_png(plot, min_size=(500, 350))
    assert main([*args, "--subject", "zebra"]) == 2
    assert "'zebra' is not in the prompt" in capsys.readouterr().err
    assert main(["suggest", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_suggest_command_on_a_points_table(tmp_path, capsys):
    table = tmp_path / "points.csv"
    rows = [("db", "", 5, 0.40, 0.32), ("db", "", 100, 0.60, 0.28), ("blend", 5, 100, 0.62, 0.31)]
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "guidance_step", "edit_step", "dino", "clip_t"])
        writer.writerows(rows)
    columns = ["--column", "subject_fidelity=dino", "--column", "prompt_fidelity=clip_t"]
    assert main(["suggest", str(table), *columns, "--plots", str(tmp_path / "fig7")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "db step 100" in lines[1] and "0.382" in lines[1] and lines[1].endswith("no")
    assert "blend G 5 / E 100" in lines[2] and lines[2].endswith("yes")
    check_png(tmp_path / "fig7" / "points.png", min_size=(500, 400))
    assert main(["suggest", str(table), "--column", "dino"]) == 2
    assert "FIELD=HEADER" in capsys.readouterr().err
