"""The shipped toy model is a stand-in for Stable Diffusion, not a special path: every command runs on
its folder exactly as on an SD1.5 folder (generate, batch, both trainers in both modes, eval)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from PIL import Image

from dreamblend.cli import main
from dreamblend.toyworld.model import base_model_path
from dreamblend.toyworld.shipped import shipped_subject


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def instances(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("instances")
    for i, image in enumerate(shipped_subject().references()[:2]):
        image.save(folder / f"{i}.png")
    return folder


def test_generate_blends_the_shipped_checkpoints(tmp_path):
    shipped = shipped_subject()
    args = ["generate", "a sks cube in the snow", "--model", str(base_model_path()), "--steps", "2"]
    args += [
        "--guidance-model",
        str(shipped.guidance),
        "--edit-model",
        str(shipped.edit),
        "--out",
        str(tmp_path / "cube.png"),
    ]
    assert main(args) == 0
    assert Image.open(tmp_path / "cube.png").size == (64, 64)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_train_dreambooth_on_the_toy_model(mode, instances, tmp_path):
    args = ["train", "dreambooth", "--model", str(base_model_path()), "--instance-dir", str(instances)]
    args += [
        "--class",
        "cube",
        "--output",
        str(tmp_path),
        "--mode",
        mode,
        "--max-steps",
        "2",
        "--save-at",
        "1,2",
    ]
    assert main([*args, "--no-progress", "--mixed-precision", "no"]) == 0
    index = json.loads((tmp_path / "trajectory.json").read_text())
    assert [c["step"] for c in index["checkpoints"]] == [1, 2]


def test_train_attndreambooth_on_the_toy_model(instances, tmp_path):
    args = ["train", "attndreambooth", "--model", str(base_model_path()), "--instance-dir", str(instances)]
    args += ["--class", "cube", "--output", str(tmp_path), "--steps", "1,1,1", "--batch-size", "1"]
    assert main([*args, "--no-progress", "--mixed-precision", "no", "--save-at", "1,2,3"]) == 0
    assert (tmp_path / "trajectory.json").is_file()


def test_batch_then_eval_with_the_toy_metrics(tmp_path):
    shipped = shipped_subject()
    jobs = {
        "model": str(base_model_path()),
        "output_dir": str(tmp_path / "run"),
        "prompts": ["a sks cube in the snow", "a sks cube on the beach"],
        "seeds": [0, 1],
        "pairs": [{"guidance": str(shipped.guidance), "edit": str(shipped.edit)}],
        "alpha": [0.0, 0.1],
        "cfg": 3.0,
        "steps": 2,
    }
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    assert main(["batch", str(tmp_path / "jobs.json"), "--no-progress"]) == 0
    references = tmp_path / "references"
    references.mkdir()
    for i, image in enumerate(shipped.references()):
        image.save(references / f"{i}.png")
    metrics = ["toy_subject", "toy_prompt", "toy_diversity"]
    args = ["eval", str(tmp_path / "run"), "--references", str(references), "--metrics", *metrics]
    assert main([*args, "--out", str(tmp_path / "scores"), "--no-progress"]) == 0
    with (tmp_path / "scores" / "scores.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8  # 2 prompts x 2 seeds x 2 alphas
    assert all(-1 <= float(row["toy_subject"]) <= 1 and 0 <= float(row["toy_prompt"]) <= 1 for row in rows)
