"""Kernel, training and end-to-end benchmarks, run from a source checkout: ``python -m benchmarks.NAME``."""
