"""Ahead-of-time compiles for sm_80 and sm_90, down to cubin, without a GPU.

The interpreter forgives what a GPU compile rejects (``tl.dot`` dims under 16, dtype mixes,
shared memory over the per-block limit), so every kernel is compiled here with the constexprs
the launchers build (``dreamblend.kernels.config``). The default suite compiles both kernels
for every dtype and target at the largest tiles the launchers pick, at the smallest tiles, and
over a covering set of flag sets; the slow suite compiles every tile configuration with the
heaviest flag set and every flag set at the SD tile. A flag set that is not the heaviest only
removes code from the heaviest one at the same tile.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
import triton

from dreamblend.kernels.config import (
    BackwardFlags,
    ForwardFlags,
    MapGrad,
    TileConfig,
    backward_flag_space,
    forward_flag_space,
    kernel_constexprs,
    next_pow2,
    select_config,
    supports,
)

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
"""Opt-in shared memory per block (A100: 163 KB, H100/H200: 227 KB)."""
HELPER = Path(__file__).with_name("aot_compile.py")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SD_TILE = dict(head_dim=64, n_keys=77)  # SD1.5/SDXL text length, a common head size
SD_SELECTED = 4


@dataclass(frozen=True)
class Job:
    kind: str
    dtype: torch.dtype
    cfg: TileConfig
    flags: ForwardFlags | BackwardFlags
    cap: int

    @property
    def id(self) -> str:
        c, f = self.cfg, self.flags
        on = "+".join(k for k, v in vars(f).items() if v is True)
        grad = f"-grad_{f.map_grad.name}" if isinstance(f, BackwardFlags) else ""
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.kind}-{dt}-sm{self.cap}-n{c.n_pad}t{c.t_pad}m{c.block_m}d{c.block_d}-{on}{grad}"

    def payload(self) -> dict:
        return {
            "kernel": f"attention_{'fwd' if self.kind == 'forward' else 'bwd'}_kernel",
            "dtype": str(self.dtype).removeprefix("torch."),
            "constexprs": kernel_constexprs(self.cfg, self.dtype, self.flags),
            "num_warps": self.cfg.num_warps,
            "num_stages": self.cfg.num_stages,
            "cap": self.cap,
        }


def heaviest(kind: str, select: bool) -> ForwardFlags | BackwardFlags:
    if kind == "forward":  # guidance in head-mean mode: out, a loop over heads, ref loads, the L1 sum
        return ForwardFlags(True, select, True, False, True)
    return BackwardFlags.make(True, MapGrad.L1, False, select, True, True)


def job(kind, dtype, cap, flags, head_dim, n_keys, n_selected=None) -> Job:
    assert supports(dtype, head_dim, n_keys, n_selected)
    return Job(kind, dtype, select_config(kind, head_dim, n_keys, n_selected), flags, cap)


def _sd_job(kind: str, flags, cap: int = 90) -> Job:
    return job(kind, torch.float16, cap, flags, **SD_TILE, n_selected=SD_SELECTED if flags.select else None)


# With the heaviest flag sets below, every value of every flag appears in the default suite.
FORWARD_COVER = [
    ForwardFlags(False, False, True, True, False),  # capture, per head, all tokens
    ForwardFlags(True, False, False, True, False),  # head-mean maps recompute of the guided backward
]
BACKWARD_COVER = [
    BackwardFlags.make(True, MapGrad.NONE, False, False, True, True),  # only out has a gradient
    BackwardFlags.make(False, MapGrad.GIVEN, True, True, True, False),  # capture maps, head mean
    BackwardFlags.make(True, MapGrad.L1, True, False, False, False),  # guidance, head mean, dQ only
]


def default_jobs() -> list[Job]:
    jobs = [_sd_job("forward", f) for f in FORWARD_COVER] + [_sd_job("backward", f) for f in BACKWARD_COVER]
    for kind in ("forward", "backward"):
        for dtype in DTYPES:  # largest key tile with the largest token subset it allows
            for cap in SHARED_LIMIT if dtype != torch.float32 else (80,):  # fp32 (slow to build): sm_80 only
                jobs.append(job(kind, dtype, cap, heaviest(kind, True), 256, 256, 32))
        jobs.append(job(kind, torch.float16, 80, heaviest(kind, True), 1, 1, 1))  # every dim padded to 16
    return jobs


def tile_space(kind: str) -> list[tuple[int, int, int | None]]:
    """(head_dim, n_keys, n_selected) reaching every tile config ``select_config`` can return."""
    points = []
    for head_dim in (16, 32, 64):  # block_d 16, 32, 64 (wider heads reuse 64)
        for n_keys in (16, 32, 64, 128, 256):
            for n_selected in (None, 16, 32, 64):
                if supports(torch.float16, head_dim, n_keys, n_selected):
                    points.append((head_dim, n_keys, n_selected))
    return points


def full_jobs() -> list[Job]:
    jobs = []
    for kind in ("forward", "backward"):
        flag_space = forward_flag_space() if kind == "forward" else backward_flag_space()
        for cap in SHARED_LIMIT:
            jobs += [_sd_job(kind, flags, cap) for flags in flag_space]
            for dtype in DTYPES:
                for head_dim, n_keys, n_sel in tile_space(kind):
                    flags = heaviest(kind, n_sel is not None)
                    jobs.append(job(kind, dtype, cap, flags, head_dim, n_keys, n_sel))
    default = set(default_jobs())
    return [j for j in dict.fromkeys(jobs) if j not in default]


def _run_helper(batch: list[Job]) -> list[dict]:
    payload = json.dumps([j.payload() for j in batch])
    cmd = [sys.executable, str(HELPER)]
    proc = subprocess.run(cmd, input=payload, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"ahead-of-time compile helper failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


@cache
def _compile_group(group: tuple[Job, ...]) -> dict[Job, dict]:
    """Compile ``group`` in two helper processes at once (about a minute per 20 jobs on 2 cores)."""
    halves = [list(group[::2]), list(group[1::2])]
    with ThreadPoolExecutor(2) as pool:
        outputs = list(pool.map(_run_helper, halves))
    return {j: r for batch, out in zip(halves, outputs, strict=True) for j, r in zip(batch, out, strict=True)}


def _check(j: Job, result: dict) -> None:
    assert "error" not in result, f"{j.id} does not compile for sm_{j.cap}: {result['error']}"
    assert result["cubin_bytes"] > 0, f"{j.id}: no cubin for sm_{j.cap} (ptxas missing?)"
    assert result["shared"] <= SHARED_LIMIT[j.cap], (
        f"{j.id} needs {result['shared']} bytes of shared memory, over the sm_{j.cap} limit"
    )


DEFAULT = default_jobs()
FULL = full_jobs()


@pytest.mark.parametrize("j", DEFAULT, ids=lambda j: j.id)
def test_compiles_within_shared_memory(j: Job) -> None:
    _check(j, _compile_group(tuple(DEFAULT))[j])


@pytest.mark.slow
@pytest.mark.parametrize("j", FULL, ids=lambda j: j.id)
def test_compiles_within_shared_memory_every_config(j: Job) -> None:
    _check(j, _compile_group(tuple(x for x in FULL if x.dtype == j.dtype))[j])


def test_default_suite_compiles_every_kernel_dtype_and_target() -> None:
    kinds = ("forward", "backward")
    assert {(j.kind, j.dtype) for j in DEFAULT} == {(k, d) for k in kinds for d in DTYPES}
    assert {(j.kind, j.cap) for j in DEFAULT} == {(k, c) for k in kinds for c in SHARED_LIMIT}
    assert {j.flags for j in DEFAULT if j.kind == "forward"} <= set(forward_flag_space())
    assert {j.flags for j in DEFAULT if j.kind == "backward"} <= set(backward_flag_space())


def test_bundled_ptxas_is_present() -> None:
    """triton ships ptxas for sm_80/sm_90 (ptxas-blackwell covers newer targets)."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    assert ptxas.is_file(), f"{ptxas} is missing: the triton wheel lacks its CUDA tools"
    version = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True, check=True).stdout
    assert "Cuda compilation tools" in version


def test_tile_space_reaches_every_padding() -> None:
    for kind in ("forward", "backward"):
        cfgs = {select_config(kind, *p) for p in tile_space(kind)}
        assert {c.n_pad for c in cfgs} == {next_pow2(n) for n in (1, 20, 33, 77, 256)}
        block_ds = {select_config(kind, d, 77, None).block_d for d in (1, 17, 40, 160, 256)}
        assert {c.block_d for c in cfgs} == block_ds
