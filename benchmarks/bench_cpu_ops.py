"""CPU op benchmark: the C++ backend against the torch reference, compiled and not, per layer shape.

Shapes are the cross-attention layers of SD1.5 at 512 px and SDXL at 1024 px (N = 77 text tokens),
with q, k, v laid out as the attention processor hands them over: ``(B, H, L, D)`` views of
``(B, L, H * D)`` projections. Two passes per layer, as in ``bench_kernels.py``:

- ``capture``: forward only, ``out`` plus float32 per-head maps of all tokens (G's pass);
- ``guided``: forward + backward, ``q`` requiring grad, ``out`` receiving a downstream gradient
  and the per-sample L1 loss against a reference map a unit one (E's guidance pass).
- ``train``: capture's forward + backward, ``q``, ``k`` and ``v`` requiring grad, ``out`` receiving a
  downstream gradient and the maps a weighted one (an attention-map loss on a layer whose projections
  are trained, as AttnDreamBooth's regularizer with LoRA on ``to_q``/``to_k``/``to_v``).

Implementations: ``cpp`` (the C++ ops, what ``backend="auto"`` runs on CPU), ``torch`` (the
reference backend: custom autograd Functions that recompute P in the backward), ``compiled``
(the reference's math, ``softmax(scale q k^T)``, ``P V`` and the L1 loss, under
``torch.compile``, inductor, CPU), ``eager`` (the same math uncompiled: autograd keeps P, as
pix2pix-zero does), ``sdpa_recompute`` (SDPA output plus ``softmax(q k^T)`` recomputed for the maps),
``sdpa`` (attention with no maps: the floor) and ``gemms`` (no attention at all: the matrix products
of a recomputing implementation alone, two for capture, five for guided and seven for train, in the
reference's batched form: what those products cost through ``torch.matmul``, which at these shapes
runs well below the machine's peak, so not a bound; the bound is below).

Bound: the matrix products of the pass as the eager reference runs them (it keeps P: two for
capture, four for guided, six for train, ``2 B H M N D`` FLOPs each) at this machine's measured
matrix-product peak (``peak_gflops``: the best rate of large contiguous ``torch.mm`` calls in the
dtype, same thread count), the least time any implementation of the pass can take here. A target of
1.5x the torch reference can only be met where that reference's time / 1.5 is at least the bound.

Time: median of ``--repeats`` perf_counter-timed calls after ``--warmup`` (compilation included in
the warmup). Memory: the peak resident memory a call adds above what was resident before it,
measured in a child process whose glibc returns every large block to the kernel at once
(``MALLOC_MMAP_THRESHOLD_``), with the kernel's high-water mark reset before each call; it is the
working memory of one call (temporaries and what autograd saves), inputs excluded.

    python -m benchmarks.bench_cpu_ops --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.e2e import git_revision, proc_status_bytes, reset_peak_rss, version
from dreamblend.cpu_info import cpu_model
from dreamblend.ops import reference, resolve_backend
from dreamblend.ops.reference import compute_dtype, l1_map_loss

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_ops.jsonl"
TEXT_TOKENS = 77
LAYERS = {  # (M, heads, head dim) of each cross-attention resolution
    "sd15": [(4096, 8, 40), (1024, 8, 80), (256, 8, 160)],
    "sdxl": [(4096, 10, 64), (1024, 20, 64)],
}
IMPLS = ("cpp", "torch", "compiled", "eager", "sdpa_recompute", "sdpa", "gemms")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _math(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The reference semantics in plain torch: output and float32 probabilities."""
    probs = _probs(q, k, scale)
    return torch.matmul(probs, v.to(probs.dtype)).to(q.dtype), probs


def _probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``softmax(scale q k^T)`` in float32 (float64 kept), as the reference computes it."""
    dt = compute_dtype(q)
    return torch.softmax(torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale, dim=-1)


def implementations(kind: str, scale: float) -> dict[str, Callable]:
    """``fn(q, k, v, ref, d_out)`` per implementation: capture returns (out, maps), guided returns dq,
    train (dq, dk, dv)."""
    cpp = resolve_backend("cpp", torch.device("cpu"))
    compiled_math = torch.compile(_math, dynamic=False)

    def guided_via(forward: Callable) -> Callable:
        def step(q, k, v, ref, d_out):
            q = q.detach().requires_grad_(True)
            out, loss = forward(q, k, v, ref)
            # The downstream gradients go in as they are: a ``(out * d_out).sum()`` would time an
            # elementwise product and its backward (0.5-1.6 ms per SD1.5 layer) in every implementation.
            (dq,) = torch.autograd.grad((out, loss), q, (d_out, torch.ones_like(loss)))
            return dq

        return step

    def with_maps(attend: Callable) -> Callable:  # output from ``attend``, maps recomputed
        def forward(q, k, v, ref):
            out = attend(q, k, v)
            return out, l1_map_loss(_probs(q, k, scale), ref, head_mean=False)

        return forward

    def gemms(q, k, v, ref, d_out):  # ``ref``, a (B, H, M, N) probability tensor, stands in for P and dS
        p = ref.to(q.dtype)
        torch.matmul(q, k.transpose(-1, -2))  # scores
        out = torch.matmul(p, v)
        if kind == "capture":
            return out, None
        torch.matmul(d_out, v.transpose(-1, -2))  # dP
        torch.matmul(q, k.transpose(-1, -2))  # the backward's recompute
        dq = torch.matmul(p, k)
        if kind == "guided":
            return dq
        return dq, torch.matmul(p.transpose(-1, -2), q), torch.matmul(p.transpose(-1, -2), d_out)  # dK, dV

    captures = {
        "cpp": lambda q, k, v, ref, d_out: cpp.capture_attention(q, k, v, scale, None, False),
        "torch": lambda q, k, v, ref, d_out: reference.capture_attention(q, k, v, scale, None, False),
        "compiled": lambda q, k, v, ref, d_out: compiled_math(q, k, v, scale),
        "eager": lambda q, k, v, ref, d_out: _math(q, k, v, scale),
        "sdpa_recompute": lambda q, k, v, ref, d_out: (
            F.scaled_dot_product_attention(q, k, v),
            _probs(q, k, scale),
        ),
        "sdpa": lambda q, k, v, ref, d_out: (F.scaled_dot_product_attention(q, k, v), None),
    }
    if kind == "capture":
        return {**captures, "gemms": gemms}
    if kind == "train":

        def trained(capture: Callable) -> Callable:
            def step(q, k, v, ref, d_out):
                q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
                out, maps = capture(q, k, v, ref, d_out)
                # ``ref`` (B, H, M, N) stands in for the maps' gradient; sdpa has no maps to take it.
                outputs, grads = ((out,), (d_out,)) if maps is None else ((out, maps), (d_out, ref))
                return torch.autograd.grad(outputs, (q, k, v), grads)

            return step

        return {**{name: trained(fn) for name, fn in captures.items()}, "gemms": gemms}

    def math_and_loss(q, k, v, ref):
        out, probs = _math(q, k, v, scale)
        return out, l1_map_loss(probs, ref, head_mean=False)

    compiled_guided = torch.compile(math_and_loss, dynamic=False)

    def sdpa_only(q, k, v, ref, d_out):
        q = q.detach().requires_grad_(True)
        (dq,) = torch.autograd.grad((F.scaled_dot_product_attention(q, k, v) * d_out).sum(), q)
        return dq

    return {
        "cpp": guided_via(lambda q, k, v, ref: cpp.guided_attention(q, k, v, ref, scale, None, False)),
        "torch": guided_via(lambda q, k, v, r: reference.guided_attention(q, k, v, r, scale, None, False)),
        "compiled": guided_via(compiled_guided),
        "eager": guided_via(math_and_loss),
        "sdpa_recompute": guided_via(with_maps(F.scaled_dot_product_attention)),
        "sdpa": sdpa_only,
        "gemms": gemms,
    }


def make_problem(m: int, heads: int, d: int, batch: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def processor_layout(length: int) -> Tensor:
        x = torch.randn(batch, length, heads * d, generator=g).to(dtype)
        return x.view(batch, length, heads, d).transpose(1, 2)

    q, k, v = processor_layout(m), processor_layout(TEXT_TOKENS), processor_layout(TEXT_TOKENS)
    ref = torch.softmax(torch.randn(batch, heads, m, TEXT_TOKENS, generator=g), dim=-1)
    d_out = torch.randn(batch, heads, m, d, generator=g).to(dtype)
    return q, k, v, ref, d_out


def cases(args: argparse.Namespace):
    for model in args.models:
        for m, heads, d in LAYERS[model]:
            for batch in args.batch:
                for dtype in args.dtypes:
                    for kind in args.passes:
                        yield model, m, heads, d, batch, dtype, kind


PEAK_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 256, 256))  # (m, k, n) of the peak's products


def pass_flops(kind: str, m: int, heads: int, d: int, batch: int) -> int:
    """FLOPs of the pass's products as the reference runs them: q k^T and P V, then dO V^T and dS K,
    and for train dS^T Q and P^T dO."""
    products = {"capture": 2, "guided": 4, "train": 6}[kind]
    return products * 2 * batch * heads * m * TEXT_TOKENS * d


def matmul_peak_gflops(dtype: torch.dtype, repeats: int = 5) -> float:
    """Best matrix-product rate of this machine in ``dtype`` at the current thread count."""
    best = 0.0
    for m, k, n in PEAK_SHAPES:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        calls = max(2, int(2e9 / (2 * m * k * n)))  # about 2 GFLOP per timing
        for _ in range(2):
            a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                a @ b
            best = max(best, 2 * m * k * n * calls / (time.perf_counter() - start) / 1e9)
    return best


def time_ms(fn: Callable, inputs: tuple, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn(*inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "median_ms": round(statistics.median(times), 4),
        "min_ms": round(min(times), 4),
        "max_ms": round(max(times), 4),
        "repeats": repeats,
        "warmup": warmup,
    }


def peak_bytes(fn: Callable, inputs: tuple) -> int | None:
    """Resident memory one call adds at its peak (kernel high-water mark, reset just before)."""
    before = proc_status_bytes("VmRSS")
    if before is None or not reset_peak_rss():
        return None
    result = fn(*inputs)
    peak = proc_status_bytes("VmHWM")
    del result
    return None if peak is None else max(0, peak - before)


def measure_memory(args: argparse.Namespace) -> dict[tuple, int | None]:
    """Per-call peak memory of every case, from a child with glibc's caching of large blocks off."""
    argv = [sys.executable, "-m", "benchmarks.bench_cpu_ops", "--memory-child"]
    argv += ["--threads", str(args.threads)]
    argv += ["--models", *args.models, "--batch", *map(str, args.batch), "--dtypes", *args.dtypes]
    argv += ["--passes", *args.passes, "--impls", *args.impls]
    env = {**os.environ, **_MEMORY_CHILD_ENV}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(argv, cwd=root, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    table = {}
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            table[tuple(row["case"])] = row["peak_bytes"]
    return table


def memory_child(args: argparse.Namespace) -> None:
    for case in cases(args):
        model, m, heads, d, batch, dtype, kind = case
        inputs = make_problem(m, heads, d, batch, DTYPES[dtype])
        impls = implementations(kind, d**-0.5)
        for name in args.impls:
            impls[name](*inputs)  # compile / first-touch outside the measurement
            impls[name](*inputs)
            row = {"case": [*case, name], "peak_bytes": peak_bytes(impls[name], inputs)}
            print(json.dumps(row), flush=True)


def environment(args: argparse.Namespace) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "device": {"type": "cpu", "name": cpu_model(), "cpu_count": os.cpu_count(), "threads": args.threads},
        "versions": {"torch": torch.__version__, "triton": version("triton")},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.bench_cpu_ops", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(LAYERS), default=["sd15", "sdxl"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32"])
    parser.add_argument(
        "--passes", nargs="+", choices=["capture", "guided", "train"], default=["capture", "guided"]
    )
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child process")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSONL file the records are appended to")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    memory = {} if args.no_memory else measure_memory(args)
    shared = environment(args)
    peaks = {dtype: round(matmul_peak_gflops(DTYPES[dtype]), 1) for dtype in args.dtypes}
    print("matrix-product peak (GFLOPS): " + ", ".join(f"{k} {v}" for k, v in peaks.items()), flush=True)
    for case in cases(args):
        model, m, heads, d, batch, dtype, kind = case
        inputs = make_problem(m, heads, d, batch, DTYPES[dtype])
        impls = implementations(kind, d**-0.5)
        rows = {}
        # Interleaved rounds, so drift on a shared machine spreads over every implementation.
        for name in args.impls:
            impls[name](*inputs)
        per_round = max(1, args.repeats // 3)
        samples: dict[str, list[dict]] = {name: [] for name in args.impls}
        for _ in range(3):
            for name in args.impls:
                samples[name].append(time_ms(impls[name], inputs, args.warmup, per_round))
        for name in args.impls:
            medians = [s["median_ms"] for s in samples[name]]
            rows[name] = {
                "median_ms": round(statistics.median(medians), 4),
                "min_ms": min(s["min_ms"] for s in samples[name]),
                "max_ms": max(s["max_ms"] for s in samples[name]),
                "repeats": 3 * per_round,
                "peak_bytes": memory.get((*case, name)),
            }
        flops = pass_flops(kind, m, heads, d, batch)
        bound = {"gemm_flops": flops, "peak_gflops": peaks[dtype], "ms": round(flops / peaks[dtype] / 1e6, 4)}
        cpp_ms = rows["cpp"]["median_ms"] if "cpp" in rows else None
        line = f"{model} M={m} H={heads} D={d} b{batch} {dtype} {kind}:"
        for name, row in rows.items():
            ratio = f" ({row['median_ms'] / cpp_ms:.2f}x cpp)" if cpp_ms else ""
            mib = "" if row["peak_bytes"] is None else f", +{row['peak_bytes'] / 2**20:.1f} MiB"
            line += f"\n  {name:15s} {row['median_ms']:8.2f} ms{ratio}{mib}"
        line += f"\n  {'bound':15s} {bound['ms']:8.2f} ms (the reference's products at {peaks[dtype]} GFLOPS)"
        if "torch" in rows:
            needed = rows["torch"]["median_ms"] / 1.5
            verdict = "reachable" if needed >= bound["ms"] else "below the bound: out of reach"
            line += f"; 1.5x the torch reference: {needed:.2f} ms, {verdict}"
        print(line, flush=True)
        if not args.no_save:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            with args.output.open("a", encoding="utf-8") as f:
                for name, row in rows.items():
                    record = {
                        **shared,
                        "model": model,
                        "layer": {"M": m, "heads": heads, "head_dim": d, "N": TEXT_TOKENS},
                        "batch": batch,
                        "dtype": dtype,
                        "pass": kind,
                        "impl": name,
                        "bound": bound,
                        **row,
                    }
                    f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
