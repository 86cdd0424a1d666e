"""Installed packages add metrics by entry point: the toy world's are known by name in a fresh process
(no import needed), and a broken plugin warns without hiding the built-in metrics."""

from __future__ import annotations

import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest

from dreamblend.metrics import registry


def test_toy_metrics_are_known_by_name_in_a_fresh_process():
    code = "from dreamblend.metrics import available_metrics; print(' '.join(available_metrics()))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    names = result.stdout.split()
    assert {"toy_subject", "toy_prompt", "toy_diversity", "dino", "clip_t"} <= set(names)


def test_a_broken_plugin_warns_and_the_rest_still_work(monkeypatch):
    def broken() -> None:
        raise ImportError("no module named 'missing_dependency'")

    entry = SimpleNamespace(name="broken", value="pkg.module:register", load=lambda: broken)
    monkeypatch.setattr(
        registry, "entry_points", lambda group: [entry] if group == registry.PLUGIN_GROUP else []
    )
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    with pytest.warns(RuntimeWarning, match="metric plugin 'broken' .*missing_dependency"):
        names = registry.available_metrics()
    assert "dino" in names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registry.available_metrics()  # plugins load once: no second warning
