"""Fixtures for the training tests: tiny saved base models and the shared DreamBooth images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from dreamblend.testing import save_tiny_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

DATA = Path(os.environ.get("DREAMBLEND_DATA", Path(__file__).resolve().parents[3] / "shared/data/dreambooth"))


@pytest.fixture(autouse=True)
def _fresh_accelerator():
    """Each run may pick its own mixed precision, which accelerate fixes once per process state."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def subject_dir(name: str) -> Path:
    folder = DATA / name
    if not folder.is_dir():
        pytest.skip(f"DreamBooth data not found at {folder} (set DREAMBLEND_DATA)")
    return folder


@pytest.fixture(scope="session")
def dog_dir() -> Path:
    return subject_dir("dog")


@pytest.fixture(scope="session")
def two_dogs(tmp_path_factory, dog_dir) -> Path:
    """Two of the dog images, linked (not copied) into a temporary folder: a set small enough to overfit."""
    folder = tmp_path_factory.mktemp("two_dogs")
    for image in sorted(dog_dir.iterdir())[:2]:
        (folder / image.name).symlink_to(image)
    return folder


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tiny_sd_pipeline(), tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tiny_sdxl_pipeline(), tmp_path_factory.mktemp("tiny_sdxl"))
