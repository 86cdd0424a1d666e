"""Packaging: `kernels/` ships as `dreamblend.kernels` (the top-level name `kernels` is taken)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["dreamblend", "dreamblend.*"]), "dreamblend.kernels"],
    package_dir={"dreamblend.kernels": "kernels"},
)
