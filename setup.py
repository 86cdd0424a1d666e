"""Packaging: `kernels/` ships as `dreamblend.kernels` (the top-level name `kernels` is taken) and the
C++ sources in `csrc/` ship as package data, built on request by `python -m dreamblend.ops.cpp`."""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["dreamblend", "dreamblend.*"]),
        "dreamblend.kernels",
        "dreamblend.csrc",
    ],
    package_dir={"dreamblend.kernels": "kernels", "dreamblend.csrc": "csrc"},
    package_data={"dreamblend.csrc": ["*.cpp"]},
)
