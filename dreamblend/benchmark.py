"""The DreamBooth benchmark (Ruiz et al. 2023) as data: 30 subjects, their classes and the two prompt lists.

Evaluations in the DreamBlend paper (and most personalization papers) use this benchmark, so the eval
command must generate and score exactly its prompts. The subject photos are not part of the package:
they are read from a folder the user gives, laid out as ``<root>/<subject>/NN.jpg``.

Prompts follow the benchmark's convention: the 9 live subjects (the cats and dogs) use the live-subject
list (accessories and outfits), the 21 objects the object list; both have 25 prompts whose ``{0}`` is
the rare token and ``{1}`` the class noun.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from dreamblend.training.data import list_images

SUBJECT_CLASSES: dict[str, str] = {
    "backpack": "backpack",
    "backpack_dog": "backpack",
    "bear_plushie": "stuffed animal",
    "berry_bowl": "bowl",
    "can": "can",
    "candle": "candle",
    "cat": "cat",
    "cat2": "cat",
    "clock": "clock",
    "colorful_sneaker": "sneaker",
    "dog": "dog",
    "dog2": "dog",
    "dog3": "dog",
    "dog5": "dog",
    "dog6": "dog",
    "dog7": "dog",
    "dog8": "dog",
    "duck_toy": "toy",
    "fancy_boot": "boot",
    "grey_sloth_plushie": "stuffed animal",
    "monster_toy": "toy",
    "pink_sunglasses": "glasses",
    "poop_emoji": "toy",
    "rc_car": "toy",
    "red_cartoon": "cartoon",
    "robot_toy": "toy",
    "shiny_sneaker": "sneaker",
    "teapot": "teapot",
    "vase": "vase",
    "wolf_plushie": "stuffed animal",
}
"""Subject folder name -> class noun, as in the benchmark's ``prompts_and_classes.txt``."""

LIVE_SUBJECTS: frozenset[str] = frozenset(s for s, c in SUBJECT_CLASSES.items() if c in ("cat", "dog"))
"""The live subjects (pets); every other subject is an object."""

_SHARED_PROMPTS = (
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
)
_SHARED_ATTRIBUTES = (
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
)

OBJECT_PROMPTS: tuple[str, ...] = (
    *_SHARED_PROMPTS,
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
    *_SHARED_ATTRIBUTES,
)
"""The 25 object prompt templates, in the benchmark's order."""

LIVE_PROMPTS: tuple[str, ...] = (
    *_SHARED_PROMPTS,
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
    *_SHARED_ATTRIBUTES,
)
"""The 25 live-subject prompt templates, in the benchmark's order."""


def subject_class(subject: str) -> str:
    """The class noun of a benchmark subject ("bear_plushie" -> "stuffed animal")."""
    try:
        return SUBJECT_CLASSES[subject]
    except KeyError:
        raise ValueError(
            f"{subject!r} is not a DreamBooth benchmark subject; choose one of {sorted(SUBJECT_CLASSES)}"
        ) from None


def benchmark_prompts(subject: str, token: str = "sks") -> list[str]:
    """The subject's 25 prompts with the rare token and class filled in ("a sks dog in the jungle")."""
    templates = LIVE_PROMPTS if subject in LIVE_SUBJECTS else OBJECT_PROMPTS
    noun = subject_class(subject)
    return [template.format(token, noun) for template in templates]


# ---------------------------------------------------------------------------------------------- prompts


def _token_pattern(token: str) -> re.Pattern[str]:
    """``token`` as a whole word: not part of a longer word, punctuation after it allowed."""
    return re.compile(rf"(?<!\S){re.escape(token)}(?=[\s,.;:!?]|$)")


def remove_token(prompt: str, token: str | None) -> str:
    """The prompt without the rare token, as CLIP-T's text ("a sks dog" -> "a dog")."""
    if not token:
        return prompt
    return " ".join(_token_pattern(token).sub("", prompt).split())


def class_in_prompt(prompt: str, token: str | None, classes: Iterable[str] = SUBJECT_CLASSES.values()) -> str:
    """The subject's class noun in ``prompt``: the words right after the rare token.

    The longest of ``classes`` that follows the token wins ("a sks stuffed animal" -> "stuffed animal");
    otherwise the single word after the token. Raises ValueError when the prompt lacks the token.
    """
    match = _token_pattern(token).search(prompt) if token else None
    if match is None:
        raise ValueError(
            f"cannot tell the subject's class in prompt {prompt!r}: it lacks the rare token {token!r} "
            "that precedes the class noun; pass the token the prompts use (--token)"
        )
    words = prompt[match.end() :].lower().split()
    if not words:
        raise ValueError(f"prompt {prompt!r} ends with the rare token {token!r}; no class noun follows it")
    known = sorted({c.lower() for c in classes}, key=len, reverse=True)
    rest = " ".join(words)
    return next((c for c in known if rest == c or rest.startswith(c + " ")), words[0].strip(",.;:!?"))


# ---------------------------------------------------------------------------------------------- images


def load_image(path: Path) -> Image.Image:
    """An image file as RGB (EXIF rotation applied); unreadable files name themselves and the fix."""
    try:
        with Image.open(path) as raw:
            return ImageOps.exif_transpose(raw).convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path} is not a readable image ({exc}); replace or remove it") from None


def list_subjects(root: str | Path) -> list[str]:
    """Subject folders under a benchmark root (``<root>/<subject>/NN.jpg``), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"benchmark root {root} does not exist; give the folder that holds subject folders")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def subject_photos(root: str | Path, subject: str) -> list[Path]:
    """The photos of one subject under a benchmark root, sorted by name."""
    folder = Path(root) / subject
    if not folder.is_dir():
        raise ValueError(
            f"no folder for subject {subject!r} under {root} (subjects there: {list_subjects(root)}); "
            "check the subject name or the references folder"
        )
    return list_images(folder, flag="--references")
