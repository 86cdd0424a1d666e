"""The CPU's model name for result records: ``platform.processor()`` says only "x86_64" on Linux."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The model name the kernel reports in /proc/cpuinfo, else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
