"""What the CLI tests of the UNet and the MMDiT pipelines share: jobs files, manifests, pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image


def write_jobs(folder: Path, jobs: dict) -> Path:
    """``folder/jobs.yaml`` for ``dreamblend batch``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "jobs.yaml"
    path.write_text(yaml.safe_dump(jobs))
    return path


def read_manifest(out: Path) -> list[dict]:
    """The records of a batch run's ``manifest.jsonl``, in the order they were written."""
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def read_pixels(path: Path) -> np.ndarray:
    """A saved image as int16, so that differences of two images can go negative."""
    return np.asarray(Image.open(path), dtype=np.int16)
