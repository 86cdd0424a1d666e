"""Joint-image attention (JeDi): self-attention over every image of a set at once.

JeDi personalizes without fine-tuning by denoising a *set* of images of one subject together: in
each transformer block the self-attention (``attn1``) of an image sees the tokens of all images of
its set, while cross-attention (``attn2``) stays per image. The supplement does this with
``x.view(-1, ng * l, c)`` before ``attn1`` and ``x.view(b, l, c)`` after; :class:`JointAttnProcessor`
does the same around whatever processor the layer had, so it composes with
:class:`~dreamblend.DreamBlendProcessor` (capture or guidance on ``attn2`` while ``attn1`` is joint).

The set size is state on an :class:`ImageSet` object, like :class:`~dreamblend.AttentionStore`, so
one processor instance serves every layer and the size can change between calls without
re-installing processors.

Batch layout: a batch of ``B`` images is ``B / n`` contiguous sets of ``n``. With classifier-free
guidance the batch is ``[uncond; cond]``; when each half holds whole sets (``B = 2 * n * k``) no set
straddles the halves, because sets are contiguous runs of ``n`` rows and the halves are split at
row ``n * k``. A batch whose halves are not multiples of ``n`` would mix them: keep each half a
multiple of the set size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from diffusers.models.attention_processor import AttnProcessor2_0
from torch import Tensor, nn

SELF_ATTENTION_SUFFIX = "attn1.processor"


class ImageSet:
    """How many consecutive batch rows form one jointly attended image set.

    ``size == 1`` is plain per-image attention (the processors then call the wrapped processor
    unchanged, so results equal the stock model's exactly).
    """

    def __init__(self, size: int = 1) -> None:
        self.size = size

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"image set size must be a positive int, got {value!r}")
        self._size = value

    def num_sets(self, batch_size: int) -> int:
        """Sets in a batch of ``batch_size`` rows; a batch that does not split into whole sets is an error."""
        if batch_size % self.size:
            raise ValueError(
                f"batch size {batch_size} is not a multiple of the image set size {self.size}; "
                "joint attention needs whole sets (with classifier-free guidance, each half a multiple "
                "of the set size)"
            )
        return batch_size // self.size

    @contextmanager
    def joint(self, size: int) -> Iterator[ImageSet]:
        """Use set size ``size`` for the block, then restore the previous size."""
        previous = self.size
        self.size = size
        try:
            yield self
        finally:
            self._size = previous

    def __repr__(self) -> str:
        return f"ImageSet(size={self.size})"


class JointAttnProcessor:
    """Self-attention processor that attends over all tokens of each image set.

    Wraps the layer's processor (``AttnProcessor2_0`` by default): hidden states ``(B, L, C)`` are
    viewed as ``(B / n, n * L, C)``, the wrapped processor runs, and the result is viewed back to
    ``(B, L, C)``. Every step of an attention layer other than the attention core (projections,
    norms, residual) is per token, so only the softmax sees the larger set; this matches the
    supplement's view around ``attn1`` (its ``norm1`` and residual are per token too).
    """

    def __init__(self, image_set: ImageSet, processor: Any | None = None) -> None:
        self.image_set = image_set
        self.processor = AttnProcessor2_0() if processor is None else processor

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        n = self.image_set.size
        if n == 1:
            return self.processor(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        if encoder_hidden_states is not None:
            raise ValueError(
                "joint attention is for self-attention layers (attn1); got encoder_hidden_states"
            )
        if hidden_states.ndim != 3:
            raise ValueError(
                f"joint attention expects hidden states (B, L, C), got shape {tuple(hidden_states.shape)}"
            )
        if attention_mask is not None or temb is not None:
            raise ValueError("joint attention does not support a per-image attention_mask or temb")
        batch_size, length, channels = hidden_states.shape
        sets = self.image_set.num_sets(batch_size)
        joint = hidden_states.reshape(sets, n * length, channels)
        out = self.processor(attn, joint, None, None, None, *args, **kwargs)
        return out.reshape(batch_size, length, out.shape[-1])


def _check_model(model: nn.Module) -> None:
    if not hasattr(model, "set_attn_processor") or not hasattr(model, "attn_processors"):
        raise TypeError(
            f"joint attention needs a diffusers model with attention processors, got {type(model).__name__}"
        )


def install_joint_attention(model: nn.Module, image_set: ImageSet) -> dict[str, Any]:
    """Wrap the processor of every self-attention layer (``...attn1``) in :class:`JointAttnProcessor`.

    Other processors (``attn2``, where DreamBlend captures or guides) are left as they are. A layer
    that is already joint is re-wrapped around its inner processor, never nested. Returns the
    previous processors, for :meth:`set_attn_processor` to restore.
    """
    _check_model(model)
    previous = dict(model.attn_processors)
    processors: dict[str, Any] = {}
    joint = 0
    for name, proc in previous.items():
        if name.endswith(SELF_ATTENTION_SUFFIX):
            inner = proc.processor if isinstance(proc, JointAttnProcessor) else proc
            processors[name] = JointAttnProcessor(image_set, inner)
            joint += 1
        else:
            processors[name] = proc
    if joint == 0:
        raise ValueError(
            f"{type(model).__name__} has no self-attention layer (processor names ending in "
            f"{SELF_ATTENTION_SUFFIX!r}) for joint attention"
        )
    model.set_attn_processor(processors)
    return previous


@contextmanager
def attach_joint_attention(model: nn.Module, image_set: ImageSet | None = None) -> Iterator[ImageSet]:
    """Make ``model``'s self-attention joint over image sets for the block; yields the set object.

    Processors are restored on exit, also when the block raises. To combine with DreamBlend, enter
    this *inside* :func:`dreamblend.attach` (``attach`` installs its processor on every layer and
    would replace the joint ones if entered second)::

        with attach(unet, store), attach_joint_attention(unet, ImageSet(3)), store.record():
            unet(...)
    """
    image_set = ImageSet() if image_set is None else image_set
    previous = install_joint_attention(model, image_set)
    try:
        yield image_set
    finally:
        model.set_attn_processor(dict(previous))
