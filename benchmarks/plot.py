"""Draw the end-to-end results: time and peak memory per peer, against batch size and steps.

    python -m benchmarks.plot [results.jsonl ...] [--out DIR]

Reads JSONL records (default ``benchmarks/results/e2e.jsonl``); where a configuration was measured
more than once, the latest record wins. Writes one PNG per model/dtype/workload (grouped bars per
batch size, OOM marked) and one per model/dtype/batch for image length (memory must stay flat).
Uses matplotlib (a core dependency).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IN = ROOT / "benchmarks" / "results" / "e2e.jsonl"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "plots"
GIB = 2**30
Record = dict[str, Any]


def load(paths: Iterable[Path]) -> list[Record]:
    """Every record of every file, the latest one per configuration, in first-seen order."""
    latest: dict[tuple, Record] = {}
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                key = tuple(record[k] for k in ("model", "dtype", "workload", "steps", "batch", "peer"))
                if key not in latest or record["date"] >= latest[key]["date"]:
                    latest[key] = record
    return list(latest.values())


def _groups(records: list[Record], keys: Sequence[str]) -> dict[tuple, list[Record]]:
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for record in records:
        groups[tuple(record[k] for k in keys)].append(record)
    return groups


def _peers(records: list[Record]) -> list[str]:
    return list(dict.fromkeys(r["peer"] for r in records if r["status"] in ("ok", "oom")))


def _title(record: Record) -> str:
    where = f"{record['device']['name']}, {record['git_revision'][:10]}"
    return f"{record['model']} {record['resolution']}px {record['dtype']} ({where})"


def _axes(records: list[Record]) -> tuple[Any, Any, Any | None]:
    """A time panel, plus a memory panel when the device reported memory (CUDA)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    has_memory = any(r["memory"] for r in records)
    fig = Figure(figsize=(13 if has_memory else 7, 4.5))
    axes = fig.subplots(1, 2 if has_memory else 1, squeeze=False)
    return fig, axes[0][0], axes[0][1] if has_memory else None


def _finish(fig: Any, time_ax: Any, mem_ax: Any | None, title: str, path: Path) -> None:
    """One legend for the figure (right of the panels), title, save, close."""
    handles, labels = time_ax.get_legend_handles_labels()
    if mem_ax is not None:
        for handle, label in zip(*mem_ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=120)


def plot_batches(records: list[Record], path: Path) -> None:
    """Grouped bars: one group per batch size, one bar per peer; whiskers span min..max."""
    batches = sorted({r["batch"] for r in records})
    peers = _peers(records)
    by_key = {(r["batch"], r["peer"]): r for r in records}
    fig, time_ax, mem_ax = _axes(records)
    width = 0.8 / max(len(peers), 1)
    for i, peer in enumerate(peers):
        xs, times, low, high, mems, ooms = [], [], [], [], [], []
        for j, batch in enumerate(batches):
            record = by_key.get((batch, peer))
            x = j + (i - (len(peers) - 1) / 2) * width
            if record is None or record["status"] == "unavailable":
                continue
            if record["status"] != "ok":
                ooms.append(x)
                continue
            timing = record["timing"]
            xs.append(x)
            times.append(timing["median_ms"])
            low.append(timing["median_ms"] - timing["min_ms"])
            high.append(timing["max_ms"] - timing["median_ms"])
            mems.append((record["memory"] or {}).get("peak_allocated_bytes", 0) / GIB)
        bars = time_ax.bar(xs, times, width, yerr=[low, high], capsize=2, label=peer)
        color = bars.patches[0].get_facecolor() if bars.patches else None
        for x in ooms:
            for ax in (time_ax, mem_ax):
                if ax is not None:
                    ax.annotate("OOM", (x, 0), rotation=90, ha="center", va="bottom", fontsize=7, color=color)
        if mem_ax is not None:
            mem_ax.bar(xs, mems, width, label=peer, color=color)
    static = [r["memory"]["static_allocated_bytes"] / GIB for r in records if r["memory"]]
    for ax, label in ((time_ax, "time (ms), median, min..max"), (mem_ax, "peak allocated (GiB)")):
        if ax is None:
            continue
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylim(bottom=0)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    if mem_ax is not None and static:
        mem_ax.axhline(min(static), color="gray", linestyle="--", linewidth=1, label="G+E weights, inputs")
    first = records[0]
    what = "one guided step" if first["workload"] == "step" else f"{first['steps']}-step image (UNet loop)"
    _finish(fig, time_ax, mem_ax, f"{_title(first)}: {what}", path)


def plot_steps(records: list[Record], path: Path) -> None:
    """Lines per peer against image length: time should grow linearly, peak memory stay flat."""
    fig, time_ax, mem_ax = _axes(records)
    for peer in _peers(records):
        points = sorted((r["steps"], r) for r in records if r["peer"] == peer and r["status"] == "ok")
        steps = [s for s, _ in points]
        time_ax.plot(steps, [r["timing"]["median_ms"] / 1e3 for _, r in points], marker="o", label=peer)
        if mem_ax is not None:
            peaks = [(r["memory"] or {}).get("peak_allocated_bytes", 0) / GIB for _, r in points]
            mem_ax.plot(steps, peaks, marker="o", label=peer)
    lengths = sorted({r["steps"] for r in records})
    for ax, label in ((time_ax, "time per image batch (s)"), (mem_ax, "peak allocated (GiB)")):
        if ax is not None:
            ax.set_xticks(lengths)
            ax.set_ylim(bottom=0)
            ax.set_xlabel("denoising steps")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    _finish(fig, time_ax, mem_ax, f"{_title(records[0])}: batch {records[0]['batch']}, against steps", path)


def plot_all(records: list[Record], out: Path) -> list[Path]:
    """Write every figure the records support; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (model, dtype, workload, steps), group in _groups(
        records, ("model", "dtype", "workload", "steps")
    ).items():
        name = f"{model}_{dtype}_{workload}" + ("" if workload == "step" else f"_{steps}steps") + ".png"
        plot_batches(group, out / name)
        written.append(out / name)
    images = [r for r in records if r["workload"] == "image"]
    for (model, dtype, batch), group in _groups(images, ("model", "dtype", "batch")).items():
        if len({r["steps"] for r in group}) > 1:
            name = f"{model}_{dtype}_b{batch}_steps.png"
            plot_steps(group, out / name)
            written.append(out / name)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.plot", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", type=Path, default=[DEFAULT_IN])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for path in plot_all(load(args.results), args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
