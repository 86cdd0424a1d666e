"""The README's main command: ``dreamblend demo`` blends the shipped toy-world subject and reports it."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from dreamblend.cli import build_parser, main


def test_demo_blends_the_shipped_subject_and_draws_its_maps(tmp_path, capsys):
    """Offline on the shipped toy model: three rows (G, E alone, DreamBlend) of image + word maps per
    prompt in one picture, and every role scored by the toy world's metrics."""
    from PIL import Image

    args = ["demo", "--steps", "3", "--seeds", "1", "--out", str(tmp_path), "--backend", "torch"]
    assert main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["op_backend"] == "torch" and report["steps"] == 3 and len(report["prompts"]) == 2
    for role in ("G (guidance)", "E alone", "DreamBlend"):
        scores = report["scores"][role]
        assert set(scores) == {"toy_subject", "toy_prompt", "toy_background"}
        assert all(np.isfinite(v) for v in scores.values())
    picture = Image.open(tmp_path / "demo.png")
    # Two prompts, each a titled figure of 3 rows x (image + 3 words) panels: taller than wide.
    assert picture.height > 1.5 * picture.width > 600
    pixels = np.asarray(picture.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 20  # drawn images and heat maps, not a blank page
    assert {p.name for p in tmp_path.iterdir()} == {"demo.png", "report.json"}
    out = capsys.readouterr().out
    assert "DreamBlend demo" in out and "E alone" in out


def test_demo_rejects_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="--steps and --seeds must be at least 1"):
        main(["demo", "--steps", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="must name the subject"):
        main(["demo", "--prompt", "a red ball in the snow", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="not in the toy world's grammar"):
        main(["demo", "--prompt", "a sks dog in the jungle", "--out", str(tmp_path)])


def test_every_command_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "generate", "batch", "train", "bench"):
        assert command in out


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_help_texts_are_plain_text():
    seen = 0
    for parser in _parsers(build_parser()):
        text = parser.format_help()
        assert not re.search(r"``|:[a-z]+:`", text), f"reST markup in `{parser.prog} --help`:\n{text}"
        seen += 1
    assert seen >= 7  # dreamblend, demo, generate, batch, train, train dreambooth/attndreambooth, bench


def test_a_command_prints_no_third_party_notices():
    """Importing the pipeline stack (transformers' image processors) prints nothing a user cannot act on."""
    result = subprocess.run(
        [sys.executable, "-m", "dreamblend.cli", "generate", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    code = "import dreamblend.pipelines, dreamblend.checkpoints, dreamblend.training"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
