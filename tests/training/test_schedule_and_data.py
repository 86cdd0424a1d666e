"""Checkpoint schedules, image folders and the step-indexed data order."""

from __future__ import annotations

import pytest

from dreamblend.training.data import image_at, list_images, prepare_image, sample_positions
from dreamblend.training.schedule import paper_schedule, parse_save_at


def test_paper_schedule_has_48_points():
    steps = paper_schedule()
    assert len(steps) == 48
    assert steps[:11] == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 75]
    assert steps[-1] == 1000 and all(b - a == 25 for a, b in zip(steps[10:], steps[11:], strict=False))
    assert paper_schedule(120) == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 75, 100]


def test_parse_save_at():
    assert parse_save_at("paper", 1000) == paper_schedule()
    assert parse_save_at("paper", 30) == [5, 10, 15, 20, 25, 30]
    assert parse_save_at("100, 5,10,10", 100) == [5, 10, 100]
    assert parse_save_at([3, 1], 3) == [1, 3]


@pytest.mark.parametrize(
    ("spec", "max_steps", "message"),
    [
        ("5,10,2000", 1000, "raise the number of training steps to at least 2000"),
        ("0,5", 10, "step 0 is the base model"),
        ("every-5", 10, "neither 'paper' nor a comma-separated list"),
        ("", 10, "lists no step"),
        ("paper", 4, "the paper schedule has no step within 4 training steps"),
    ],
)
def test_parse_save_at_errors(spec, max_steps, message):
    with pytest.raises(ValueError, match=message):
        parse_save_at(spec, max_steps)


def test_list_images_errors(tmp_path):
    with pytest.raises(ValueError, match="--instance-dir .* is not a folder"):
        list_images(tmp_path / "missing", flag="--instance-dir")
    with pytest.raises(ValueError, match="holds no images .*it is empty"):
        list_images(tmp_path, flag="--instance-dir")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="other file\\(s\\), e.g. 'notes.txt'"):
        list_images(tmp_path, flag="--instance-dir")


def test_prepare_image(dog_dir, tmp_path):
    image = prepare_image(sorted(dog_dir.iterdir())[0], 32)
    assert image.pixels.shape == (3, 32, 32)
    assert -1.0 <= image.pixels.min() < image.pixels.max() <= 1.0
    fake = tmp_path / "broken.jpg"
    fake.write_text("not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg is not a readable image"):
        prepare_image(fake, 32)


def test_sample_positions_split_steps_across_processes():
    assert list(sample_positions(1, 2)) == [0, 1]
    assert list(sample_positions(3, 2, rank=1, world=3)) == [14, 15]
    two_procs = [p for rank in (0, 1) for p in sample_positions(4, 3, rank=rank, world=2)]
    assert two_procs == list(sample_positions(4, 6))


def test_image_at_covers_each_epoch():
    n = 5
    drawn = [image_at(n, pos, seed=7) for pos in range(4 * n)]
    for epoch in range(4):
        assert sorted(drawn[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert drawn[:n] != drawn[n : 2 * n] or drawn[n : 2 * n] != drawn[2 * n : 3 * n]
    assert [image_at(n, pos, seed=8) for pos in range(n)] != drawn[:n]
