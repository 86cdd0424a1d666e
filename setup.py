"""Packaging: `kernels/` ships as `dreamblend.kernels` and the C++ sources in `csrc/` ship as package
data (`dreamblend.csrc`), built on request by `python -m dreamblend.ops.cpp`.

`kernels/` has no `__init__.py` and reaches the package through the symlink `dreamblend/kernels`:
a regular package named `kernels` in the repository root would shadow Hugging Face's `kernels`
distribution (which transformers and diffusers import) for any Python started there, while a
namespace folder never outranks an installed package. The symlink serves editable installs (their
import finder cannot map a namespace subpackage to another folder); wheels copy the files.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["dreamblend", "dreamblend.*"]), "dreamblend.csrc"],
    package_dir={"dreamblend.csrc": "csrc"},
    package_data={"dreamblend.csrc": ["*.cpp", "*.h"], "dreamblend.toyworld": ["weights/**/*"]},
)
