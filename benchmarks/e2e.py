"""End-to-end DreamBlend benchmark: guided steps and whole images against the peers of DESIGN §6.

Every configuration (model x dtype x workload x batch x peer) runs on one device with the same
inputs, and appends one JSON line (schema: :mod:`benchmarks.schema`) to the results file as soon as
it is measured, so an interrupted run keeps what it finished. A configuration that runs out of
memory is recorded as ``"oom"`` and the run goes on.

On CUDA every configuration runs in this process (the allocator's peak counter is reset per
configuration). On CPU (``--isolate``, the default there outside ``--smoke``) each configuration
runs in a fresh child process that builds G and E itself, so its peak resident memory belongs to
that configuration alone and no peer inherits another's heap or allocator history; two more steps
there, under the profiler, give the most tensor memory a step holds at once
(:mod:`benchmarks.tensor_peak`), which does not move between processes as the RSS does. Where the
machine's speed drifts by more than the peers differ, :mod:`benchmarks.paired` ranks them instead.

    python -m benchmarks.e2e                      # full matrix on the default device
    python -m benchmarks.e2e --smoke              # tiny models on CPU in well under a minute
    python -m benchmarks.e2e --models sd15 --workloads image --steps 10 25 50 --batches 1

``dreamblend bench ARGS`` runs the same from a source checkout.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import UNet2DConditionModel

from benchmarks.models import (
    MODELS,
    SMOKE_MODELS,
    TEXT_TOKENS,
    ModelSpec,
    build_unet,
    make_inputs,
)
from benchmarks.peers import PEERS, Peer, attached
from benchmarks.schema import SCHEMA_VERSION, validate
from benchmarks.tensor_peak import tensor_peak_bytes
from benchmarks.workloads import Run, image, middle_step
from dreamblend.cpu_info import cpu_model
from dreamblend.pipelines.blend import resolve_alpha

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "e2e.jsonl"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ALL_MODELS: dict[str, ModelSpec] = {**MODELS, **SMOKE_MODELS}

# Matrix defaults: the full run, and the smoke run that must exercise every code path quickly.
FULL = {
    "models": list(MODELS),
    "dtypes": ["float16", "bfloat16"],
    "batches": [1, 4, 8],
    "workloads": ["step", "image"],
    "steps": [50],
    "warmup": 3,
    "repeats": 10,
    "image_repeats": 3,
}
SMOKE = {
    "models": list(SMOKE_MODELS),
    "dtypes": ["float32"],
    "batches": [2],
    "workloads": ["step", "image"],
    "steps": [1, 2],
    "warmup": 1,
    "repeats": 1,
    "image_repeats": 1,
    "peers": list(PEERS),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.e2e", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny models, few steps; checks code paths, not speed"
    )
    parser.add_argument(
        "--models", nargs="+", choices=sorted(ALL_MODELS), metavar="MODEL", help=", ".join(ALL_MODELS)
    )
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument(
        "--peers",
        nargs="+",
        choices=sorted(PEERS),
        metavar="PEER",
        help=f"{', '.join(PEERS)}; default: those that run on the device (named ones that cannot are "
        "recorded as unavailable)",
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=["step", "image"],
        help="step: one guided DreamBlend timestep; image: whole UNet loops of --steps steps",
    )
    parser.add_argument("--steps", nargs="+", type=int, help="image lengths (memory must stay flat in steps)")
    parser.add_argument("--warmup", type=int, help="untimed timesteps before timing a configuration")
    parser.add_argument("--repeats", type=int, help="timed repeats of the step workload")
    parser.add_argument("--image-repeats", type=int, help="timed repeats of the image workload")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out", type=Path, help=f"JSONL to append to (default {DEFAULT_OUT.relative_to(ROOT)})"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        help="start no new configuration after this many seconds (results so far stay)",
    )
    parser.add_argument(
        "--fail-fast", action="store_true", help="stop at the first error instead of recording it"
    )
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's; --smoke on CPU: 1)"
    )
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        help="one child process per configuration, recording its peak RSS (default: on for CPU "
        "outside --smoke; CUDA records allocator peaks in-process)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one isolated configuration
    args = parser.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.out is None:
        smoke_dir = Path(tempfile.gettempdir())
        args.out = smoke_dir / f"dreamblend-e2e-smoke-{os.getpid()}.jsonl" if args.smoke else DEFAULT_OUT
    if min(args.batches) < 1 or min(args.steps) < 1 or args.repeats < 1 or args.image_repeats < 1:
        parser.error("batches, steps and repeats must be positive")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.isolate is None:
        args.isolate = torch.device(args.device).type == "cpu" and not args.smoke
    return args


# ------------------------------------------------------------------------------------------- facts


def git_revision() -> str:
    """HEAD of the checkout (``+dirty`` with uncommitted changes outside the result files, which runs
    append to); BENCH_GIT_REVISION overrides."""
    if revision := os.environ.get("BENCH_GIT_REVISION"):
        return revision
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # --no-optional-locks: a status query must not rewrite the index of the checkout
            ["git", "--no-optional-locks", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]
            + ["--", ".", ":(exclude)benchmarks/results"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, smoke: bool) -> dict[str, Any]:
    """Fields shared by every record of this run: what ran where, on which code."""
    cuda = device.type == "cuda"
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": uuid.uuid4().hex[:12],
        "git_revision": git_revision(),
        "smoke": smoke,
        "device": {
            "type": device.type,
            "name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
            "total_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
            "cpu_count": os.cpu_count() or 1,
            "threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": version("triton"),
            "diffusers": diffusers.__version__,
            "cuda": torch.version.cuda,
        },
    }


# ------------------------------------------------------------------------------------------- measuring


def time_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Time of each call: CUDA events on a GPU (synchronized per call), perf_counter on CPU."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def summarize(times_ms: Sequence[float], warmup: int, device: torch.device) -> dict[str, Any]:
    """Median and spread (min/max and interquartile range) of the timed repeats."""
    quantiles = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    low, p25, median, p75, high = torch.tensor(times_ms, dtype=torch.float64).quantile(quantiles).tolist()
    return {
        "median_ms": round(median, 4),
        "min_ms": round(low, 4),
        "max_ms": round(high, 4),
        "p25_ms": round(p25, 4),
        "p75_ms": round(p75, 4),
        "warmup": warmup,
        "repeats": len(times_ms),
        "timer": "cuda_events" if device.type == "cuda" else "perf_counter",
    }


def _weight_bytes(unet: UNet2DConditionModel) -> int:
    return sum(t.numel() * t.element_size() for t in (*unet.parameters(), *unet.buffers()))


def proc_status_bytes(field: str) -> int | None:
    """``VmRSS``/``VmHWM`` of this process from /proc (Linux), in bytes; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Restart the kernel's resident-set high-water mark (VmHWM) at the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def release(device: torch.device) -> None:
    """Return a finished configuration's memory (hook closures form cycles) so the next starts clean."""
    if device.type == "cuda":  # on CPU nothing is measured, and a full collection costs ~0.5 s
        gc.collect()
        torch.cuda.empty_cache()


def measure(
    peer: Peer,
    models: tuple[UNet2DConditionModel, UNet2DConditionModel],
    spec: ModelSpec,
    batch: int,
    workload: str,
    steps: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Time and peak memory of one configuration (the status/timing/memory fields of a record)."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    with attached(peer, models) as capture:
        latents, cond = make_inputs(models[0], spec, batch, args.guidance_scale, device)
        run = Run(spec, *models, capture, latents, cond, peer.workload)
        one_step = middle_step(run)

        def one_image() -> object:
            return image(run, steps)

        static = torch.cuda.memory_allocated(device) if cuda else 0
        # CPU, one configuration per process: the peak RSS from here on is this configuration's
        # (both UNets' weights and the inputs, which are resident now, plus what the steps need).
        track_rss = not cuda and args.worker and reset_peak_rss()
        if track_rss:
            static = proc_status_bytes("VmRSS") or 0
        for _ in range(args.warmup):  # compiles, autotunes and fills allocator caches at these shapes
            one_step()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        repeats = args.repeats if workload == "step" else args.image_repeats
        times = time_ms(one_step if workload == "step" else one_image, repeats, device)
        timing = summarize(times, args.warmup, device)
        rss_peak = proc_status_bytes("VmHWM") if track_rss else None
        # After the RSS peak is read: the profiler's own memory is not the configuration's.
        # (Two more steps, the second measured.)
        tensor_peak = tensor_peak_bytes(one_step) if rss_peak is not None and workload == "step" else None
    memory = None
    if cuda:
        memory = {
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "static_allocated_bytes": static,
            "unet_weight_bytes": _weight_bytes(models[0]),
            "source": "cuda_allocator",
        }
    elif rss_peak is not None:
        memory = {
            "peak_allocated_bytes": rss_peak,
            "static_allocated_bytes": static,
            "unet_weight_bytes": _weight_bytes(models[0]),
            "source": "peak_rss",
        }
        if tensor_peak is not None:
            memory["step_tensor_peak_bytes"] = tensor_peak
    images_per_s = batch * 1e3 / timing["median_ms"] if workload == "image" else None
    return {"status": "ok", "error": None, "timing": timing, "memory": memory, "images_per_s": images_per_s}


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


def not_measured(status: str, error: str) -> dict[str, Any]:
    return {"status": status, "error": error, "timing": None, "memory": None, "images_per_s": None}


def guarded(run: Callable[[], dict[str, Any]], fail_fast: bool) -> dict[str, Any]:
    """``run()``'s fields, or an ``oom``/``error`` status so one failure does not end the run."""
    try:
        return run()
    except torch.OutOfMemoryError as exc:
        return not_measured("oom", _first_line(exc))
    except Exception as exc:
        if fail_fast:
            raise
        traceback.print_exc()
        return not_measured("error", f"{type(exc).__name__}: {exc}"[:500])


# ------------------------------------------------------------------------------------------- running


def configurations(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(workload, steps) pairs in run order: single steps first, then images by length."""
    pairs = [("step", 1)] if "step" in args.workloads else []
    return pairs + [("image", n) for n in args.steps if "image" in args.workloads]


def configuration_fields(
    spec: ModelSpec, dtype: str, batch: int, peer: Peer, guidance_scale: float
) -> dict[str, Any]:
    """What a record says about its configuration besides the workload: model, sizes, dtype, batch,
    peer, guidance (``date`` is the time the record is made)."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": spec.name,
        "resolution": spec.resolution,
        "latent_size": spec.config()["sample_size"],
        "text_tokens": TEXT_TOKENS,
        "dtype": dtype,
        "batch": batch,
        "peer": peer.name,
        "backend": peer.backend,
        "guidance_scale": guidance_scale,
        "alpha": resolve_alpha(None, spec.prediction_type),
    }


def describe(record: dict[str, Any]) -> str:
    """One progress line per record."""
    length = "" if record["workload"] == "step" else f" x{record['steps']}"
    where = f"{record['model']} {record['dtype']} b{record['batch']} {record['workload']}{length}"
    where += f" {record['peer']}"
    if record["status"] != "ok":
        return f"{where}: {record['status']} ({record['error']})"
    timing, memory = record["timing"], record["memory"]
    text = f"{where}: {timing['median_ms']:.1f} ms [{timing['min_ms']:.1f}, {timing['max_ms']:.1f}]"
    if memory:
        what = "RSS" if memory.get("source") == "peak_rss" else ""
        text += f", peak {what} {memory['peak_allocated_bytes'] / 2**30:.2f} GiB".replace("  ", " ")
        if "step_tensor_peak_bytes" in memory:
            text += f", step's tensors {memory['step_tensor_peak_bytes'] / 2**20:.1f} MiB"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the matrix; exit status 1 if any configuration failed with an error (OOM is a result)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.smoke and args.device == "cpu":
        # Speed is not measured here; one thread avoids OpenMP workers spinning on a busy CI machine.
        torch.set_num_threads(1)
    try:
        return run_worker(args) if args.worker else run_matrix(args)
    finally:
        torch.set_num_threads(threads)


def build_pair(
    spec: ModelSpec, dtype: torch.dtype, device: torch.device
) -> tuple[tuple[UNet2DConditionModel, UNet2DConditionModel] | None, dict[str, Any] | None]:
    """G and E (different seeds: two checkpoints of one architecture, both resident), or, when they
    do not fit on the device, the ``oom`` fields every configuration of this model and dtype records."""
    try:
        return (build_unet(spec, 0, dtype, device), build_unet(spec, 1, dtype, device)), None
    except torch.OutOfMemoryError as exc:
        release(device)
        return None, not_measured("oom", f"building G and E: {_first_line(exc)}")


_WORKER_RESULT = "e2e-worker-result: "


def run_worker(args: argparse.Namespace) -> int:
    """``--worker``: build G and E, measure the one configuration named by ``args``, print its fields."""
    device = torch.device(args.device)
    spec = ALL_MODELS[args.models[0]]
    (workload, steps), batch, peer = configurations(args)[0], args.batches[0], PEERS[args.peers[0]]
    models, fields = build_pair(spec, DTYPES[args.dtypes[0]], device)
    if models is not None:
        fields = guarded(partial(measure, peer, models, spec, batch, workload, steps, args), args.fail_fast)
    print(_WORKER_RESULT + json.dumps(fields), flush=True)
    return 0


def isolated(
    args: argparse.Namespace, model: str, dtype: str, workload: str, steps: int, batch: int, peer: str
) -> dict[str, Any]:
    """One configuration's fields, measured by a fresh ``--worker`` process."""
    argv = [sys.executable, "-m", "benchmarks.e2e", "--worker", "--models", model, "--dtypes", dtype]
    argv += ["--workloads", workload, "--steps", str(steps), "--batches", str(batch), "--peers", peer]
    argv += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    argv += ["--image-repeats", str(args.image_repeats), "--guidance-scale", str(args.guidance_scale)]
    argv += ["--device", args.device, "--threads", str(torch.get_num_threads()), "--out", os.devnull]
    if args.fail_fast:
        argv.append("--fail-fast")
    env = {**os.environ, "BENCH_GIT_REVISION": git_revision()}
    result = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith(_WORKER_RESULT)]
    if result.returncode != 0 or not lines:
        # A worker killed for memory (SIGKILL from the kernel's OOM killer) ran out of memory.
        status = "oom" if result.returncode == -9 else "error"
        return not_measured(status, f"worker process exited with status {result.returncode}")
    return json.loads(lines[-1][len(_WORKER_RESULT) :])


def run_matrix(args: argparse.Namespace) -> int:
    """Measure and append every configuration of ``args``; 1 if any of them failed with an error."""
    device = torch.device(args.device)
    if args.peers:
        peers = [PEERS[name] for name in args.peers]
    else:
        peers = [peer for peer in PEERS.values() if peer.unavailable(device) is None]
    shared = environment(device, args.smoke)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + (float("inf") if args.budget_s is None else args.budget_s)
    errors = 0
    print(f"appending to {args.out}", flush=True)
    for model_name, dtype_name in itertools.product(args.models, args.dtypes):
        spec = ALL_MODELS[model_name]
        # Isolated configurations build their own models in their worker processes.
        models, failed = (None, None) if args.isolate else build_pair(spec, DTYPES[dtype_name], device)
        for (workload, steps), batch, peer in itertools.product(configurations(args), args.batches, peers):
            if time.monotonic() > deadline:
                print("time budget spent: stopping before the next configuration", flush=True)
                return int(errors > 0)
            reason = peer.unavailable(device)
            if reason is not None:
                fields = not_measured("unavailable", reason)
            elif failed is not None:
                fields = failed
            elif args.isolate:
                fields = isolated(args, model_name, dtype_name, workload, steps, batch, peer.name)
            else:
                run = partial(measure, peer, models, spec, batch, workload, steps, args)
                fields = guarded(run, args.fail_fast)
                release(device)
            record = {
                **shared,
                **configuration_fields(spec, dtype_name, batch, peer, args.guidance_scale),
                "workload": workload,
                "steps": steps,
                **fields,
            }
            validate(record)
            with args.out.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            errors += record["status"] == "error"
            print(describe(record), flush=True)
        del models
        release(device)
    return int(errors > 0)


if __name__ == "__main__":
    sys.exit(main())
