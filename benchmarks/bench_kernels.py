"""Kernel microbenchmark: the fused capture/guidance attention against what PyTorch users write.

Shapes are the cross-attention layers of SD1.5 at 512 px and SDXL at 1024 px (N=77 text tokens).
Two passes per layer:

- ``capture``: forward only, ``out`` plus float32 maps (G's sampling pass);
- ``guided``: forward + backward of the guidance step, ``q`` requiring grad (K, V come from frozen
  text embeddings), ``out`` receiving a downstream gradient and the per-sample L1 loss a unit one.

Implementations (DESIGN §6 peers): ``dreamblend`` (the Triton ops), ``sdpa`` (fused attention with
no maps: the floor), ``sdpa_recompute`` (SDPA output plus ``softmax(q k^T)`` recomputed for the
maps, the best pure-PyTorch option), ``eager`` (materialized probabilities, torch loss: what
pix2pix-zero does) and ``xformers`` when it imports. Each gets a median over CUDA-event timed
repeats after a warmup, its spread, and its peak memory above the inputs; one JSON line per
measurement is appended to ``benchmarks/results/kernels.jsonl``.

    python -m benchmarks.bench_kernels                 # all layers, batch 1/4/8, fp16 and bf16
    python -m benchmarks.bench_kernels --quick         # one layer per model, batch 1, fp16
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dreamblend.kernels import backend as kernels
from dreamblend.ops import reference

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.jsonl"
TEXT_TOKENS = 77
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Layer:
    model: str
    m: int
    heads: int
    head_dim: int


LAYERS = {  # (M, heads, head dim) of each cross-attention resolution
    "sd15": [Layer("sd15", m, 8, d) for m, d in ((4096, 40), (1024, 80), (256, 160), (64, 160))],
    "sdxl": [Layer("sdxl", 4096, 10, 64), Layer("sdxl", 1024, 20, 64)],
}


@dataclass
class Problem:
    q: Tensor
    k: Tensor
    v: Tensor
    ref: Tensor
    grad_out: Tensor
    tokens: Tensor | None
    head_mean: bool
    scale: float


def make_problem(
    layer: Layer, batch: int, dtype: torch.dtype, device, n_tokens: int | None, head_mean: bool
) -> Problem:
    """Random q, k, v, a downstream gradient for ``out`` and a reference map for the loss.

    q, k, v and the gradient are ``(B, H, L, D)`` views of ``(B, L, H, D)`` memory, as diffusers'
    processors pass them to attention (the layout every peer gets)."""
    gen = torch.Generator(device=device).manual_seed(0)
    b, h, m, d, n = batch, layer.heads, layer.m, layer.head_dim, TEXT_TOKENS

    def randn(b: int, h: int, length: int, d: int) -> Tensor:
        return torch.randn((b, length, h, d), generator=gen, device=device, dtype=dtype).transpose(1, 2)

    tokens = None if n_tokens is None else torch.arange(1, n_tokens + 1, device=device)
    t = n if tokens is None else n_tokens
    ref_shape = (b, m, t) if head_mean else (b, h, m, t)
    ref = torch.rand(ref_shape, generator=gen, device=device) / t
    q, k, v, grad_out = randn(b, h, m, d), randn(b, h, n, d), randn(b, h, n, d), randn(b, h, m, d)
    return Problem(q, k, v, ref, grad_out, tokens, head_mean, d**-0.5)


def _maps(probs: Tensor, p: Problem) -> Tensor:
    return reference.select_maps(probs, p.tokens, p.head_mean)


def _probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """diffusers' eager scores: the product in the input dtype, softmax upcast to float32."""
    return torch.softmax((q @ k.transpose(-1, -2)).float() * scale, dim=-1)


def _xformers() -> Callable | None:
    try:
        from xformers.ops import memory_efficient_attention
    except ImportError:
        return None
    return lambda q, k, v, scale: memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    ).transpose(1, 2)


def capture_impls(p: Problem) -> dict[str, Callable[[], tuple[Tensor, Tensor | None]]]:
    """Forward-only callables returning ``(out, maps)`` (maps None where a peer has none)."""
    q, k, v, s = p.q, p.k, p.v, p.scale

    def eager():
        probs = _probs(q, k, s)
        return probs.to(v.dtype) @ v, _maps(probs, p)

    impls = {
        "dreamblend": lambda: kernels.capture_attention(q, k, v, s, p.tokens, p.head_mean),
        "sdpa": lambda: (F.scaled_dot_product_attention(q, k, v, scale=s), None),
        "sdpa_recompute": lambda: (
            F.scaled_dot_product_attention(q, k, v, scale=s),
            _maps(_probs(q, k, s), p),
        ),
        "eager": eager,
    }
    if (xf := _xformers()) is not None:
        impls["xformers"] = lambda: (xf(q, k, v, s), None)
    return impls


def guided_impls(p: Problem) -> dict[str, Callable[[], tuple[Tensor, Tensor | None, Tensor]]]:
    """Forward + backward callables returning ``(out, loss, dq)`` (loss None for map-less peers)."""
    k, v, s = p.k, p.v, p.scale

    def run(forward: Callable[[Tensor], tuple[Tensor, Tensor | None]]) -> Callable:
        def step():
            q = p.q.detach().requires_grad_()
            out, loss = forward(q)
            outputs, grads = [out], [p.grad_out]
            if loss is not None:
                outputs.append(loss.sum())
                grads.append(None)
            torch.autograd.backward(outputs, grads)
            return out, loss, q.grad

        return step

    def dreamblend(q):
        return kernels.guided_attention(q, k, v, p.ref, s, p.tokens, p.head_mean)

    def recompute(q):
        loss = reference.l1_map_loss(_maps(_probs(q, k, s), p), p.ref, p.head_mean)
        return F.scaled_dot_product_attention(q, k, v, scale=s), loss

    def eager(q):
        probs = _probs(q, k, s)
        return probs.to(v.dtype) @ v, reference.l1_map_loss(_maps(probs, p), p.ref, p.head_mean)

    impls = {
        "dreamblend": run(dreamblend),
        "sdpa": run(lambda q: (F.scaled_dot_product_attention(q, k, v, scale=s), None)),
        "sdpa_recompute": run(recompute),
        "eager": run(eager),
    }
    if (xf := _xformers()) is not None:
        impls["xformers"] = run(lambda q: (xf(q, k, v, s), None))
    return impls


def time_cuda(fn: Callable, warmup: int, repeats: int) -> dict:
    """Per-call CUDA-event times (ms) after ``warmup`` calls: median and spread."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {
        "median_ms": statistics.median(times),
        "min_ms": times[0],
        "max_ms": times[-1],
        "p25_ms": quartiles[0],
        "p75_ms": quartiles[2],
        "warmup": warmup,
        "repeats": repeats,
        "timer": "cuda_events",
    }


def peak_bytes(fn: Callable) -> int:
    """Peak allocated memory of one call above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - base


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=root).stdout.strip()


def environment() -> dict:
    """What every record carries: date, revision (``-dirty`` with local changes), device, versions."""
    try:
        revision = _git("rev-parse", "--short", "HEAD") + ("-dirty" if _git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        revision = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": revision,
        "device": {
            "name": torch.cuda.get_device_name(),
            "capability": list(torch.cuda.get_device_capability()),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton_version,
            "cuda": torch.version.cuda,
        },
    }


def measure(fn: Callable, args: argparse.Namespace) -> dict:
    """Timing and peak memory of ``fn``, or the out-of-memory it hit."""
    try:
        timing = time_cuda(fn, args.warmup, args.repeats)
        return {"status": "ok", "error": None, "timing": timing, "peak_allocated_bytes": peak_bytes(fn)}
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        error = str(exc).splitlines()[0]
        return {"status": "oom", "error": error, "timing": None, "peak_allocated_bytes": None}


def run(args: argparse.Namespace) -> list[dict]:
    """Measure every (layer, batch, dtype, pass, implementation); one record each."""
    env = environment()
    records = []
    layers = [layer for model in args.models for layer in LAYERS[model][: 1 if args.quick else None]]
    for layer in layers:
        shape = dict(H=layer.heads, M=layer.m, N=TEXT_TOKENS, D=layer.head_dim)
        for batch in args.batch:
            for dtype_name in args.dtypes:
                p = make_problem(layer, batch, DTYPES[dtype_name], "cuda", args.tokens, args.head_mean)
                for kind in args.passes:
                    impls = capture_impls(p) if kind == "capture" else guided_impls(p)
                    rows = {name: measure(fn, args) for name, fn in impls.items()}
                    report(layer, batch, dtype_name, kind, rows)
                    records += [
                        {
                            **env,
                            "bench": "kernels",
                            "model": layer.model,
                            "pass": kind,
                            "impl": name,
                            "dtype": dtype_name,
                            "shape": dict(B=batch, **shape),
                            "tokens": args.tokens,
                            "head_mean": args.head_mean,
                            **row,
                        }
                        for name, row in rows.items()
                    ]
    return records


def report(layer: Layer, batch: int, dtype: str, kind: str, rows: dict[str, dict]) -> None:
    ours = rows["dreamblend"]["timing"]
    print(f"\n{layer.model} M={layer.m} H={layer.heads} D={layer.head_dim} B={batch} {dtype} {kind}")
    for name, row in rows.items():
        if row["timing"] is None:
            print(f"  {name:15s} {row['status']}")
            continue
        t = row["timing"]
        ratio = f"{t['median_ms'] / ours['median_ms']:6.2f}x ours" if ours else ""
        print(
            f"  {name:15s} {t['median_ms']:8.3f} ms [{t['p25_ms']:.3f}, {t['p75_ms']:.3f}] {ratio}"
            f"  peak {row['peak_allocated_bytes'] / 2**20:8.1f} MiB"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(LAYERS), default=sorted(LAYERS, reverse=True))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float16", "bfloat16"])
    parser.add_argument("--passes", nargs="+", choices=["capture", "guided"], default=["capture", "guided"])
    parser.add_argument("--tokens", type=int, default=None, help="capture this many tokens (default: all 77)")
    parser.add_argument("--head-mean", action="store_true", help="head-mean maps instead of per-head maps")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="first layer of each model, batch 1, fp16")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSONL file the records are appended to")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.dtypes, args.repeats = [1], ["float16"], min(args.repeats, 20)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench_kernels needs a CUDA GPU: the Triton kernels run compiled only on CUDA (on CPU they "
            "run in Triton's interpreter, far too slow to time). Nothing was measured or written."
        )
    records = run(args)
    if not args.no_save:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.open("a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        print(f"\nappended {len(records)} records to {args.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
