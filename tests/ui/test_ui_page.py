"""The page's formatting helpers: errors and stops in the status line, scores, enlarged images."""

from __future__ import annotations

import numpy as np

from dreamblend.ui.app import display, error_status, score_table
from dreamblend.ui.session import BlendResult, Stopped
from dreamblend.ui.settings import SettingsError


def test_errors_and_stops_become_status_lines_with_markdown_escaped():
    text = error_status(SettingsError("G checkpoint '/runs/my_dog/checkpoint-7' does not exist"))
    assert text == r"**Error:** G checkpoint '/runs/my\_dog/checkpoint-7' does not exist"
    assert error_status(Stopped()).startswith("**Stopped.**")
    assert error_status(RuntimeError()) == "**Error:** RuntimeError"


def test_scores_table_and_its_absence():
    rows = ("G (guidance)", "E alone", "DreamBlend")
    scores = {"toy_subject": dict(zip(rows, (0.1, 0.25, float("nan")), strict=True))}
    table = score_table(BlendResult([], scores, "", "", 0.0))
    assert table.splitlines()[2] == r"| toy\_subject | 0.100 | 0.250 | n/a |"
    assert score_table(BlendResult([], {}, "no metrics configured", "", 0.0)) == "*no metrics configured*"


def test_small_images_are_enlarged_by_whole_pixels():
    image = np.arange(64 * 48 * 3, dtype=np.uint8).reshape(64, 48, 3)
    big = display(image)
    assert big.shape == (64 * 6, 48 * 6, 3)  # 6 = ceil(256 / 48)
    np.testing.assert_array_equal(big[::6, ::6], image)
    large = np.zeros((512, 512, 3), np.uint8)
    assert display(large) is large
