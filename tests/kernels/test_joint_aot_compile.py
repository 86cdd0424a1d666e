"""Ahead-of-time compiles of the joint-attention kernels for sm_80 and sm_90, down to cubin, without a
GPU (what the interpreter forgives: ``tl.dot`` dims under 16, dtype mixes, shared memory over the
per-block limit). Constexprs come from the launchers' own builders in ``joint_attention``. The default
suite compiles each kernel at its heaviest flag set for every dtype and target (FLUX's D=128, SD3.5's
D=64, the widest D=256 in fp32) and at the smallest tile, plus the other maps modes; the slow suite
compiles every flag set at FLUX's tile and every tile with the heaviest flags."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from test_aot_compile import SHARED_LIMIT, _check, _compile_group

from dreamblend.kernels import joint_attention as ja

KERNELS = ("joint_fwd_kernel", "joint_maps_kernel", "joint_bwd_dq_kernel", "joint_bwd_dkdv_kernel")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BOOLS = (False, True)


def flag_space(kernel: str) -> list[tuple]:
    """Every flag set the launchers can pass ``kernel``: (text_lse,), (mode, head_mean, select), or the
    backward's ``JointBackwardFlags`` fields (some gradient must reach the inputs)."""
    if kernel == "joint_fwd_kernel":
        return [(b,) for b in BOOLS]
    if kernel == "joint_maps_kernel":
        return list(itertools.product(ja.MapsMode, BOOLS, BOOLS))
    flags = {ja.JointBackwardFlags.make(*f) for f in itertools.product(BOOLS, repeat=5) if f[0] or f[1]}
    return sorted(tuple(vars(f).values()) for f in flags)


def heaviest(kernel: str) -> tuple:
    """The flag set with the most code: every other one only removes parts of it at the same tile."""
    if kernel == "joint_fwd_kernel":
        return (True,)
    if kernel == "joint_maps_kernel":
        return (ja.MapsMode.L1, True, True)
    return (True, True, True, True, True)


@dataclass(frozen=True)
class JointJob:
    kernel: str
    dtype: torch.dtype
    cap: int
    head_dim: int
    flags: tuple

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        flags = "-".join(str(int(f)) for f in self.flags)
        return f"{self.kernel}-{dt}-sm{self.cap}-d{self.head_dim}-flags{flags}"

    def payload(self) -> dict:
        tiles = ja.joint_tiles(self.head_dim)
        if self.kernel == "joint_fwd_kernel":
            constexprs = ja.forward_constexprs(tiles, self.dtype, *self.flags)
        elif self.kernel == "joint_maps_kernel":
            constexprs = ja.maps_constexprs(tiles, self.dtype, *self.flags)
        else:
            constexprs = ja.backward_constexprs(tiles, self.dtype, ja.JointBackwardFlags(*self.flags))
        return {
            "module": "joint_attention",
            "kernel": self.kernel,
            "dtype": str(self.dtype).removeprefix("torch."),
            "constexprs": constexprs,
            "num_warps": tiles.num_warps,
            "num_stages": tiles.num_stages,
            "cap": self.cap,
        }


def default_jobs() -> list[JointJob]:
    jobs = []
    for kernel in KERNELS:
        top = heaviest(kernel)
        jobs += [
            JointJob(kernel, torch.float16, 80, 128, top),  # FLUX head
            JointJob(kernel, torch.bfloat16, 90, 64, top),  # SD3.5 head
            JointJob(kernel, torch.float32, 80, 256, top),  # widest head, fp32: the most shared memory
            JointJob(kernel, torch.float16, 80, 1, top),  # every dim padded to 16
        ]
    jobs += [
        JointJob("joint_maps_kernel", torch.float16, 90, 128, (mode, False, True)) for mode in ja.MapsMode
    ]
    jobs.append(JointJob("joint_bwd_dq_kernel", torch.float16, 90, 128, (True, False, False, False, False)))
    return list(dict.fromkeys(jobs))


def full_jobs() -> list[JointJob]:
    jobs = []
    for kernel, cap in itertools.product(KERNELS, SHARED_LIMIT):
        jobs += [JointJob(kernel, torch.float16, cap, 128, flags) for flags in flag_space(kernel)]
        for dtype, head_dim in itertools.product(DTYPES, (16, 32, 64, 128, 256)):
            jobs.append(JointJob(kernel, dtype, cap, head_dim, heaviest(kernel)))
    default = set(default_jobs())
    return [j for j in dict.fromkeys(jobs) if j not in default]


DEFAULT = default_jobs()
FULL = full_jobs()


@pytest.mark.parametrize("j", DEFAULT, ids=lambda j: j.id)
def test_compiles_within_shared_memory(j: JointJob) -> None:
    _check(j, _compile_group(tuple(DEFAULT))[j])


@pytest.mark.slow
@pytest.mark.parametrize("j", FULL, ids=lambda j: j.id)
def test_compiles_within_shared_memory_every_config(j: JointJob) -> None:
    _check(j, _compile_group(tuple(x for x in FULL if x.dtype == j.dtype))[j])


def test_default_suite_covers_every_kernel_dtype_and_target() -> None:
    assert {(j.kernel, j.dtype) for j in DEFAULT} == set(itertools.product(KERNELS, DTYPES))
    assert {(j.kernel, j.cap) for j in DEFAULT} == set(itertools.product(KERNELS, SHARED_LIMIT))
    assert all(j.flags in flag_space(j.kernel) for j in DEFAULT + FULL)
