"""The on-disk trajectory: checkpoint folders, their manifests, the ``trajectory.json`` index, loading.

A training run writes ``OUT/checkpoint-{step}/`` at every scheduled step, each holding files that
diffusers loads directly (a ``unet/`` model folder, or ``pytorch_lora_weights.safetensors``, plus
``learned_embeds.safetensors`` for a learned token) and a ``checkpoint.json`` manifest naming them,
the base model, token and class. ``OUT/trajectory.json`` lists all checkpoints of the run so a
guidance (G) and an edit (E) checkpoint can be picked by step. Paths inside are relative to the file
that holds them, so a run folder can be moved or copied as a whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamblend.hub import hub_errors

TRAJECTORY_FILE = "trajectory.json"
MANIFEST_FILE = "checkpoint.json"
TRAJECTORY_FORMAT = 1


def write_json_atomic(path: Path, data: Any) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written index."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@dataclass(frozen=True)
class CheckpointInfo:
    """One point of a trajectory. ``unet``/``lora``/``embedding`` are absolute paths or None.

    ``unet is None and lora is None`` means the UNet is the base model's (AttnDreamBooth stage 1
    trains only the token embedding).
    """

    path: Path
    step: int
    method: str
    mode: str
    base_model: str
    token: str
    class_word: str
    prompt: str
    unet: Path | None
    lora: Path | None
    embedding: Path | None
    stage: int | None = None

    @classmethod
    def from_manifest(cls, directory: Path, data: dict[str, Any]) -> CheckpointInfo:
        def file(key: str) -> Path | None:
            return None if data.get(key) is None else directory / data[key]

        return cls(
            path=directory,
            step=int(data["step"]),
            method=data["method"],
            mode=data["mode"],
            base_model=_base_model(directory, data["base_model"]),
            token=data["token"],
            class_word=data["class"],
            prompt=data["prompt"],
            unet=file("unet"),
            lora=file("lora"),
            embedding=file("embedding"),
            stage=data.get("stage"),
        )


def _base_model(directory: Path, base_model: str) -> str:
    """A base model path relative to the checkpoint folder (shipped trajectories) made absolute; else as is.

    Relative paths are only taken where that folder holds a pipeline, so hub ids stay hub ids.
    """
    local = directory / base_model
    if not Path(base_model).is_absolute() and (local / "model_index.json").is_file():
        return str(local.resolve())
    return base_model


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """The manifest of checkpoint folder ``path`` (``OUT/checkpoint-{step}``)."""
    directory = Path(path)
    manifest = directory / MANIFEST_FILE
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{directory} has no {MANIFEST_FILE}; pass a checkpoint folder written by 'dreamblend train' "
            f"(OUT/checkpoint-STEP) or list them with read_trajectory(OUT)"
        )
    return CheckpointInfo.from_manifest(directory, json.loads(manifest.read_text(encoding="utf-8")))


def read_trajectory(path: str | Path) -> list[CheckpointInfo]:
    """All checkpoints of a run, by step; ``path`` is the run folder or its ``trajectory.json``."""
    index = Path(path)
    if index.is_dir():
        index = index / TRAJECTORY_FILE
    if not index.is_file():
        raise FileNotFoundError(
            f"no {TRAJECTORY_FILE} at {index}; pass the --output folder of a training run"
        )
    data = json.loads(index.read_text(encoding="utf-8"))
    if data.get("format") != TRAJECTORY_FORMAT:
        raise ValueError(f"{index} has format {data.get('format')!r}; this version reads {TRAJECTORY_FORMAT}")
    return [read_checkpoint(index.parent / entry["path"]) for entry in data["checkpoints"]]


def load_checkpoint(path: str | Path, pipe=None, *, torch_dtype: torch.dtype | None = None, **kwargs: Any):
    """A diffusers pipeline with the checkpoint at ``path`` applied.

    Without ``pipe`` the base model recorded in the manifest is loaded (``torch_dtype`` and
    ``kwargs`` go to ``DiffusionPipeline.from_pretrained``), so every call gets its own text encoder:
    a learned token embedding of one checkpoint never leaks into another. With ``pipe`` the
    checkpoint is applied to it in place (its UNet replaced, LoRA or token loaded) and it is returned.
    """
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    info = read_checkpoint(path)
    unet = None
    if info.unet is not None:
        unet = UNet2DConditionModel.from_pretrained(info.unet, torch_dtype=torch_dtype)
    if pipe is None:
        extra = {} if unet is None else {"unet": unet}
        with hub_errors(info.base_model):
            pipe = DiffusionPipeline.from_pretrained(
                info.base_model, torch_dtype=torch_dtype, **extra, **kwargs
            )
    elif unet is not None:
        pipe.register_modules(unet=unet.to(device=pipe.device, dtype=pipe.unet.dtype))
    if info.lora is not None:
        pipe.load_lora_weights(str(info.lora.parent), weight_name=info.lora.name)
    if info.embedding is not None:
        pipe.load_textual_inversion(str(info.embedding), token=info.token)
    return pipe
