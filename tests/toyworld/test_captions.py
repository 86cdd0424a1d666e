"""The caption grammar parses back to its facts, and every caption word is one tokenizer token."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dreamblend.toyworld import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    CLASSES,
    COLOURS,
    SUBJECT_TOKEN,
    SUBJECTS,
    VOCABULARY,
    CaptionFacts,
    ToyWorldDataset,
    caption,
    class_prompt,
    compose_caption,
    evaluation_prompts,
    instance_images,
    parse_caption,
    sample_scene,
    subject_set,
)

ALL_FACTS = [
    CaptionFacts(cls, colour, background, is_subject)
    for cls, colour, background, is_subject in itertools.product(
        CLASSES, (None, *COLOURS), (None, *BACKGROUNDS), (False, True)
    )
]
ALL_CAPTIONS = [compose_caption(facts, photo=photo) for facts in ALL_FACTS for photo in (False, True)]


def test_every_composed_caption_parses_back_to_its_facts():
    for facts in ALL_FACTS:
        for photo in (False, True):
            assert parse_caption(compose_caption(facts, photo=photo)) == facts
    assert len(set(ALL_CAPTIONS)) == len(ALL_CAPTIONS), "two fact sets share a caption"


@pytest.mark.parametrize(
    ("text", "facts"),
    [
        ("a photo of a red cube on the grass", CaptionFacts("cube", "red", "grass")),
        ("an orange ball in the snow", CaptionFacts("ball", "orange", "snow")),
        ("a photo of sks cube", CaptionFacts("cube", is_subject=True)),
        ("a sks ring on a cobblestone street", CaptionFacts("ring", None, "street", True)),
        ("A photo of a sks star under the night sky.", CaptionFacts("star", None, "night", True)),
        ("a purple sks cone in front of a brick wall", CaptionFacts("cone", "purple", "brick", True)),
        ("  a photo of a cylinder  ", CaptionFacts("cylinder")),
        ("white ball on a wooden floor", CaptionFacts("ball", "white", "wood")),
    ],
)
def test_hand_written_prompts_in_the_grammar_parse(text, facts):
    assert parse_caption(text) == facts


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a photo of",
        "a red dog on the grass",
        "a red cube on the moon",
        "a cube red",
        "sks",
        "a red cube sks",
    ],
)
def test_text_outside_the_grammar_is_refused(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_article_agrees_and_dreambooth_prompts_read_as_in_dreambooth():
    orange = CaptionFacts("cube", "orange", "beach")
    assert compose_caption(orange) == "a photo of an orange cube on the beach"
    assert compose_caption(CaptionFacts("cube", "red"), photo=False) == "a red cube"
    assert compose_caption(CaptionFacts("cube", is_subject=True)) == "a photo of sks cube"
    assert compose_caption(CaptionFacts("cube", None, "snow", True), photo=False) == "a sks cube in the snow"
    assert class_prompt("ball") == "a photo of a ball"


def test_caption_of_a_scene_states_its_ground_truth():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng)
        assert parse_caption(caption(scene, rng)) == CaptionFacts(scene.cls, scene.colour, scene.background)


def _every_caption_the_world_writes() -> list[str]:
    dataset = ToyWorldDataset(seed=0, length=100)
    written = [dataset.sample(i).caption for i in range(len(dataset))]
    for subject in SUBJECTS:
        written += [s.caption for s in instance_images(subject, 2) + subject_set(subject, 4)]
        written += [*evaluation_prompts(subject), subject.instance_prompt, class_prompt(subject.cls)]
    return written + ALL_CAPTIONS


def test_vocabulary_is_exactly_the_words_captions_use():
    used = {word for text in _every_caption_the_world_writes() for word in text.split()}
    assert used == set(VOCABULARY)
    assert len(VOCABULARY) == len(set(VOCABULARY))
    assert SUBJECT_TOKEN in VOCABULARY
    assert all(BACKGROUND_PHRASES[b].split()[-1] in VOCABULARY for b in BACKGROUNDS)


def test_every_vocabulary_word_is_one_clip_token(tmp_path):
    from transformers import CLIPTokenizer

    from dreamblend.testing import write_tiny_tokenizer_files

    write_tiny_tokenizer_files(tmp_path, VOCABULARY)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    for word in VOCABULARY:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    expected = ["a</w>", "photo</w>", "of</w>", "sks</w>", "cube</w>"]
    assert tokenizer.tokenize("a photo of sks cube") == expected
    for text in _every_caption_the_world_writes()[::7]:
        ids = tokenizer(text).input_ids
        assert len(ids) == len(text.split()) + 2 and tokenizer.unk_token_id not in ids[1:-1], text
