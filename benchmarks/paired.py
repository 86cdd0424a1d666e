"""Paired rounds: which guided peer steps faster, with a confidence interval, on a machine that drifts.

On a shared few-core VM one peer's guided step spreads 5-15 % from process to process and from step
to step, more than the few percent by which the peers' attention paths differ, and timing each peer
in a block of its own (:mod:`benchmarks.e2e`) lets a slow minute fall on one peer. Here the peers of
one (model, dtype, batch) share one process and G/E pair, in rounds: each round every peer, in an
order rotated round by round, runs ``--settle`` untimed and ``--block`` timed guided steps. A peer's
block median is divided by the reference peer's of the same round; the median of those ratios, a
bootstrap 95 % interval over rounds and the rounds the peer was faster in say which is faster and by
how much. Peak memory is not measured here (one process holds every peer); :mod:`benchmarks.e2e`
measures it one process per configuration.

    python -m benchmarks.paired --models sd15 --dtypes float32 --batches 1 --rounds 12
    python -m benchmarks.paired --models toyworld --dtypes bfloat16 --batches 1 4 --rounds 40 --block 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.e2e import (
    ALL_MODELS,
    DTYPES,
    ROOT,
    build_pair,
    configuration_fields,
    environment,
    summarize,
    time_ms,
)
from benchmarks.models import ModelSpec, make_inputs
from benchmarks.peers import PEERS, UNets, attached
from benchmarks.workloads import Run, middle_step
from dreamblend.ops import cpp, resolved_backend_name

__all__ = ["bootstrap_median_ci", "main", "paired_ratios", "pool_ratios", "rotation"]

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "paired.jsonl"
DEFAULT_PEERS = ("guided_floor", "eager", "sdpa_recompute")
Step = Callable[[], object]


def rotation(peers: Sequence[str], round_index: int) -> list[str]:
    """Round ``round_index``'s order: ``peers`` rotated left by the round number, so every peer
    runs in every position (first after a slow minute, last before one) equally often."""
    shift = round_index % len(peers)
    return [*peers[shift:], *peers[:shift]]


def paired_ratios(blocks: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Per round, a peer's block median over the reference peer's block median of the same round."""
    if len(blocks) != len(reference):
        raise ValueError(f"{len(blocks)} rounds for the peer but {len(reference)} for the reference")
    return [peer / ref for peer, ref in zip(blocks, reference, strict=True)]


def bootstrap_median_ci(values: Sequence[float], resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the median of ``values`` (rounds resampled with
    replacement; a fixed seed so a record can be recomputed from its ratios)."""
    data = torch.tensor(values, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(data), (resamples, len(data)), generator=generator)
    medians = data[picks].quantile(0.5, dim=1)
    low, high = medians.quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.paired", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(ALL_MODELS), default=["toyworld"])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument(
        "--peers",
        nargs="+",
        choices=sorted(name for name, peer in PEERS.items() if peer.workload == "guided"),
        default=list(DEFAULT_PEERS),
        help="guided peers to time beside the reference (default: %(default)s)",
    )
    parser.add_argument(
        "--reference", choices=sorted(PEERS), help="peer the ratios divide by (default: ours, backend auto)"
    )
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--block", type=int, default=1, help="timed steps per peer per round")
    parser.add_argument("--settle", type=int, default=1, help="untimed steps after a peer is installed")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of every peer before round 1")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--budget-s",
        type=float,
        help="start no new round after this many seconds (every configuration still runs 2)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--pool",
        nargs="+",
        metavar="RUN_ID",
        help="measure nothing: pool these runs' ratios (records in --out) per configuration and peer",
    )
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.block < 1 or min(args.settle, args.warmup) < 0 or min(args.batches) < 1:
        parser.error("need --rounds >= 2, --block >= 1, --settle and --warmup >= 0 and positive batches")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.reference is None:
        args.reference = f"ours_{resolved_backend_name('auto', torch.device(args.device))}"
        if args.reference == "ours_torch" and torch.device(args.device).type == "cpu":
            # Auto fell back from the C++ backend: a ranking of the reference, not of what users run.
            print(f"note: the reference is ours_torch: {cpp.UNAVAILABLE_REASON}", file=sys.stderr)
    args.peers = [args.reference, *(name for name in dict.fromkeys(args.peers) if name != args.reference)]
    for name in args.peers:
        reason = PEERS[name].unavailable(torch.device(args.device))
        if reason is not None:
            parser.error(f"peer {name} cannot run on {args.device}: {reason}")
    return args


@contextmanager
def installed(
    name: str, models: UNets, spec: ModelSpec, batch: int, args: argparse.Namespace
) -> Iterator[Step]:
    """Peer ``name`` on G and E, and its step workload (as :mod:`benchmarks.e2e` times it)."""
    peer = PEERS[name]
    with attached(peer, models) as capture:
        latents, cond = make_inputs(models[0], spec, batch, args.guidance_scale, torch.device(args.device))
        yield middle_step(Run(spec, *models, capture, latents, cond, peer.workload))


def run_rounds(
    args: argparse.Namespace, model: str, dtype: str, batch: int, deadline: float
) -> dict[str, list[list[float]]]:
    """Each peer's timed steps (ms), one list per round, every peer's rounds in the same order."""
    device = torch.device(args.device)
    spec = ALL_MODELS[model]
    models, failed = build_pair(spec, DTYPES[dtype], device)
    if models is None:
        raise RuntimeError(f"{model} {dtype}: {failed['error'] if failed else 'not built'}")
    # Every peer untimed first: first calls create oneDNN primitives and fill allocator caches.
    for name in args.peers:
        with installed(name, models, spec, batch, args) as step:
            for _ in range(args.warmup):
                step()
    times: dict[str, list[list[float]]] = {name: [] for name in args.peers}
    for round_index in range(args.rounds):
        if round_index >= 2 and time.monotonic() > deadline:
            print(f"time budget spent after {round_index} rounds", flush=True)
            break
        for name in rotation(args.peers, round_index):
            with installed(name, models, spec, batch, args) as step:
                for _ in range(args.settle):
                    step()
                times[name].append(time_ms(step, args.block, device))
        line = ", ".join(f"{name} {statistics.median(times[name][-1]):.1f}" for name in args.peers)
        print(f"{model} {dtype} b{batch} round {round_index + 1}: {line} ms", flush=True)
    return times


def records(
    args: argparse.Namespace,
    shared: dict[str, Any],
    model: str,
    dtype: str,
    batch: int,
    times: dict[str, list[list[float]]],
) -> list[dict[str, Any]]:
    """One record per peer: the run's ``shared`` fields, its step times' summary and its paired ratio
    to the reference."""
    spec = ALL_MODELS[model]
    device = torch.device(args.device)

    def block_medians(name: str) -> list[float]:
        return [statistics.median(block) for block in times[name]]

    reference = block_medians(args.reference)
    out = []
    for name in args.peers:
        steps = [t for block in times[name] for t in block]
        out.append(
            {
                **shared,
                **configuration_fields(spec, dtype, batch, PEERS[name], args.guidance_scale),
                "workload": "step",
                "rounds": len(reference),
                "block": args.block,
                "settle": args.settle,
                "warmup": args.warmup,
                "order": "rotated",
                "timing": summarize(steps, args.settle, device),
                "blocks_ms": [[round(t, 2) for t in block] for block in times[name]],
                "paired": (
                    None if name == args.reference else paired(block_medians(name), reference, args.reference)
                ),
            }
        )
    return out


def paired(blocks: Sequence[float], reference: Sequence[float], reference_peer: str) -> dict[str, Any]:
    """A peer's per-round ratios to the reference, their median, its 95 % interval, the rounds won."""
    ratios = paired_ratios(blocks, reference)
    low, high = bootstrap_median_ci(ratios)
    return {
        "reference": reference_peer,
        "median_ratio": round(statistics.median(ratios), 5),
        "ci95": [round(low, 5), round(high, 5)],
        "faster_rounds": sum(ratio < 1.0 for ratio in ratios),
        "ratios": [round(ratio, 5) for ratio in ratios],
    }


def describe(record: dict[str, Any]) -> str:
    """One line per record: the median step, and the paired ratio with its interval."""
    text = f"{record['model']} {record['dtype']} b{record['batch']} {record['peer']}: median step "
    text += f"{record['timing']['median_ms']:.1f} ms"
    if (ratio := record["paired"]) is None:
        return text + " (reference)"
    low, high = ratio["ci95"]
    return text + (
        f"; / {ratio['reference']}: {ratio['median_ratio']:.3f} [{low:.3f}, {high:.3f}], "
        f"faster in {ratio['faster_rounds']} of {record['rounds']} rounds"
    )


def pool_ratios(records: Iterable[dict[str, Any]]) -> dict[tuple[Any, ...], tuple[list[float], set[str]]]:
    """Every paired record's per-round ratios, pooled per (threads, model, dtype, batch, peer, reference),
    with the runs they came from."""
    groups: dict[tuple[Any, ...], tuple[list[float], set[str]]] = {}
    for r in records:
        if r["paired"] is not None:
            key = (r["device"].get("threads"), r["model"], r["dtype"], r["batch"], r["peer"])
            ratios, runs = groups.setdefault((*key, r["paired"]["reference"]), ([], set()))
            ratios.extend(r["paired"]["ratios"])
            runs.add(r["run_id"])
    return groups


def pooled(records: Iterable[dict[str, Any]], run_ids: Sequence[str]) -> list[str]:
    """The named runs' ratios pooled per (model, dtype, batch, peer, reference): more rounds than one
    run had time for. The runs must come from one machine at one thread count."""
    runs = [r for r in records if r["run_id"] in run_ids]
    missing = sorted(set(run_ids) - {r["run_id"] for r in runs})
    if missing:
        raise ValueError(f"no records of run(s) {', '.join(missing)}")
    machines = {(r["device"]["name"], r["device"].get("threads")) for r in runs}
    if len(machines) > 1:
        raise ValueError(f"runs from different machines or thread counts do not pool: {sorted(machines)}")
    lines = []
    for (_, model, dtype, batch, peer, reference), (ratios, sources) in pool_ratios(runs).items():
        low, high = bootstrap_median_ci(ratios)
        lines.append(
            f"{model} {dtype} b{batch} {peer} / {reference}, {len(ratios)} rounds "
            f"({len(sources)} runs): "
            f"{statistics.median(ratios):.3f} [{low:.3f}, {high:.3f}], "
            f"{peer} faster in {sum(r < 1.0 for r in ratios)}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pool:
        rows = [json.loads(line) for line in args.out.read_text(encoding="utf-8").splitlines() if line]
        try:
            print("\n".join(pooled(rows, args.pool)))
        except ValueError as exc:
            print(f"benchmarks.paired: {exc}", file=sys.stderr)
            return 2
        return 0
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    deadline = time.monotonic() + (float("inf") if args.budget_s is None else args.budget_s)
    # Read before the rounds: the revision that runs, not the one checked out when they end.
    shared = environment(torch.device(args.device), smoke=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for model in args.models:
            for dtype in args.dtypes:
                for batch in args.batches:
                    times = run_rounds(args, model, dtype, batch, deadline)
                    rows = records(args, shared, model, dtype, batch, times)
                    with args.out.open("a", encoding="utf-8") as f:
                        f.writelines(json.dumps(row) + "\n" for row in rows)
                    for row in rows:
                        print(describe(row), flush=True)
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
