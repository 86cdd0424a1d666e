"""The README's main command: ``dreamblend demo`` runs the guided loop end to end and reports it."""

from __future__ import annotations

import json

import pytest

from dreamblend.cli import main


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
