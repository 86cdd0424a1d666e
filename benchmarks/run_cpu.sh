#!/usr/bin/env bash
# The CPU performance protocol in one command: the op against its references, the tile products'
# rate, the end-to-end memory of every guided peer in isolated processes, the paired-round ranking,
# then which targets the records of this checkout's code meet on this CPU. See benchmarks/README.md.
#
#   bash benchmarks/run_cpu.sh [all|ops|memory|rank|targets]   # default: all
#
# Environment: RANK_BUDGET_S (seconds of paired rounds per SD1.5 configuration, default 1800; the
# toy model's take a few minutes), PYTHON (default python3). Threads: torch's default, except the op
# benchmark, which runs at 1 and at torch's default. Records append to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
py=${PYTHON:-python3}
rank_budget=${RANK_BUDGET_S:-1800}
export PYTHONUNBUFFERED=1

case "$stage" in
    all | ops | memory | rank | targets) ;;
    *) echo "unknown stage '$stage' (all, ops, memory, rank, targets)" >&2; exit 2 ;;
esac
"$py" -m dreamblend.ops.cpp >/dev/null  # build the C++ op once, before anything is timed
threads=$("$py" -c "import torch; print(torch.get_num_threads())")

wants() { [ "$stage" = "$1" ] || [ "$stage" = all ]; }
status=0
if wants ops; then
    for t in $(printf '%s\n' 1 "$threads" | sort -un); do
        "$py" -m benchmarks.bench_cpu_ops --threads "$t" --dtypes float32 bfloat16 \
            --passes capture guided train || status=1
    done
    "$py" -m benchmarks.product_rate || status=1
fi
if wants memory; then  # one process per configuration; the first is the issue's own command
    e2e() { "$py" -m benchmarks.e2e --device cpu --workloads step --warmup 1 "$@"; }
    guided=(--peers guided_floor eager sdpa_recompute ours_cpp)
    e2e --models sd15 --dtypes float32 --batches 1 --repeats 2 || status=1
    e2e --models sd15 --dtypes bfloat16 --batches 1 --repeats 3 "${guided[@]}" all_eager || status=1
    e2e --models sd15 --dtypes float32 bfloat16 --batches 4 --repeats 2 "${guided[@]}" || status=1
    e2e --models toyworld --dtypes float32 bfloat16 --batches 1 4 --warmup 3 --repeats 20 || status=1
fi
if wants rank; then
    "$py" -m benchmarks.paired --models toyworld --dtypes float32 bfloat16 --batches 1 4 --rounds 40 \
        --block 5 || status=1
    for config in "float32 1" "bfloat16 1" "bfloat16 4" "float32 4"; do
        set -- $config
        "$py" -m benchmarks.paired --models sd15 --dtypes "$1" --batches "$2" --rounds 200 --block 1 \
            --settle 0 --budget-s "$rank_budget" || status=1
    done
fi
if wants targets; then
    "$py" -m benchmarks.cpu_targets || status=1
fi
exit "$status"
