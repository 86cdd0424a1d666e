"""Triton kernels for fused cross-attention with map capture and L1 guidance.

``capture_attention`` and ``guided_attention`` follow the backend contract of
``dreamblend.ops`` (positional ``scale, tokens, head_mean``, tokens already an index tensor).
CUDA tensors run compiled kernels; CPU tensors run the same kernels in Triton's interpreter
(slow, for tests and debugging). Without triton, ``AVAILABLE`` is False and importing still works.
"""

try:
    from dreamblend.kernels.ops import capture_attention, guided_attention
except ImportError as exc:  # no triton, or a torch without torch.library.triton_op
    AVAILABLE = False
    UNAVAILABLE_REASON = f"the Triton kernels cannot be loaded: {exc}"

    def _unavailable(*args, **kwargs):
        raise RuntimeError(UNAVAILABLE_REASON)

    capture_attention = guided_attention = _unavailable
else:
    AVAILABLE = True
    UNAVAILABLE_REASON = ""

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "capture_attention", "guided_attention"]
