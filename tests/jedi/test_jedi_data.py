"""Image-set files: the supplement's stacked format and folders, with clear errors for malformed sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from jedi_helpers import CAPTIONS, random_images
from PIL import Image

from dreamblend.jedi.data import (
    SPLIT_TOKEN,
    find_image_sets,
    split_captions,
    split_stacked,
    stack_images,
    write_stacked_set,
)
from dreamblend.training.errors import TrainingInputError


def test_stack_and_split_round_trip(tmp_path: Path) -> None:
    images = random_images(4, 0)
    write_stacked_set(tmp_path / "a.png", images, CAPTIONS)
    stacked = Image.open(tmp_path / "a.png")
    assert stacked.size == (32, 128)  # set size = height // width
    for got, want in zip(split_stacked(stacked), images, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    text = (tmp_path / "a.txt").read_text()
    assert text.count(SPLIT_TOKEN) == 3
    (entry,) = find_image_sets(tmp_path)
    assert entry.stacked and entry.size == 4 and entry.captions == CAPTIONS


def test_folders_and_stacked_files_mix(tmp_path: Path) -> None:
    write_stacked_set(tmp_path / "b.png", random_images(2, 1), CAPTIONS[:2])
    folder = tmp_path / "a_set"
    folder.mkdir()
    for i, image in enumerate(random_images(3, 2)):
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f" caption {i} \n")
    sets = find_image_sets(tmp_path)
    assert [s.path.name for s in sets] == ["a_set", "b.png"]
    assert sets[0].size == 3 and sets[0].captions == ("caption 0", "caption 1", "caption 2")
    assert len(sets[0].images()) == 3 and not sets[0].stacked


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(TrainingInputError, match="not a folder"):
        find_image_sets(tmp_path / "missing")
    with pytest.raises(TrainingInputError, match="holds no image sets"):
        find_image_sets(tmp_path)
    Image.new("RGB", (32, 80)).save(tmp_path / "odd.png")
    (tmp_path / "odd.txt").write_text("a")
    with pytest.raises(TrainingInputError, match="whole multiple of its width"):
        find_image_sets(tmp_path)
    (tmp_path / "odd.png").unlink()
    stack_images(random_images(2, 0)).save(tmp_path / "two.png")
    with pytest.raises(TrainingInputError, match="no caption file two.txt"):
        find_image_sets(tmp_path)
    (tmp_path / "two.txt").write_text(f"one{SPLIT_TOKEN}two{SPLIT_TOKEN}three")
    with pytest.raises(TrainingInputError, match="3 caption"):
        find_image_sets(tmp_path)
    with pytest.raises(TrainingInputError, match="one caption per image"):
        split_captions("only one", 2)
    with pytest.raises(ValueError, match="square images of one size"):
        stack_images([Image.new("RGB", (8, 8)), Image.new("RGB", (8, 9))])
