"""A miniature world in which DreamBlend's story can happen for real, without downloaded weights.

Procedural 64x64 photos of plain objects (six classes, eight colours) in eight settings, each with a
DreamBooth-style caption and exact ground truth; patterned subjects that the base world never draws,
photographed DreamBooth-style in one or two settings; a caption grammar that parses back to facts; and
a torch dataset for training a tiny text-to-image model on it. Contact sheets to inspect it:
``python -m dreamblend.toyworld.preview --out DIR``.
"""

from dreamblend.toyworld.backgrounds import render_background
from dreamblend.toyworld.dataset import ToyWorldDataset, to_tensor
from dreamblend.toyworld.scenes import (
    HELD_OUT_COMBINATIONS,
    RenderedImage,
    Sample,
    Scene,
    caption,
    held_out_combinations,
    make_sample,
    render,
    sample_pose,
    sample_scene,
)
from dreamblend.toyworld.shapes import COLOUR_RGB, PATTERNS, Pattern, nearest_colour
from dreamblend.toyworld.subjects import (
    SUBJECTS,
    Subject,
    class_prompt,
    evaluation_prompts,
    get_subject,
    instance_images,
    subject_set,
)
from dreamblend.toyworld.vocab import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    CLASSES,
    COLOURS,
    SUBJECT_TOKEN,
    VOCABULARY,
    CaptionFacts,
    compose_caption,
    parse_caption,
)

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_PHRASES",
    "CLASSES",
    "COLOURS",
    "COLOUR_RGB",
    "HELD_OUT_COMBINATIONS",
    "PATTERNS",
    "SUBJECTS",
    "SUBJECT_TOKEN",
    "VOCABULARY",
    "CaptionFacts",
    "Pattern",
    "RenderedImage",
    "Sample",
    "Scene",
    "Subject",
    "ToyWorldDataset",
    "caption",
    "class_prompt",
    "compose_caption",
    "evaluation_prompts",
    "get_subject",
    "held_out_combinations",
    "instance_images",
    "make_sample",
    "nearest_colour",
    "parse_caption",
    "render",
    "render_background",
    "sample_pose",
    "sample_scene",
    "subject_set",
    "to_tensor",
]
