"""The toy world's evaluation metrics: its own DINO / CLIP-I, CLIP-T and diversity, from one small CNN.

CLIP and DINO know nothing of sks-patterned cubes, so the toy world measures itself with a "world
encoder" trained on its renders (``python -m dreamblend.toyworld.train_metrics``; weights ship in
``weights/metrics``). It reads an image into scene features ``h`` (what is in it, and where) and a unit
object embedding ``z``; scene heads name the class, colour and background that ``toy_prompt`` checks,
and heads on ``z`` name the object's class, colour, pattern and identity (plain, each subject, another
pattern), so that ``z`` tells a subject from a plain object of its class and colour.

- ``toy_subject`` (subject, like DINO / CLIP-I): mean cosine of the image's ``z`` with the references'.
  ``z`` describes the object, so unlike DINO it barely rewards copying the reference photos' setting
  (a subject scores about 0.015 more in its home setting than elsewhere, a plain look-alike 0.55 less).
- ``toy_prompt`` (prompt, like CLIP-T): mean probability of the facts the prompt states, read with
  ``parse_caption``: the class, the colour where named, the background where named.
- ``toy_class`` / ``toy_colour`` / ``toy_background``: whether the most likely class, colour,
  background is the named one (1 or 0; NaN where the prompt names none).
- ``toy_diversity``: mean ``1 - cos`` of the scene features to the other images of the same prompt.

``import dreamblend.toyworld.metrics`` registers them; ``models={"toy_world": folder}`` picks other
weights than the shipped ones.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from dreamblend.metrics.base import Metric, Role
from dreamblend.metrics.encoders import ContentCache, image_key
from dreamblend.metrics.registry import MetricContext, register_metric
from dreamblend.metrics.similarity import cosine_matrix, mean_pairwise_distance
from dreamblend.toyworld.shapes import PATTERNS
from dreamblend.toyworld.subjects import SUBJECTS
from dreamblend.toyworld.vocab import BACKGROUNDS, CLASSES, COLOURS, CaptionFacts, parse_caption

__all__ = [
    "DEFAULT_WEIGHTS",
    "IMAGE_SIZE",
    "LABELS",
    "MODEL_KEY",
    "OBJECT_HEADS",
    "SCENE_HEADS",
    "TOY_METRICS",
    "ToyBackgroundAccuracy",
    "ToyClassAccuracy",
    "ToyColourAccuracy",
    "ToyDiversity",
    "ToyPromptFidelity",
    "ToySubjectSimilarity",
    "WorldEncoder",
    "WorldModel",
    "WorldReadings",
    "register_toy_metrics",
]

IMAGE_SIZE = 64
MODEL_KEY = "toy_world"
"""The key of ``MetricContext.models`` (``dreamblend eval --model toy_world=FOLDER``) for other weights."""
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "metrics"

PLAIN, OTHER_PATTERN = "plain", "other"
LABELS: dict[str, tuple[str, ...]] = {
    "class": CLASSES,
    "colour": COLOURS,
    "background": BACKGROUNDS,
    "pattern": ("none", *PATTERNS),
    "pattern_colour": ("none", *COLOURS),
    "identity": (PLAIN, *(s.name for s in SUBJECTS), OTHER_PATTERN),
}
"""Every classification head's label names, in logit order."""
SCENE_HEADS = ("class", "colour", "background")
"""Heads that read the scene features: what ``toy_prompt`` checks a prompt's facts with."""
OBJECT_HEADS = ("class", "colour", "pattern", "pattern_colour", "identity")
"""Heads that read the object embedding, so that it holds what tells one object from another."""


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class WorldEncoder(nn.Module):
    """A ~400 K-parameter CNN from a 64x64 RGB image in [0, 1] to scene features, object embedding, heads.

    The last feature map is read twice: pooled (mean and max over positions) into ``appearance``, what
    is in the picture wherever it stands, and flattened through a narrow 1x1 convolution into
    ``placement``, where things are. Class and colour heads, and the object embedding ``z``, read
    appearance only, so one set of weights serves every position; background and layout read both.
    Object heads are cosine classifiers on the unit ``z`` (a fixed scale times the cosine with each
    label's weight): every label is a direction of ``z``, so the cosine of two embeddings compares the
    objects' labels. The scene features ``h`` are appearance and placement together.
    """

    def __init__(
        self, appearance_dim: int = 128, placement_dim: int = 64, embed_dim: int = 64, scale: float = 12.0
    ) -> None:
        super().__init__()
        self.appearance_dim, self.placement_dim = appearance_dim, placement_dim
        self.embed_dim, self.scale = embed_dim, scale
        # 64 -> 32 -> 16 -> 8 -> 4. One convolution at full resolution: the few pixels of a straight or
        # curved edge tell a dark cube from a dark cylinder.
        self.trunk = nn.Sequential(
            _block(3, 16, 1),
            _block(16, 32, 2),
            _block(32, 48, 2),
            _block(48, 48, 1),
            _block(48, 96, 2),
            _block(96, 96, 1),
            _block(96, 128, 2),
        )
        self.appearance = nn.Linear(2 * 128, appearance_dim)
        self.narrow = nn.Conv2d(128, 32, 1)
        self.placement = nn.Linear(32 * 4 * 4, placement_dim)
        feature_dim = appearance_dim + placement_dim
        self.scene_heads = nn.ModuleDict(
            {
                "class": nn.Linear(appearance_dim, len(LABELS["class"])),
                "colour": nn.Linear(appearance_dim, len(LABELS["colour"])),
                "background": nn.Linear(feature_dim, len(LABELS["background"])),
            }
        )
        self.layout = nn.Linear(feature_dim, 3)
        self.project = nn.Linear(appearance_dim, embed_dim)
        self.object_heads = nn.ParameterDict(
            {h: nn.Parameter(torch.randn(len(LABELS[h]), embed_dim) * 0.1) for h in OBJECT_HEADS}
        )

    def config(self) -> dict[str, Any]:
        """What rebuilds this architecture, with the label names the weights were trained for."""
        return {
            "appearance_dim": self.appearance_dim,
            "placement_dim": self.placement_dim,
            "embed_dim": self.embed_dim,
            "scale": self.scale,
            "image_size": IMAGE_SIZE,
            "labels": {k: list(v) for k, v in LABELS.items()},
        }

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        """``features`` (h), ``embedding`` (unit z), ``layout`` (x, y, size; standardized) and the
        logits of ``scene`` and ``object`` heads (dicts by head name)."""
        maps = self.trunk(images * 2 - 1)
        appearance = self.appearance(torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1))
        features = torch.cat([appearance, self.placement(self.narrow(maps).flatten(1))], dim=1)
        embedding = F.normalize(self.project(appearance), dim=1)
        scene = {head: layer(appearance) for head, layer in self.scene_heads.items() if head != "background"}
        return {
            "features": features,
            "embedding": embedding,
            "layout": self.layout(features),
            "scene": {**scene, "background": self.scene_heads["background"](features)},
            "object": {
                head: self.scale * embedding @ F.normalize(weight, dim=1).T
                for head, weight in self.object_heads.items()
            },
        }

    def save(self, folder: Path) -> None:
        """``model.safetensors`` and ``config.json`` in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(self.config(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> WorldEncoder:
        """The encoder saved in ``folder``, in eval mode; refuses weights trained for other labels."""
        folder = Path(folder)
        if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder} holds no world encoder (model.safetensors, config.json); train one with "
                "python -m dreamblend.toyworld.train_metrics --out FOLDER"
            )
        config = json.loads((folder / "config.json").read_text())
        labels = {k: tuple(v) for k, v in config["labels"].items()}
        if labels != LABELS or config["image_size"] != IMAGE_SIZE:
            raise ValueError(
                f"the world encoder in {folder} was trained for other labels than today's toy world; "
                "retrain it with python -m dreamblend.toyworld.train_metrics --out FOLDER"
            )
        encoder = cls(config["appearance_dim"], config["placement_dim"], config["embed_dim"], config["scale"])
        encoder.load_state_dict(load_file(str(folder / "model.safetensors")))
        return encoder.eval()


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB float tensor ``(N, 3, 64, 64)`` in [0, 1]; other sizes are resampled to 64x64."""
    arrays = []
    for image in images:
        rgb = image.convert("RGB")
        if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
            rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
        arrays.append(np.asarray(rgb))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)


@dataclass(frozen=True)
class WorldReadings:
    """What the encoder reads in N images: scene features, object embeddings, scene head probabilities."""

    features: np.ndarray
    embeddings: np.ndarray
    probabilities: dict[str, np.ndarray]

    def probability(self, head: str, values: Sequence[str]) -> np.ndarray:
        """Per image, the probability its ``head`` gives to ``values[i]``."""
        index = [LABELS[head].index(v) for v in values]
        return self.probabilities[head][np.arange(len(index)), index]

    def predicted(self, head: str) -> list[str]:
        """Per image, the most likely label of ``head``."""
        return [LABELS[head][i] for i in self.probabilities[head].argmax(axis=1)]


class WorldModel:
    """A loaded world encoder for scoring: batched on a device, each distinct image read once."""

    def __init__(
        self, encoder: WorldEncoder, device: str | torch.device = "cpu", batch_size: int = 64
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.encoder = encoder.eval().to(self.device)
        self.batch_size = batch_size
        self._cache = ContentCache()

    @classmethod
    def from_folder(
        cls, folder: str | Path = DEFAULT_WEIGHTS, device: str | torch.device = "cpu", batch_size: int = 64
    ) -> WorldModel:
        return cls(WorldEncoder.load(folder), device, batch_size)

    def read(self, images: Sequence[Image.Image]) -> WorldReadings:
        """The encoder's readings of ``images`` (converted to RGB, resampled to 64x64), in float64.

        Head probabilities average each image and its mirror image, which shows the same facts: where
        a view is ambiguous, the two readings disagree and the average says so.
        """
        rgb = [image.convert("RGB") for image in images]
        rows = self._cache.get([image_key(im) for im in rgb], rgb, self._read_uncached)
        return WorldReadings(
            np.stack([r["features"] for r in rows]),
            np.stack([r["embedding"] for r in rows]),
            {head: np.stack([r[head] for r in rows]) for head in SCENE_HEADS},
        )

    @torch.no_grad()
    def _read_uncached(self, images: list[Image.Image]) -> list[dict[str, np.ndarray]]:
        rows: list[dict[str, np.ndarray]] = []
        for start in range(0, len(images), self.batch_size):
            batch = images_to_tensor(images[start : start + self.batch_size]).to(self.device)
            out = self.encoder(batch)
            mirrored = self.encoder(batch.flip(-1))["scene"]
            arrays = {
                "features": out["features"],
                "embedding": out["embedding"],
                **{
                    head: (logits.softmax(dim=1) + mirrored[head].softmax(dim=1)) / 2
                    for head, logits in out["scene"].items()
                },
            }
            numpy = {k: v.double().cpu().numpy() for k, v in arrays.items()}
            rows.extend({k: v[i] for k, v in numpy.items()} for i in range(len(batch)))
        return rows


class _WorldMetric(Metric):
    """A metric computed from the world encoder's readings."""

    def __init__(self, model: WorldModel) -> None:
        self.model = model

    def compute(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image]
    ) -> np.ndarray:
        return self._score(self.model.read(images), prompts, references)

    @abstractmethod
    def _score(
        self, readings: WorldReadings, prompts: Sequence[str], references: Sequence[Image.Image]
    ) -> np.ndarray:
        """Scores from the images' readings (the references are read by metrics that need them)."""


class ToySubjectSimilarity(_WorldMetric):
    """Subject fidelity: mean cosine of the image's object embedding with each reference image's."""

    name = "toy_subject"
    role: ClassVar[Role] = "subject"
    needs_references: ClassVar[bool] = True

    def _score(
        self, readings: WorldReadings, prompts: Sequence[str], references: Sequence[Image.Image]
    ) -> np.ndarray:
        return cosine_matrix(readings.embeddings, self.model.read(references).embeddings).mean(axis=1)


def _facts(prompts: Sequence[str]) -> list[CaptionFacts]:
    return [parse_caption(prompt) for prompt in prompts]


class ToyPromptFidelity(_WorldMetric):
    """Prompt fidelity: mean probability of the stated class, colour (if named) and background (if named).

    With confident heads this is the fraction of the prompt's facts the image shows; the probabilities
    make it graded where the image is ambiguous. A subject prompt ("a sks cube in the snow") names no
    colour, so its class and background count.
    """

    name = "toy_prompt"
    role: ClassVar[Role] = "prompt"

    def _score(
        self, readings: WorldReadings, prompts: Sequence[str], references: Sequence[Image.Image]
    ) -> np.ndarray:
        facts = _facts(prompts)
        total = readings.probability("class", [f.cls for f in facts])
        count = np.ones(len(facts))
        for head in ("colour", "background"):
            named = [getattr(f, head) for f in facts]
            stated = np.array([value is not None for value in named])
            probability = readings.probability(head, [value or LABELS[head][0] for value in named])
            total = total + np.where(stated, probability, 0.0)
            count += stated
        return total / count


class _FactAccuracy(_WorldMetric):
    """1 where the head's most likely label is the prompt's, 0 where not, NaN where the prompt names none."""

    role: ClassVar[Role] = "prompt"
    head: ClassVar[str]
    field: ClassVar[str]

    def _score(
        self, readings: WorldReadings, prompts: Sequence[str], references: Sequence[Image.Image]
    ) -> np.ndarray:
        named = [getattr(f, self.field) for f in _facts(prompts)]
        predicted = readings.predicted(self.head)
        return np.array(
            [np.nan if n is None else float(n == p) for n, p in zip(named, predicted, strict=True)]
        )


class ToyClassAccuracy(_FactAccuracy):
    """Whether the image shows the prompt's class: the per-fact column behind toy_prompt."""

    name = "toy_class"
    head = "class"
    field = "cls"


class ToyColourAccuracy(_FactAccuracy):
    """Whether the object has the colour the prompt names (NaN for subject prompts, which name none)."""

    name = "toy_colour"
    head = "colour"
    field = "colour"


class ToyBackgroundAccuracy(_FactAccuracy):
    """Whether the setting is the one the prompt names: where attention collapse shows first."""

    name = "toy_background"
    head = "background"
    field = "background"


class ToyDiversity(_WorldMetric):
    """Mean distance (1 - cosine) of scene features to the other images of the same prompt; NaN alone.

    Scene features hold the setting and the object's position and size as well as the object, so
    images of one prompt differ by what a photographer would vary.
    """

    name = "toy_diversity"
    role: ClassVar[Role] = "diversity"

    def _score(
        self, readings: WorldReadings, prompts: Sequence[str], references: Sequence[Image.Image]
    ) -> np.ndarray:
        return mean_pairwise_distance(readings.features, prompts)


TOY_METRICS: Mapping[str, type[_WorldMetric]] = {
    cls.name: cls
    for cls in (
        ToySubjectSimilarity,
        ToyPromptFidelity,
        ToyClassAccuracy,
        ToyColourAccuracy,
        ToyBackgroundAccuracy,
        ToyDiversity,
    )
}


def _shared_model(ctx: MetricContext) -> WorldModel:
    """One loaded encoder for every toy metric of a context: ``models["toy_world"]`` or the shipped one."""
    folder = ctx.models.get(MODEL_KEY, str(DEFAULT_WEIGHTS))
    return ctx.shared(
        f"{MODEL_KEY}:{folder}", lambda: WorldModel.from_folder(folder, ctx.device, ctx.batch_size)
    )


def register_toy_metrics() -> None:
    """Make every toy metric buildable by name; calling it again re-registers the same factories."""
    for name, metric in TOY_METRICS.items():
        register_metric(name, lambda ctx, metric=metric: metric(_shared_model(ctx)), replace=True)


register_toy_metrics()
