"""The preview command writes both contact sheets."""

from __future__ import annotations

from PIL import Image

from dreamblend.toyworld import SUBJECTS
from dreamblend.toyworld.preview import main


def test_preview_writes_base_and_subject_sheets(tmp_path, capsys):
    main(["--out", str(tmp_path), "--zoom", "1"])
    assert capsys.readouterr().out.split() == [str(tmp_path / "base.png"), str(tmp_path / "subjects.png")]
    base, subjects = Image.open(tmp_path / "base.png"), Image.open(tmp_path / "subjects.png")
    assert base.width == 8 * (64 + 4) and subjects.width == 10 * (64 + 4)
    assert subjects.height > len(SUBJECTS) * 64
