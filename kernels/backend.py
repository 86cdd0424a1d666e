"""Triton kernels for fused cross-attention with map capture and L1 guidance.

``capture_attention`` and ``guided_attention`` follow the backend contract of
``dreamblend.ops`` (positional ``scale, tokens, head_mean``, tokens already an index tensor).
CUDA tensors run compiled kernels; CPU tensors run the same kernels in Triton's interpreter
(slow, for tests and debugging). Without triton, ``AVAILABLE`` is False and importing still works.

``kernels/`` has no ``__init__.py`` on purpose: Python started in the repository root (pytest,
``python -m``, ``python -c``) would otherwise import this folder as the top-level ``kernels``
and shadow Hugging Face's ``kernels`` distribution, which transformers and diffusers import. As a
namespace folder it only becomes ``dreamblend.kernels`` through the package mapping in setup.py.
"""

try:
    from dreamblend.kernels.ops import (
        capture_attention,
        guided_attention,
        joint_capture_attention,
        joint_guided_attention,
    )
except ImportError as exc:  # no triton, or a torch without torch.library.triton_op
    AVAILABLE = False
    UNAVAILABLE_REASON = f"the Triton kernels cannot be loaded: {exc}"

    def _unavailable(*args, **kwargs):
        raise RuntimeError(UNAVAILABLE_REASON)

    capture_attention = guided_attention = joint_capture_attention = joint_guided_attention = _unavailable
else:
    AVAILABLE = True
    UNAVAILABLE_REASON = ""

__all__ = [
    "AVAILABLE",
    "UNAVAILABLE_REASON",
    "capture_attention",
    "guided_attention",
    "joint_capture_attention",
    "joint_guided_attention",
]
