"""Compile the kernels for a GPU target without a GPU: ``python aot_compile.py < jobs.json``.

Each job names a kernel (and its module under ``dreamblend.kernels``, ``cross_attention`` unless
given), the input dtype, its constexprs and launch options (as the launchers build them) and a
compute capability; the script prints one JSON result per job: shared memory from the compiled
metadata, the cubin size, or the compile error. It runs as a subprocess
because compiling needs triton in compiled mode, while CPU test processes import it interpreted.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

DATA_ARGS = {"q_ptr", "k_ptr", "v_ptr", "out_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}
"""Pointer arguments in the input dtype; ``tok_ptr`` is int64, every other pointer fp32."""
TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def signature(fn, dtype: str, constexprs: dict) -> dict[str, str]:
    """Argument types as the launcher's calls produce them (strides and sizes as i32)."""
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name == "tok_ptr":
            types[name] = "*i64"
        elif name.endswith("_ptr"):
            types[name] = f"*{TRITON_DTYPES[dtype]}" if name in DATA_ARGS else "*fp32"
        elif name.startswith("scale"):
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def compile_job(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(f"dreamblend.kernels.{job.get('module', 'cross_attention')}")
    fn = getattr(module, job["kernel"])
    types = signature(fn, job["dtype"], job["constexprs"])
    # torch allocations are 16-byte aligned: the launch-time specialization a GPU run sees.
    pointers = [i for i, name in enumerate(fn.arg_names) if types[name].startswith("*")]
    aligned = {(i,): [["tt.divisibility", 16]] for i in pointers}
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn, types, job["constexprs"], aligned),
            target=GPUTarget("cuda", job["cap"], 32),
            options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]},
        )
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "shared": compiled.metadata.shared,
        "cubin_bytes": len(compiled.asm.get("cubin", b"")),
        "seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    jobs = json.load(sys.stdin)
    json.dump([compile_job(job) for job in jobs], sys.stdout)


if __name__ == "__main__":
    main()
