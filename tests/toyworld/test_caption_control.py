"""The shipped base model follows its captions: the world's metrics read the class, colour and setting
of its generations far above chance, on (class, colour, setting) triples training never showed."""

from __future__ import annotations

from dreamblend.analysis.maps import load_plain_pipeline
from dreamblend.toyworld.caption_control import CHANCE, FACTS, held_out_captions, measure, random_captions
from dreamblend.toyworld.model import base_model_path
from dreamblend.toyworld.scenes import held_out_combinations
from dreamblend.toyworld.vocab import parse_caption


def test_caption_sets():
    held_out = {(f.cls, f.colour, f.background) for f in map(parse_caption, held_out_captions())}
    assert held_out == held_out_combinations()
    drawn = [parse_caption(c) for c in random_captions(64)]
    assert not {(f.cls, f.colour, f.background) for f in drawn} & held_out
    assert random_captions(8, seed=1) == random_captions(8, seed=1) != random_captions(8, seed=2)


def test_shipped_model_follows_held_out_captions():
    pipe = load_plain_pipeline(base_model_path())
    result = measure(pipe, captions=0, seeds=2, steps=20)
    held_out = result["held_out"]
    assert held_out["images"] == 16
    # 16 images: at chance (1/6 or 1/8) even 6 right has probability < 0.03 (binomial tail); the
    # bar is 3x chance for every fact.
    for fact in FACTS:
        assert held_out[fact] >= 3 * CHANCE[fact], (fact, held_out)
