"""Launch configurations: pure functions of dtype, shape and mode, so tests can enumerate them.

The launchers build every kernel's compile-time arguments through :func:`kernel_constexprs`
from a :class:`TileConfig` (:func:`select_config`) and a flag set (:class:`ForwardFlags`,
:class:`BackwardFlags`); :func:`forward_flag_space` and :func:`backward_flag_space` list the
flag sets they can produce. The ahead-of-time compile tests walk the same functions, so a
configuration that overflows shared memory or breaks a ``tl.dot`` rule on sm_80/sm_90 is caught
without a GPU.
"""

import itertools
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

import torch

MAX_KEYS = 256
"""Longest key sequence (text tokens) the kernels hold in one tile."""
MAX_HEAD_DIM = 256
MAX_SELECTION = 128 * 64
"""Largest ``N_PAD x T_PAD`` for a token subset (T slots, duplicates count): the 0/1 selection
matrix is a fp32 ``tl.dot`` operand in shared memory, so 64 slots for N <= 128 or 32 for
N <= 256 (the fp32 forward then takes 128 KB of shared memory; twice that overflows sm_80)."""
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK_D = 64
"""Widest head-dim chunk; wider heads are walked in chunks so shared memory stays bounded."""
DKV_PROGRAMS = 512
"""Backward programs to aim for when dK/dV are reduced (about 4 per SM on an H100)."""

Kind = Literal["forward", "backward"]


class MapGrad(IntEnum):
    """Which gradient reaches the maps in the backward kernel."""

    NONE = 0
    """Only ``out`` has a gradient."""
    GIVEN = 1
    """The map gradient is an input (capture)."""
    L1 = 2
    """``sign(A - ref) * d_loss / H``, formed in the kernel from ``ref`` (guidance)."""


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch options of one launch."""

    n_pad: int
    t_pad: int
    block_m: int
    block_d: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ForwardFlags:
    """What one forward launch computes."""

    head_mean: bool
    select: bool
    store_out: bool
    store_maps: bool
    l1_loss: bool


@dataclass(frozen=True)
class BackwardFlags:
    """What one backward launch reads and computes; build it with :meth:`make`."""

    has_dout: bool
    map_grad: MapGrad
    head_mean: bool
    select: bool
    need_dk: bool
    need_dv: bool

    @classmethod
    def make(
        cls, has_dout: bool, map_grad: MapGrad, head_mean: bool, select: bool, need_dk: bool, need_dv: bool
    ) -> "BackwardFlags":
        """Drops flags that cannot matter (map mode without a map gradient, dV without dO), so
        equivalent launches share one compiled kernel."""
        if map_grad == MapGrad.NONE:
            head_mean = select = False
        return cls(has_dout, map_grad, head_mean, select, need_dk, need_dv and has_dout)


def forward_flag_space() -> list[ForwardFlags]:
    """Every forward flag set the launchers use: capture and guidance in both map modes, and
    the head-mean maps-only recompute of the guided backward; each with and without a token list."""
    modes = [(True, True, False), (True, False, True)]
    flags = [ForwardFlags(hm, sel, *mode) for mode in modes for hm in (False, True) for sel in (False, True)]
    return flags + [ForwardFlags(True, sel, False, True, False) for sel in (False, True)]


def backward_flag_space() -> list[BackwardFlags]:
    """Every backward flag set the launchers can produce (some gradient must reach the inputs)."""
    bools = (False, True)
    space = {
        BackwardFlags.make(has_dout, map_grad, *rest)
        for has_dout, map_grad, *rest in itertools.product(bools, MapGrad, bools, bools, bools, bools)
        if has_dout or map_grad != MapGrad.NONE
    }
    return sorted(space, key=lambda f: (f.has_dout, f.map_grad, f.head_mean, f.select, f.need_dk, f.need_dv))


def next_pow2(n: int, floor: int = 16) -> int:
    """Smallest power of two >= max(n, floor); 16 is the least ``tl.dot`` accepts on GPUs."""
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def ieee_dots(dtype: torch.dtype) -> bool:
    """fp32 inputs get ``input_precision="ieee"`` products (a GPU would run TF32 otherwise, with
    ~1e-3 relative error); fp16/bf16 products are exact in the fp32 accumulator anyway."""
    return dtype == torch.float32


def supports(dtype: torch.dtype, head_dim: int, n_keys: int, n_selected: int | None) -> bool:
    """Whether the kernels cover this problem (else the torch reference runs)."""
    return (
        dtype in SUPPORTED_DTYPES
        and head_dim <= MAX_HEAD_DIM
        and n_keys <= MAX_KEYS
        and (n_selected is None or next_pow2(n_keys) * next_pow2(n_selected) <= MAX_SELECTION)
    )


def select_config(kind: Kind, head_dim: int, n_keys: int, n_selected: int | None) -> TileConfig:
    """Tile sizes for a launch; ``n_selected`` is the token-list length, None for all keys.

    Register use grows with the ``BLOCK_M x N_PAD`` fp32 tiles (P, and dP, dS in the backward),
    so the query block shrinks as the key tile grows. At the SD shapes (fp16, N=77, D 40 to 160)
    with row strides divisible by 16 elements, as in diffusers' ``(B, M, H, D)`` views, sm_90
    ptxas reports no spills except 48 bytes in the dK/dV backward. Contiguous ``(B, H, M, 40)``
    rows (80 bytes) cannot be proven aligned, so their loads are not vectorized and spill more.
    ``num_stages`` is 1: the only loops walk heads, head-dim chunks and (dK/dV) query blocks,
    which gain little from prefetching and would multiply shared memory.
    """
    n_pad = next_pow2(n_keys)
    t_pad = n_pad if n_selected is None else next_pow2(n_selected)
    block_d = min(next_pow2(head_dim), MAX_BLOCK_D)
    num_warps = 4 if n_pad <= 64 else 8
    if kind == "forward":
        block_m = 64 if n_pad <= 128 else 32
    else:
        block_m = 32 if n_pad <= 128 else 16
    return TileConfig(n_pad, t_pad, block_m, block_d, num_warps, num_stages=1)


def backward_programs(m: int, block_m: int, batch_heads: int, need_dkv: bool) -> int:
    """Programs per head of the backward grid: one per query block for dQ alone; with dK/dV each
    program walks several blocks into one partial, so the partials, ``(B*H, programs, N, D)``
    fp32, stop growing with ``M``: about ``DKV_PROGRAMS * N * D`` floats each for dK and dV
    (6 MB at N=77, D=40) while ``B*H`` stays under ``DKV_PROGRAMS``."""
    blocks = -(-m // block_m)
    if not need_dkv:
        return blocks
    return max(1, min(blocks, -(-DKV_PROGRAMS // batch_heads)))


def kernel_constexprs(
    cfg: TileConfig, dtype: torch.dtype, flags: ForwardFlags | BackwardFlags
) -> dict[str, object]:
    """The constexpr arguments of ``attention_fwd_kernel`` or ``attention_bwd_kernel``."""
    tiles = dict(
        N_PAD=cfg.n_pad,
        T_PAD=cfg.t_pad,
        BLOCK_M=cfg.block_m,
        BLOCK_D=cfg.block_d,
        HEAD_MEAN=flags.head_mean,
        SELECT=flags.select,
        IEEE_DOTS=ieee_dots(dtype),
    )
    if isinstance(flags, ForwardFlags):
        return dict(tiles, STORE_OUT=flags.store_out, STORE_MAPS=flags.store_maps, L1_LOSS=flags.l1_loss)
    return dict(
        tiles,
        HAS_DOUT=flags.has_dout,
        MAP_GRAD=int(flags.map_grad),
        NEED_DK=flags.need_dk,
        NEED_DV=flags.need_dv,
    )
