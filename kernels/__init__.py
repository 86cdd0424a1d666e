"""Triton kernels for fused cross-attention with map capture and L1 guidance."""
