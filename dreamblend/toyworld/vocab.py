"""The toy world's names and its caption grammar.

One fixed grammar keeps captions learnable by a tiny text encoder and lets the prompt-fidelity metric
read a prompt back into (class, colour, background, is_subject) without any language model:

    [a photo of] [a|an] [colour] [sks] class [background phrase]

Every background has exactly one phrase, so a phrase names its background unambiguously.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_PHRASES",
    "CLASSES",
    "COLOURS",
    "SUBJECT_TOKEN",
    "VOCABULARY",
    "CaptionFacts",
    "compose_caption",
    "parse_caption",
]

CLASSES: tuple[str, ...] = ("cube", "ball", "cone", "ring", "cylinder", "star")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
BACKGROUNDS: tuple[str, ...] = ("grass", "beach", "snow", "water", "brick", "night", "wood", "street")
BACKGROUND_PHRASES: dict[str, str] = {
    "grass": "on the grass",
    "beach": "on the beach",
    "snow": "in the snow",
    "water": "on the water",
    "brick": "in front of a brick wall",
    "night": "under the night sky",
    "wood": "on a wooden floor",
    "street": "on a cobblestone street",
}
# The rare word DreamBooth binds to a subject; the base world's captions never use it.
SUBJECT_TOKEN = "sks"

_PHOTO = ("a", "photo", "of")
_ARTICLES = ("a", "an")
_PHRASE_TO_BACKGROUND = {phrase: name for name, phrase in BACKGROUND_PHRASES.items()}

# Every word a caption can contain. `dreamblend.testing.write_tiny_tokenizer_files(path, VOCABULARY)`
# writes a CLIP BPE tokenizer in which each, the rare subject token included, is one whole-word token.
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            *_PHOTO,
            *_ARTICLES,
            SUBJECT_TOKEN,
            *COLOURS,
            *CLASSES,
            *(word for phrase in BACKGROUND_PHRASES.values() for word in phrase.split()),
        ]
    )
)


@dataclass(frozen=True)
class CaptionFacts:
    """What a caption asserts: what to check an image against."""

    cls: str
    colour: str | None = None
    background: str | None = None
    is_subject: bool = False

    def __post_init__(self) -> None:
        if self.cls not in CLASSES:
            raise ValueError(f"unknown class {self.cls!r}; known: {CLASSES}")
        if self.colour is not None and self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; known: {COLOURS}")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; known: {BACKGROUNDS}")


def compose_caption(facts: CaptionFacts, *, photo: bool = True) -> str:
    """Caption `facts` in the grammar; `photo` adds DreamBooth's "a photo of" prefix.

    A subject without a colour after the prefix reads like DreamBooth's instance prompt ("a photo of sks
    cube"); every other noun phrase takes an article agreeing with its first word ("an orange cube").
    """
    noun = [
        *([facts.colour] if facts.colour is not None else []),
        *([SUBJECT_TOKEN] if facts.is_subject else []),
        facts.cls,
    ]
    if not (photo and facts.is_subject and facts.colour is None):
        noun.insert(0, "an" if noun[0][0] in "aeiou" else "a")
    words = [*(_PHOTO if photo else ()), *noun]
    if facts.background is not None:
        words.append(BACKGROUND_PHRASES[facts.background])
    return " ".join(words)


def parse_caption(text: str) -> CaptionFacts:
    """Read a caption of the grammar back into its facts; raise ValueError on anything else.

    Case, surrounding whitespace and a final period are ignored, and an article is optional wherever
    one may stand, so hand-written prompts in the same grammar parse too.
    """
    words = text.strip().lower().removesuffix(".").split()
    pos = 3 if tuple(words[:3]) == _PHOTO else 0

    def take(options: tuple[str, ...]) -> str | None:
        nonlocal pos
        if pos < len(words) and words[pos] in options:
            pos += 1
            return words[pos - 1]
        return None

    take(_ARTICLES)
    colour = take(COLOURS)
    is_subject = take((SUBJECT_TOKEN,)) is not None
    cls = take(CLASSES)
    if cls is None:
        raise ValueError(f"caption {text!r} names no class of {CLASSES} where the grammar expects one")
    rest = " ".join(words[pos:])
    if rest and rest not in _PHRASE_TO_BACKGROUND:
        raise ValueError(f"caption {text!r} ends in {rest!r}, not one of the background phrases")
    return CaptionFacts(cls, colour, _PHRASE_TO_BACKGROUND.get(rest), is_subject)
