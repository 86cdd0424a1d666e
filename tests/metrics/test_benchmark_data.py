"""The packaged DreamBooth benchmark data agrees with the benchmark's own file; prompt helpers."""

from __future__ import annotations

import re

import pytest
from metric_helpers import DREAMBOOTH

from dreamblend.benchmark import (
    LIVE_PROMPTS,
    LIVE_SUBJECTS,
    OBJECT_PROMPTS,
    SUBJECT_CLASSES,
    benchmark_prompts,
    class_in_prompt,
    list_subjects,
    load_image,
    remove_token,
    subject_class,
    subject_photos,
)

needs_data = pytest.mark.skipif(not DREAMBOOTH.is_dir(), reason=f"benchmark data not at {DREAMBOOTH}")


@needs_data
def test_subjects_classes_and_prompts_match_the_benchmark_file():
    text = (DREAMBOOTH / "prompts_and_classes.txt").read_text()
    classes_part, prompts_part = text.split("Prompts", 1)
    table = dict(line.split(",", 1) for line in classes_part.splitlines()[3:] if "," in line)
    assert SUBJECT_CLASSES == table and len(table) == 30
    objects, live = prompts_part.split("Live Subject Prompts")
    template = lambda part: re.findall(r"'(a .*?)'\.format", part)
    assert list(OBJECT_PROMPTS) == template(objects) and len(OBJECT_PROMPTS) == 25
    assert list(LIVE_PROMPTS) == template(live) and len(LIVE_PROMPTS) == 25


def test_live_subjects_are_the_pets_and_get_the_live_prompts():
    assert sorted(LIVE_SUBJECTS) == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert len(SUBJECT_CLASSES) - len(LIVE_SUBJECTS) == 21
    dog = benchmark_prompts("dog2", token="zwx")
    assert dog[0] == "a zwx dog in the jungle" and "a zwx dog wearing a santa hat" in dog and len(dog) == 25
    plush = benchmark_prompts("bear_plushie")
    assert plush[10] == "a sks stuffed animal with a wheat field in the background"
    assert plush[-1] == "a cube shaped sks stuffed animal"
    with pytest.raises(ValueError, match="not a DreamBooth benchmark subject"):
        subject_class("dog4")


def test_rare_token_removal_keeps_every_other_word():
    assert remove_token("a sks dog on the beach", "sks") == "a dog on the beach"
    assert remove_token("a red sks dog, wet", "sks") == "a red dog, wet"
    assert remove_token("a photo of sks", "sks") == "a photo of"
    assert remove_token("a sksdog and asks", "sks") == "a sksdog and asks"  # only the whole word
    assert remove_token("a <new1> dog", "<new1>") == "a dog"
    assert remove_token("a sks dog", None) == "a sks dog"


def test_the_class_noun_follows_the_token():
    assert class_in_prompt("a sks dog wearing pink glasses", "sks") == "dog"
    assert class_in_prompt("a cube shaped sks stuffed animal", "sks") == "stuffed animal"
    assert class_in_prompt("a sks corgi, running", "sks", classes=["dog"]) == "corgi"
    with pytest.raises(ValueError, match="no class noun follows"):
        class_in_prompt("a photo of sks", "sks")


@needs_data
def test_subject_folders_load_as_rgb_photos(tmp_path):
    assert {"dog", "cat", "backpack"} <= set(list_subjects(DREAMBOOTH))
    photos = subject_photos(DREAMBOOTH, "dog")
    assert [p.name for p in photos] == sorted(p.name for p in photos) and photos[0].name == "00.jpg"
    assert load_image(photos[0]).mode == "RGB"
    with pytest.raises(ValueError, match="no folder for subject 'dog4'.*subjects there"):
        subject_photos(DREAMBOOTH, "dog4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        subject_photos(tmp_path, "empty")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="does not exist"):
        load_image(tmp_path / "missing.png")
