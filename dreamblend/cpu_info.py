"""What the CPU is: its model name for result records (``platform.processor()`` says only "x86_64" on
Linux) and its instruction-set features, which key builds compiled for this CPU."""

from __future__ import annotations

import platform
from pathlib import Path


def _cpuinfo_field(*names: str) -> str | None:
    """The first /proc/cpuinfo value under one of ``names`` (Linux), else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.split(":", 1)[0].strip() in names:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The model name the kernel reports in /proc/cpuinfo, else the platform's processor string."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "cpu"


def cpu_features() -> str:
    """The CPU's feature flags (x86 "flags", Arm "Features"), else its machine and processor strings:
    code compiled with ``-march=native`` runs only where this string is the same."""
    flags = _cpuinfo_field("flags", "Features")
    return " ".join(sorted(flags.split())) if flags else f"{platform.machine()} {platform.processor()}"
