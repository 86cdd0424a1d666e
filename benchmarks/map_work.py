"""The attention-map work of one guided step, from the op benchmark's records: how far apart the guided
peers can be end to end at most, before the rest of the step (which every peer shares) is counted.

A guided step runs, per cross-attention layer, one capture (G's conditional maps) and one guided
forward + backward (E's conditional pass against them); everything else (convolutions, linear
layers, self-attention, the CFG passes) is the same for every peer. So the sum over the UNet's
cross-attention layers of ``bench_cpu_ops``'s capture + guided medians, per implementation, is what
separates the peers' steps, and its difference to ours is the end-to-end margin the op can give.
Layers whose shape the records lack are listed, not guessed.

    python -m benchmarks.map_work --model sd15 --revision e8b18f4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from benchmarks.bench_cpu_ops import RESULTS
from benchmarks.models import MODELS, ModelSpec
from dreamblend.store import is_cross_attention

__all__ = ["cross_attention_layers", "main", "map_work"]

Shape = tuple[int, int, int]  # (M query positions, heads, head dim)


def cross_attention_layers(spec: ModelSpec) -> Counter[Shape]:
    """How many cross-attention layers of each (M, heads, head dim) the model's UNet has at its
    resolution. The UNet is built on the meta device (no memory); M follows from the block a layer
    sits in: down block i and up block len - 1 - i work at the latent size / 2^i."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec.config())
    latent = spec.resolution // spec.vae_scale_factor
    levels = len(unet.down_blocks)
    counts: Counter[Shape] = Counter()
    for name, module in unet.named_modules():
        if not is_cross_attention(module):
            continue
        block, index = name.split(".")[:2]
        if block == "down_blocks":
            level = int(index)
        elif block == "up_blocks":
            level = levels - 1 - int(index)
        else:  # the mid block, at the lowest resolution
            level = levels - 1
        side = latent // 2**level
        heads = module.heads
        counts[(side * side, heads, module.inner_dim // heads)] += 1
    return counts


def map_work(
    records: Iterable[dict[str, Any]], layers: Counter[Shape]
) -> tuple[dict[str, float], list[Shape]]:
    """Per implementation, the sum over ``layers`` of its capture + guided median (ms), from records
    of one machine, revision, dtype, batch and thread count; and the layer shapes no record covers.
    An implementation missing a pass at a covered shape is left out."""
    times: dict[tuple[str, Shape], dict[str, float]] = {}
    for r in records:
        shape = (r["layer"]["M"], r["layer"]["heads"], r["layer"]["head_dim"])
        times.setdefault((r["impl"], shape), {})[r["pass"]] = r["median_ms"]
    covered = {shape for _, shape in times}
    missing = sorted(shape for shape in layers if shape not in covered)
    totals: dict[str, float] = {}
    for impl in sorted({impl for impl, _ in times}):
        rows = [(layers[shape], times.get((impl, shape), {})) for shape in layers if shape in covered]
        if all({"capture", "guided"} <= passes.keys() for _, passes in rows):
            totals[impl] = sum(count * (passes["capture"] + passes["guided"]) for count, passes in rows)
    return totals, missing


def select(
    records: Iterable[dict[str, Any]],
    model: str,
    revision: str,
    dtype: str,
    batch: int,
    threads: int,
    machine: str | None = None,
) -> list[dict[str, Any]]:
    """The records of one run configuration (revision by prefix, machine by CPU name); the latest
    record per (impl, shape, pass) wins, so a rerun replaces the earlier one. Records of one revision
    from several machines are refused unless ``machine`` picks one: their times do not add up."""
    chosen: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if (
            r.get("model") == model
            and str(r.get("git_revision", "")).startswith(revision)
            and r.get("dtype") == dtype
            and r.get("batch") == batch
            and r["device"].get("threads") == threads
            and (machine is None or r["device"].get("name") == machine)
        ):
            chosen[(r["impl"], r["layer"]["M"], r["layer"]["heads"], r["layer"]["head_dim"], r["pass"])] = r
    machines = sorted({str(r["device"].get("name")) for r in chosen.values()})
    if len(machines) > 1:
        raise ValueError(
            f"records of revision {revision!r} come from several machines {machines}; pick one with --machine"
        )
    return list(chosen.values())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.map_work", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--revision", required=True, help="git revision (prefix) of the op records")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--machine", help="CPU name of the records (device.name) where several machines ran one revision"
    )
    parser.add_argument("--records", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    layers = cross_attention_layers(MODELS[args.model])
    records = [json.loads(line) for line in args.records.read_text().splitlines() if line.strip()]
    print(f"{args.model} cross-attention layers (M, heads, head dim): {dict(sorted(layers.items()))}")
    found = False
    for dtype in args.dtypes:
        try:
            chosen = select(records, args.model, args.revision, dtype, args.batch, args.threads, args.machine)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        totals, missing = map_work(chosen, layers)
        if not totals:
            continue
        found = True
        ours = totals.get("cpp")
        row = ", ".join(
            f"{impl} {ms:.1f}" + ("" if ours is None or impl == "cpp" else f" ({ms - ours:+.1f})")
            for impl, ms in sorted(totals.items(), key=lambda item: item[1])
        )
        print(f"{dtype} b{args.batch}, {args.threads} threads: map work per guided step, ms (vs cpp): {row}")
        if missing:
            print(f"  not in the records (left out of the sums): {missing}")
    if not found:
        print(
            f"no op records of {args.model} at revision {args.revision!r} with that batch and thread count",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
