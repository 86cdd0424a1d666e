"""Silence third-party notices that tell a dreamblend user nothing they can act on.

- transformers warns on every process that its image processors fall back to PIL without
  torchvision; PIL is the backend these processors always had, and torchvision's CPU build is not
  what pip resolves next to a CPU torch, so the notice only asks for a CUDA download.
- huggingface_hub warns that diffusers still passes ``local_dir_use_symlinks``, a deprecated no-op.

Only these exact messages are filtered; every other warning passes.
"""

from __future__ import annotations

import logging
import warnings

_TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _TORCHVISION_FALLBACK not in record.getMessage()


def install() -> None:
    """Install the filters (idempotent); transformers picks its logger up by name when it loads."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropTorchvisionFallback) for f in logger.filters):
        logger.addFilter(_DropTorchvisionFallback())
    warnings.filterwarnings(
        "ignore", message="The `local_dir_use_symlinks` argument is deprecated", category=UserWarning
    )
