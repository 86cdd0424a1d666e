"""The toy-world JeDi experiment: set generator, and the whole command in --smoke mode (CI)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamblend.jedi.data import find_image_sets
from dreamblend.toyworld.jedi_experiment import main
from dreamblend.toyworld.jedi_sets import training_subject, write_training_sets
from dreamblend.toyworld.subjects import SUBJECTS
from dreamblend.toyworld.vocab import parse_caption


def test_training_subjects_are_never_evaluation_subjects() -> None:
    held_out = {(s.cls, s.colour, s.pattern.kind) for s in SUBJECTS}
    drawn = [training_subject(i) for i in range(300)]
    assert not {(s.cls, s.colour, s.pattern.kind) for s in drawn} & held_out
    assert len({(s.cls, s.colour, s.pattern) for s in drawn}) > 250  # varied
    assert training_subject(7) == training_subject(7) and training_subject(7, seed=1) != training_subject(7)


def test_sets_are_stacked_and_resumable(tmp_path: Path) -> None:
    paths = write_training_sets(tmp_path, 3, 4)
    sets = find_image_sets(tmp_path)
    assert [s.size for s in sets] == [4, 4, 4] and Image.open(paths[0]).size == (64, 256)
    assert all(parse_caption(c).is_subject and parse_caption(c).background for s in sets for c in s.captions)
    stamp = paths[1].stat().st_mtime_ns
    write_training_sets(tmp_path, 4, 4)  # keeps the finished sets, adds the fourth
    assert paths[1].stat().st_mtime_ns == stamp and len(find_image_sets(tmp_path)) == 4


def test_smoke_run_writes_every_output_and_resumes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "jedi"
    assert main(["--smoke", "--out", str(out), "--threads", "1"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    methods = [r["method"] for r in rows]
    assert methods[:2] == ["JeDi, 1 reference", "JeDi, 2 references"]
    assert all(r["toy_subject"] and r["toy_subject_masked"] and r["toy_prompt"] for r in rows[:2])
    if (Path("benchmarks/results/toyworld/points.csv")).is_file():
        assert "DreamBooth, best checkpoint by F1" in methods and "DreamBlend, best by F1" in methods
    cost = list(csv.DictReader((out / "cost.csv").open()))
    assert {int(c["set_size"]) for c in cost} == {1, 2} and float(cost[0]["ratio"]) == 1.0
    table = (out / "table.md").read_text()
    assert "| JeDi, 1 reference |" in table and "Table 6" in table
    assert (out / "figures" / "jedi_samples.png").is_file() and (
        out / "figures" / "jedi_points.png"
    ).is_file()
    assert json.loads((out / "run.json").read_text())["options"]["smoke"] is True
    capsys.readouterr()
    assert main(["--smoke", "--out", str(out), "--threads", "1"]) == 0  # finished stages are reused
    said = capsys.readouterr().out
    assert "training JeDi" not in said and "sampled 0 JeDi images" in said


def test_cost_only_needs_no_training(tmp_path: Path) -> None:
    out = tmp_path / "cost"
    assert main(["--smoke", "--cost-only", "--out", str(out), "--threads", "1"]) == 0
    assert (out / "cost.csv").is_file() and "| JeDi, joint guidance | 2 |" in (out / "cost.md").read_text()
    assert not (out / "work" / "train").exists()


def test_masked_score_keeps_the_object_and_greys_the_setting() -> None:
    """The box from the world encoder's layout head covers the true object mask on fresh renders."""
    from dreamblend.toyworld.jedi_experiment import GREY, object_boxes
    from dreamblend.toyworld.metrics import DEFAULT_WEIGHTS, WorldEncoder
    from dreamblend.toyworld.subjects import subject_set

    if not (DEFAULT_WEIGHTS / "model.safetensors").is_file():
        pytest.skip("no shipped world-encoder weights")
    encoder = WorldEncoder.load(DEFAULT_WEIGHTS)
    samples = [s for subject in SUBJECTS for s in subject_set(subject, 4, seed=9)]
    boxed = object_boxes(encoder, [Image.fromarray(s.rendered.image) for s in samples])
    kept = greyed = 0.0
    for sample, image in zip(samples, boxed, strict=True):
        grey = (np.asarray(image) == GREY).all(axis=-1)
        kept += (~grey[sample.rendered.mask]).mean() / len(samples)
        greyed += grey[~sample.rendered.mask].mean() / len(samples)
    assert kept > 0.97  # the object survives the mask
    assert greyed > 0.6  # most of the setting is gone (the box also holds some background)
