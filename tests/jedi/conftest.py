"""Fixtures for the JeDi tests: a tiny saved SD model, image sets in both formats, a trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from jedi_helpers import CAPTIONS, random_images

from dreamblend.jedi.data import write_stacked_set
from dreamblend.testing import save_tiny_pipeline, tiny_sd_pipeline


@pytest.fixture(autouse=True)
def _fresh_accelerator():
    """Each run may pick its own mixed precision, which accelerate fixes once per process state."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tiny_sd_pipeline(), tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def stacked_dir(tmp_path_factory) -> Path:
    """Three sets of three in the supplement's format."""
    folder = tmp_path_factory.mktemp("stacked")
    for k in range(3):
        write_stacked_set(folder / f"set{k}.png", random_images(3, k), CAPTIONS[:3])
    return folder


@pytest.fixture(scope="session")
def folder_dir(tmp_path_factory) -> Path:
    """Two sets as folders (one image per file, one caption file per image), of three and four images."""
    root = tmp_path_factory.mktemp("folders")
    for k, n in enumerate((3, 4)):
        folder = root / f"subject{k}"
        folder.mkdir()
        for i, image in enumerate(random_images(n, 10 + k, size=40)):  # not square: centre-cropped
            image.crop((0, 0, 40, 36)).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(CAPTIONS[i] + "\n")
    return root


@pytest.fixture(scope="session")
def full_checkpoint(tmp_path_factory, sd_dir: Path, stacked_dir: Path) -> Path:
    from dreamblend.jedi.train import JeDiConfig, train_jedi

    out = tmp_path_factory.mktemp("jedi_full")
    train_jedi(
        JeDiConfig(
            pretrained_model=str(sd_dir),
            instance_dir=stacked_dir,
            output_dir=out,
            max_steps=2,
            batch_size=2,
            learning_rate=1e-3,
            mixed_precision="no",
            progress=False,
        )
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    return out / "checkpoint-2"
