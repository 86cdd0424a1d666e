"""Packaging: `kernels/` ships as `dreamblend.kernels` (the top-level name `kernels` is taken)."""

from setuptools import setup

setup(
    packages=["dreamblend", "dreamblend.ops", "dreamblend.pipelines", "dreamblend.commands", "dreamblend.kernels"],
    package_dir={"dreamblend.kernels": "kernels"},
)
