"""The README's main command: ``dreamblend demo`` runs the guided loop end to end and reports it."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from dreamblend.cli import build_parser, main


def test_demo_runs_the_guided_loop_and_writes_its_report(tmp_path, capsys):
    assert main(["demo", "--steps", "3", "--out", str(tmp_path), "--backend", "torch"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["finite"] and report["steps"] == 3 and report["op_backend"] == "torch"
    assert report["latent_l1_dreamblend_to_edit_alone"] > 0  # guidance changed E's result
    for name in ("dreamblend", "guidance", "edit"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert "DreamBlend demo" in capsys.readouterr().out


def test_demo_rejects_zero_steps(tmp_path):
    with pytest.raises(SystemExit, match="--steps must be at least 1"):
        main(["demo", "--steps", "0", "--out", str(tmp_path)])


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
