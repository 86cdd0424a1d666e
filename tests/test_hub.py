"""A hub id that cannot be loaded gives one line naming the cause and the fix, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from huggingface_hub import errors as hub

from dreamblend.hub import ModelUnavailableError, describe, hub_errors


def _diffusers_error(cause: BaseException) -> OSError:
    """diffusers' wrapping: a generic OSError whose context is the hub's error."""
    try:
        try:
            raise cause
        except BaseException as inner:
            raise OSError("org/model does not appear to have a file named model_index.json.") from inner
    except OSError as outer:
        return outer


def _bare(kind: type[BaseException]) -> BaseException:
    return kind.__new__(kind)  # the hub's HTTP errors need a response to construct; only the type matters


@pytest.mark.parametrize(
    ("cause", "expected"),
    [
        (_bare(hub.GatedRepoError), "gated"),
        (_bare(hub.RepositoryNotFoundError), "no such repository"),
        (hub.LocalEntryNotFoundError("not cached"), "cannot be reached"),
        (hub.OfflineModeIsEnabled("offline"), "HF_HUB_OFFLINE"),
    ],
)
def test_the_cause_is_named(cause, expected, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    text = describe("org/model", _diffusers_error(cause))
    assert expected in text and "\n" not in text
    assert text.startswith("cannot load 'org/model' from the Hugging Face Hub: ")


def test_only_hub_ids_are_rewritten(tmp_path):
    with pytest.raises(ModelUnavailableError, match="cannot be reached"):
        with hub_errors("org/model"):
            raise _diffusers_error(hub.LocalEntryNotFoundError("not cached"))
    # A local folder's own error names the broken file: it passes through untouched.
    with pytest.raises(OSError, match="broken.json") as info:
        with hub_errors(tmp_path):
            raise OSError("broken.json is not valid")
    assert not isinstance(info.value, ModelUnavailableError)


def test_generate_offline_prints_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dreamblend.cli",
            "generate",
            "a dog",
            "--model",
            "org/model",
            "--edit-model",  # a run names G or E (the base alone is refused before any loading)
            "org/model-late",
            "--out",
            str(tmp_path / "x.png"),
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "dreamblend generate: error: cannot load 'org/model' from the Hugging Face Hub: offline mode "
        "(HF_HUB_OFFLINE) and it is not in the local cache: pass a local diffusers folder instead, or "
        "download it once online (`hf download org/model`)"
    ]
