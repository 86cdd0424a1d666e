"""The CPU performance targets, checked against one machine's records of the code checked out.

Three tables, each from the committed result files, so that whether a target is met is computed
from records rather than tallied by hand:

- **op** (``cpu_ops.jsonl``): per layer, dtype, pass and thread count, the C++ op against the torch
  reference (target: at least 1.5x faster), against the reference under ``torch.compile`` (no slower)
  and their peak memory (ours lower);
- **ranking** (``paired.jsonl``): per model, dtype and batch, every guided peer's step over ours in
  paired rounds, pooled over the selected runs: ours is ahead where the 95 % interval of the median
  ratio lies above 1, behind where it lies below, unresolved otherwise; the guided floor's ratio is
  how close ours is to the compute floor;
- **memory** (``e2e.jsonl``, isolated CPU processes): ours' peak resident memory against every other
  guided peer's, over all their processes (target: ours the lowest in every one), and the same for the
  most tensor memory a step holds (``benchmarks.tensor_peak``), which does not move between processes.

Records count only where they measured this checkout's code: a record's revision must be a commit
whose ops, guided-step modules, C++ and harness sources are identical to the working tree's
(``MEASURED_CODE``; docs, result files and the rest of the library may differ), and records marked
``+dirty`` are left out. ``--revisions`` names revisions instead (prefixes; their ``+dirty`` records
count: records taken before the harness stopped counting its own result files as a change).

    python -m benchmarks.cpu_targets                   # this machine's CPU
    python -m benchmarks.cpu_targets --machine "Intel(R) Xeon(R) Processor" --revisions 2d8f890
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.e2e import ROOT
from benchmarks.paired import bootstrap_median_ci, pool_ratios
from benchmarks.peers import PEERS
from dreamblend.cpu_info import cpu_model
from dreamblend.ops import resolved_backend_name

__all__ = ["main", "matching_revisions", "memory_rows", "op_rows", "ranking_rows"]

RESULTS = ROOT / "benchmarks" / "results"
# What a record depends on: the ops (C++ and Triton sources included), the processor, store and sampler a
# guided step runs, the toy model, the build, and the harness modules that build, time and measure the
# workloads.
# A revision that differs from the working tree here measured other code; one that differs elsewhere
# (commands, web app, JeDi, docs) did not.
MEASURED_CODE = (
    "dreamblend/ops",
    "dreamblend/processor.py",
    "dreamblend/store.py",
    "dreamblend/pipelines",
    "dreamblend/toyworld",
    "kernels",
    "csrc",
    "setup.py",
    "pyproject.toml",
    "benchmarks/bench_cpu_ops.py",
    "benchmarks/e2e.py",
    "benchmarks/models.py",
    "benchmarks/paired.py",
    "benchmarks/peers.py",
    "benchmarks/tensor_peak.py",
    "benchmarks/workloads.py",
)
OP_SPEEDUP = 1.5  # over the torch reference
MIB = 2**20
MEMORY_RESOLUTION = 0.1 * MIB  # op peaks closer than the tables print are called equal
GIB = 2**30
Row = dict[str, Any]


def read_records(path: Path) -> list[Row]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def matching_revisions(
    revisions: Iterable[str], root: Path = ROOT, paths: Sequence[str] = MEASURED_CODE
) -> set[str]:
    """The revisions whose ``paths`` are identical to the working tree's (unknown commits and ``+dirty``
    ones excluded)."""
    same = set()
    for revision in set(revisions):
        if revision.endswith("+dirty"):
            continue
        diff = subprocess.run(
            ["git", "-C", str(root), "diff", "--quiet", revision, "--", *paths],
            capture_output=True,
        )
        if diff.returncode == 0:
            same.add(revision)
    return same


def selected(
    records: Iterable[Row], machine: str, revisions: Sequence[str], exact: bool = False
) -> list[Row]:
    """Records of ``machine`` (CPU name) whose revision is one of ``revisions`` (``exact``) or starts with
    one of them (so a named revision also takes its ``+dirty`` records)."""

    def wanted(revision: str) -> bool:
        return revision in revisions if exact else any(revision.startswith(rev) for rev in revisions)

    return [
        r
        for r in records
        if r["device"].get("type", "cpu") == "cpu"
        and r["device"].get("name") == machine
        and wanted(str(r.get("git_revision", "")))
    ]


def _memory_verdict(ours: int | None, others: Sequence[int | None]) -> str:
    known = [b for b in others if b is not None]
    if ours is None or not known:
        return "not measured"
    least = min(known)
    if ours < least - MEMORY_RESOLUTION:
        return "lower"
    return "equal" if ours <= least + MEMORY_RESOLUTION else "higher"


def op_rows(records: Iterable[Row]) -> list[Row]:
    """One row per (threads, model, layer, batch, dtype, pass) with a C++ record: its ratios to the torch
    and compiled references and whether each target is met. Ratios come from one invocation (the newest
    with a C++ record; an invocation's records share their ``date``), never from runs minutes apart."""
    runs: dict[tuple, dict[str, dict[str, Row]]] = {}
    for r in records:
        layer = r["layer"]
        case = (r["device"].get("threads"), r["model"], layer["M"], layer["heads"], layer["head_dim"])
        case += (r["batch"], r["dtype"], r["pass"])
        runs.setdefault(case, {}).setdefault(r.get("date", ""), {})[r["impl"]] = r
    cases = {}
    for case, by_date in runs.items():
        with_cpp = [date for date, impls in by_date.items() if "cpp" in impls]
        if with_cpp:
            cases[case] = by_date[max(with_cpp)]
    rows = []
    for case, impls in sorted(cases.items(), key=lambda item: tuple(map(str, item[0]))):
        cpp = impls["cpp"]
        torch_ratio = impls["torch"]["median_ms"] / cpp["median_ms"] if "torch" in impls else None
        compiled_ratio = impls["compiled"]["median_ms"] / cpp["median_ms"] if "compiled" in impls else None
        memory = _memory_verdict(
            cpp.get("peak_bytes"), [impls[n].get("peak_bytes") for n in ("torch", "compiled") if n in impls]
        )
        threads, model, m, heads, d, batch, dtype, kind = case
        rows.append(
            {
                "threads": threads,
                "case": f"{model} {m}, {heads}, {d}, b{batch}, {dtype}, {kind}",
                "cpp_ms": cpp["median_ms"],
                "torch_ratio": torch_ratio,
                "compiled_ratio": compiled_ratio,
                "memory": memory,
                "met": (
                    torch_ratio is not None
                    and torch_ratio >= OP_SPEEDUP
                    and compiled_ratio is not None
                    and compiled_ratio >= 1.0
                    and memory in ("lower", "equal")
                ),
                "revision": cpp["git_revision"][:7],
            }
        )
    return rows


def ranking_rows(records: Iterable[Row]) -> list[Row]:
    """Every peer's paired ratios to ours pooled per (threads, model, dtype, batch, peer, reference)."""
    rows = []
    for key, (ratios, runs) in sorted(
        pool_ratios(records).items(), key=lambda item: tuple(map(str, item[0]))
    ):
        threads, model, dtype, batch, peer, reference = key
        low, high = bootstrap_median_ci(ratios)
        if peer == "guided_floor":
            verdict = "compute floor"
        else:
            verdict = "ours ahead" if low > 1.0 else "ours behind" if high < 1.0 else "not resolved"
        rows.append(
            {
                "threads": threads,
                "case": f"{model} {dtype} b{batch}",
                "peer": peer,
                "reference": reference,
                "rounds": len(ratios),
                "runs": len(runs),
                "median": statistics.median(ratios),
                "ci95": (low, high),
                "verdict": verdict,
            }
        )
    return rows


def memory_rows(records: Iterable[Row], ours: str) -> list[Row]:
    """Per (threads, model, dtype, batch): ours' peak RSS range over its isolated processes against every
    other guided peer's (the guided floor, which takes no maps, is not a peer), and the same for the
    step's tensor peak where the records have it."""
    groups: dict[tuple, dict[str, dict[str, list[int]]]] = {}
    for r in records:
        memory = r.get("memory") or {}
        if r.get("status") != "ok" or r.get("workload") != "step" or memory.get("source") != "peak_rss":
            continue
        key = (r["device"].get("threads"), r["model"], r["dtype"], r["batch"])
        peer = groups.setdefault(key, {}).setdefault(r["peer"], {"rss": [], "tensors": []})
        peer["rss"].append(memory["peak_allocated_bytes"])
        if "step_tensor_peak_bytes" in memory:
            peer["tensors"].append(memory["step_tensor_peak_bytes"])
    rows = []
    for key, peaks in sorted(groups.items(), key=lambda item: tuple(map(str, item[0]))):
        if ours not in peaks:
            continue
        others = {
            peer: values
            for peer, values in sorted(peaks.items())
            if peer != ours and peer != "guided_floor" and peer in PEERS and PEERS[peer].workload == "guided"
        }
        if not others:
            continue
        threads, model, dtype, batch = key
        row: Row = {"threads": threads, "case": f"{model} {dtype} b{batch}"}
        for what in ("rss", "tensors"):
            values = {peer: v[what] for peer, v in others.items() if v[what]}
            if not peaks[ours][what] or not values:
                row[what] = None
                continue
            highest = max(peaks[ours][what])
            row[what] = {
                "ours": _span(peaks[ours][what]),
                "others": {peer: _span(v) for peer, v in values.items()},
                "met": all(highest <= min(v) for v in values.values()),
            }
        rows.append(row)
    return rows


def _span(values: list[int]) -> tuple[int, int, int]:
    return min(values), max(values), len(values)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _amount(span: tuple[int, int, int], unit: int) -> str:
    low, high, count = span
    digits = 2 if unit == GIB else 1
    text = f"{low / unit:.{digits}f}" if low == high else f"{low / unit:.{digits}f}-{high / unit:.{digits}f}"
    return f"{text} ({count})"


def _memory_cells(verdict: Row | None, unit: int) -> tuple[str, str, str]:
    """Ours, the others and the verdict for one measure of memory; dashes where it was not recorded."""
    if verdict is None:
        return "-", "-", "-"
    others = ", ".join(f"{peer} {_amount(span, unit)}" for peer, span in verdict["others"].items())
    return _amount(verdict["ours"], unit), others, _yes(verdict["met"])


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def _yes(met: bool) -> str:
    return "yes" if met else "NO"


def format_report(ops: list[Row], ranking: list[Row], memory: list[Row], ours: str) -> str:
    lines = [f"## Op: cpp vs the torch reference (>= {OP_SPEEDUP}x), the compiled one (>= 1x), memory\n"]
    if ops:
        header = (
            "threads",
            "layer (M, heads, D), batch, dtype, pass",
            "cpp ms",
            "torch / cpp",
            "compiled / cpp",
        )
        lines += _table(
            (*header, "memory", "met", "revision"),
            (
                (r["threads"], r["case"], f"{r['cpp_ms']:.2f}", _ratio(r["torch_ratio"]))
                + (_ratio(r["compiled_ratio"]), r["memory"], _yes(r["met"]), r["revision"])
                for r in ops
            ),
        )
        lines.append(f"\n{sum(r['met'] for r in ops)} of {len(ops)} op rows meet every target.")
    else:
        lines.append("No op records of this code on this machine: run `python -m benchmarks.bench_cpu_ops`.")
    lines.append(f"\n## Ranking: paired rounds, peer step / {ours} step (above 1: ours faster)\n")
    if ranking:
        lines += _table(
            (
                "threads",
                "model, dtype, batch",
                "peer",
                "rounds (runs)",
                "median ratio [95 % interval]",
                "verdict",
            ),
            (
                (r["threads"], r["case"], r["peer"], f"{r['rounds']} ({r['runs']})")
                + (f"{r['median']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]", r["verdict"])
                for r in ranking
            ),
        )
        beaten = [r for r in ranking if r["peer"] != "guided_floor"]
        ahead = sum(r["verdict"] == "ours ahead" for r in beaten)
        lines.append(f"\nOurs ahead of {ahead} of {len(beaten)} (configuration, peer) pairs.")
    else:
        lines.append("No paired rounds of this code on this machine: run `python -m benchmarks.paired`.")
    lines.append(f"\n## Memory: isolated processes, {ours} against the other guided peers\n")
    if memory:
        lines += _table(
            (
                "threads",
                "model, dtype, batch",
                f"{ours}: peak RSS, GiB (processes)",
                "others",
                "ours the lowest",
                f"{ours}: step's tensors, MiB",
                "others",
                "ours the lowest",
            ),
            (
                (r["threads"], r["case"]) + _memory_cells(r["rss"], GIB) + _memory_cells(r["tensors"], MIB)
                for r in memory
            ),
        )
    else:
        lines.append(
            "No isolated end-to-end records of this code on this machine: run `python -m benchmarks.e2e`."
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.cpu_targets", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--machine", default=cpu_model(), help="CPU name of the records (default: this CPU's)"
    )
    parser.add_argument(
        "--revisions",
        nargs="+",
        help="revisions (prefixes; +dirty records included) to read (default: those that ran this code)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSONL result files")
    parser.add_argument(
        "--ours",
        default=f"ours_{resolved_backend_name('auto', torch.device('cpu'))}",
        help="our peer in the end-to-end records (default: the backend auto picks here)",
    )
    args = parser.parse_args(argv)
    files = {name: read_records(args.results / f"{name}.jsonl") for name in ("cpu_ops", "paired", "e2e")}
    revisions = args.revisions
    if revisions is None:
        seen = {r.get("git_revision", "") for rows in files.values() for r in rows}
        revisions = sorted(matching_revisions(seen))
        print(f"records of this checkout's code: {len(revisions)} revision(s) {[r[:7] for r in revisions]}")
    ops, paired, e2e = (
        selected(files[name], args.machine, revisions, exact=args.revisions is None)
        for name in ("cpu_ops", "paired", "e2e")
    )
    print(f"machine {args.machine!r}: {len(ops)} op, {len(paired)} paired, {len(e2e)} end-to-end records\n")
    print(format_report(op_rows(ops), ranking_rows(paired), memory_rows(e2e, args.ours), args.ours))
    return 0


if __name__ == "__main__":
    sys.exit(main())
