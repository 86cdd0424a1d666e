"""How fast the C++ op's float32 tile products can run: oneDNN's micro-kernel at the op's shapes.

The op computes, per tile of 256 query rows and per head, ``S = q k^T`` (256 x D by D x 77) and
``O = P V`` (256 x 77 by 77 x D) through ATen's ``cpublas::brgemm``, as ``BrgemmProducts`` in
``csrc/attention_ops.cpp`` calls it (row strides as the processor's layout gives them: q rows
``H * D`` apart, ``P`` rows 77 apart; ``k^T`` is zero-padded to 80 columns, so S comes out 80 wide, and
its rate counts the 77 useful columns). This times those calls alone, over the heads of one
SD1.5 / SDXL layer, and the same products as the torch reference runs them (batched ``torch.matmul``
over the heads) and one large ``torch.mm`` (1024^3), on one thread. Where the micro-kernel already
runs at the large product's rate, a float32 op that must do these products cannot get faster by
running them differently; only less arithmetic would help.

Compiles a small C++ extension on first use (about a minute).

    python -m benchmarks.product_rate
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

from benchmarks.bench_cpu_ops import LAYERS, TEXT_TOKENS, environment

RESULTS = Path(__file__).resolve().parent / "results" / "product_rate.jsonl"
TILE_ROWS = 256  # kTileRows in csrc/attention_ops.cpp
SCORE_COLUMNS = 16  # BrgemmProducts::score_ld(): S and dP rows are N rounded up to this

_SOURCE = r"""
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>
#include <chrono>

// GFLOPS of `reps` sweeps over `heads` calls C (M x N, ldc) = A (M x K, lda) B (K x N, ldb), head h reading
// A and B at offsets h * a_head and h * b_head, as the op's tile loop calls the micro-kernel.
double brgemm_rate(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, int64_t a_head,
                   int64_t b_head, int64_t heads, int64_t reps) {
  auto a = torch::randn({(heads - 1) * a_head + M * lda}), b = torch::randn({(heads - 1) * b_head + K * ldb});
  auto c = torch::empty({M * ldc});
  const float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
  float* pc = c.data_ptr<float>();
  auto sweep = [&] {
    for (int64_t h = 0; h < heads; ++h) {
      at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, false, pa + h * a_head, pb + h * b_head, pc);
    }
  };
  sweep();
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < reps; ++i) sweep();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  at::native::cpublas::brgemm_release(false);
  return 2.0 * M * N * K * heads * reps / s / 1e9;
}
"""


def best_rate(fn: Callable[[], float], tries: int = 5) -> float:
    return max(fn() for _ in range(tries))


def matmul_rate(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    torch.matmul(a, b)
    start = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    flops = 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * a[..., 0, 0].numel()
    return flops * reps / (time.perf_counter() - start) / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.product_rate", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ext = load_inline("dreamblend_product_rate", cpp_sources=[_SOURCE], functions=["brgemm_rate"])
    shared = environment(args)
    big = torch.randn(1024, 1024)
    large = best_rate(lambda: matmul_rate(big, big, 10))
    print(f"torch.mm 1024^3: {large:.1f} GFLOPS ({args.threads} thread(s))")
    records = []
    for model, layers in LAYERS.items():
        for m, heads, d in layers:
            n = TEXT_TOKENS
            wide = -(-n // SCORE_COLUMNS) * SCORE_COLUMNS
            q, k = torch.randn(heads, m, d), torch.randn(heads, n, d)
            p, v = torch.softmax(torch.randn(heads, m, n), -1), torch.randn(heads, n, d)
            # (M, N, K, lda, ldb, ldc, A and B head offsets) of the op's call per tile and head, and the
            # useful share of its columns: q and v rows H * D apart, k^T transposed per head into `wide`
            # columns, P a (rows, N) tile; and the reference's batched operands.
            products = {
                "q k^T": (
                    (TILE_ROWS, wide, d, heads * d, wide, wide, d, d * wide),
                    n / wide,
                    (q, k.transpose(-1, -2)),
                ),
                "P V": ((TILE_ROWS, d, n, n, heads * d, heads * d, TILE_ROWS * n, d), 1.0, (p, v)),
            }
            for name, (shape, useful, (a, b)) in products.items():
                brgemm = useful * best_rate(
                    lambda shape=shape, h=heads: ext.brgemm_rate(*shape, h, args.reps)
                )
                batched = best_rate(lambda a=a, b=b: matmul_rate(a, b, max(2, args.reps // 10)))
                print(
                    f"{model} M={m} H={heads} D={d} {name}: brgemm {brgemm:.1f}, "
                    f"torch.matmul {batched:.1f} GFLOPS"
                )
                records.append(
                    {
                        **shared,
                        "model": model,
                        "layer": {"M": m, "heads": heads, "head_dim": d, "N": n},
                        "product": name,
                        "tile_rows": TILE_ROWS,
                        "brgemm_gflops": round(brgemm, 1),
                        "matmul_gflops": round(batched, 1),
                        "mm_1024_gflops": round(large, 1),
                    }
                )
    if not args.no_save:
        with args.output.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
