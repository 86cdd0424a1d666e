"""The checkout never shadows an installed distribution for a Python started in the repository root.

`python -c`, `python -m` and pytest put the current directory first on `sys.path`. A regular package
`kernels/` there used to hide Hugging Face's `kernels` (a dependency of transformers that diffusers
imports), so diffusers' UNet failed to import from the repository root.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python_in_root(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_an_installed_kernels_package_wins_over_the_checkout_folder(tmp_path):
    installed = tmp_path / "site" / "kernels"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("API = 'installed distribution'\n")
    result = _python_in_root(
        "import kernels; print(kernels.API)",
        PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "installed distribution"


def test_diffusers_unet_and_our_kernels_import_from_the_repository_root():
    result = _python_in_root(
        "from diffusers import UNet2DConditionModel\n"
        "import dreamblend.kernels.backend as backend\n"
        "print(UNet2DConditionModel.__name__, backend.__name__)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["UNet2DConditionModel", "dreamblend.kernels.backend"]
