"""AttnDreamBooth's cross-attention map regularizer (Pang et al. 2024, Eq. 2).

It pulls the statistics of the new token's attention maps towards those of its super-category:

    L_reg = lambda_mu * (mu(M^V) - mu(M^cat))^2 + lambda_sigma * (var(M^V) - var(M^cat))^2

Maps come from :class:`dreamblend.AttentionStore` recording ``tokens=[idx_V, idx_cat]``, so only two
token columns per layer ever leave the attention op (its backward recomputes the probabilities)
instead of every layer's full ``(B, H, M, N)`` attention.

Two reductions over layers:

- ``"paper"``: Eq. 2 as written, mean and variance over all values of all layers' maps together,
  per image, averaged over the batch;
- ``"layer"``: the authors' released code, mean and variance per layer and per image, the squared
  differences summed over the batch and averaged over layers.

Statistics run over heads and positions of the per-head maps; variances are unbiased.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

REDUCTIONS = ("paper", "layer")


def _statistics(values: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample mean and unbiased variance of ``values (B, K)``."""
    return values.mean(dim=1), values.var(dim=1)


def attention_map_regularizer(
    maps: Mapping[str, Tensor], *, lambda_mu: float, lambda_sigma: float, reduction: str = "paper"
) -> Tensor:
    """The regularizer on recorded maps ``{layer: (B, H, M, 2)}`` (or head-mean ``(B, M, 2)``).

    The last axis holds the ``[V]`` token's map first and the category token's second.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not maps:
        raise ValueError("no attention maps recorded: run the UNet inside `with store.record():`")
    for name, m in maps.items():
        if m.shape[-1] != 2:
            raise ValueError(
                f"layer {name!r} has maps for {m.shape[-1]} tokens; record exactly [idx_V, idx_category]"
            )

    def penalty(v: Tensor, c: Tensor) -> Tensor:
        (mu_v, var_v), (mu_c, var_c) = _statistics(v), _statistics(c)
        return lambda_mu * (mu_v - mu_c).square() + lambda_sigma * (var_v - var_c).square()

    if reduction == "paper":
        v = torch.cat([m[..., 0].flatten(1) for m in maps.values()], dim=1)
        c = torch.cat([m[..., 1].flatten(1) for m in maps.values()], dim=1)
        return penalty(v, c).mean()
    per_layer = [penalty(m[..., 0].flatten(1), m[..., 1].flatten(1)).sum() for m in maps.values()]
    return torch.stack(per_layer).mean()
