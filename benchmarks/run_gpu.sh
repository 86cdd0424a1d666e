#!/usr/bin/env bash
# The one command a GPU machine runs: install what is missing, run the kernel and end-to-end
# benchmarks, append the records and draw the plots. See benchmarks/README.md.
#
#   bash benchmarks/run_gpu.sh [all|quick|step|image|steps|kernels]   # default: all
#   bash benchmarks/run_gpu.sh fetch     # on a machine with network: wheels for an offline one
#
# Environment: BENCH_OUT (results folder, default benchmarks/results), WHEELS (wheel folder for
# offline installs, default .whl), BUDGET_S (per stage: start no new configuration after it),
# BENCH_GIT_REVISION (recorded revision where the copy has no .git), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
py=${PYTHON:-python3}
out=${BENCH_OUT:-benchmarks/results}
wheels=${WHEELS:-.whl}
export PYTHONUNBUFFERED=1

case "$stage" in
    all | quick | step | image | steps | kernels | fetch) ;;
    *) echo "unknown stage '$stage' (all, quick, step, image, steps, kernels, fetch)" >&2; exit 2 ;;
esac
if [ "$stage" = fetch ]; then  # pure-Python wheels: diffusers and the one dependency GPU images lack
    exec "$py" -m pip download --no-deps --only-binary=:all: -d "$wheels" diffusers==0.42.1 importlib_metadata
fi

if ! "$py" -c "import diffusers" 2>/dev/null; then
    if compgen -G "$wheels/*.whl" >/dev/null; then
        "$py" -m pip install -q --no-index --find-links "$wheels" diffusers
    else
        "$py" -m pip install -q diffusers==0.42.1
    fi
fi
# dreamblend.kernels only resolves once the project is installed (kernels/ maps into the package).
"$py" -c "import dreamblend.kernels" 2>/dev/null || "$py" -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

wants() { [ "$stage" = "$1" ] || [ "$stage" = all ]; }
e2e() { "$py" -m benchmarks.e2e --device cuda --out "$out/e2e.jsonl" ${BUDGET_S:+--budget-s "$BUDGET_S"} "$@"; }
status=0
if wants kernels && [ -f benchmarks/bench_kernels.py ]; then
    "$py" -m benchmarks.bench_kernels --output "$out/kernels.jsonl" || status=1
fi
if [ "$stage" = quick ]; then  # the headline: SD1.5 fp16 guided step by batch, images by length at batch 1
    e2e --models sd15 --dtypes float16 --workloads step || status=1
    e2e --models sd15 --dtypes float16 --workloads image --steps 10 25 50 --batches 1 || status=1
fi
if wants step; then
    e2e --workloads step || status=1
fi
if wants image; then
    e2e --workloads image --steps 50 --image-repeats 2 || status=1
fi
if wants steps; then  # memory must stay flat in the number of steps (lockstep schedule)
    e2e --workloads image --steps 10 25 --dtypes float16 --batches 1 || status=1
fi
if [ -f "$out/e2e.jsonl" ]; then
    "$py" -m benchmarks.plot "$out/e2e.jsonl" --out "$out/plots" || status=1
fi
exit "$status"
