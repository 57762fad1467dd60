#!/usr/bin/env bash
# One leased-GPU session (docs/performance.md, "On a GPU"): install the carried peer wheels,
# check every backend on CUDA against the CPU's dense float64 oracle, then benchmark as
# much of the grid as fits in CURVKIT_GPU_SECONDS (default 500), batch 128 first.
#
# Here, once:  echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps
#   --only-binary=:all: --python-version 3.12 --implementation cp
#   --platform manylinux_2_28_x86_64 -d .whl curvlinops-for-pytorch==3.0.1
#   backpack-for-pytorch==1.7.1 unfoldNd einconv
# There:       bash scripts/gpu_session.sh   (with .whl carried; results under $OUT)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/curvkit-gpu}
mkdir -p "$OUT"
start=$(date +%s)
total=${CURVKIT_GPU_SECONDS:-500}
device=${CURVKIT_BENCH_DEVICE:-cuda}
extra=${CURVKIT_BENCH_EXTRA:-}  # e.g. "--sizes tiny --models mlp" for a dry run on a CPU
batches=${CURVKIT_GPU_BATCHES:-128,512,32}  # in this order, as far as the time goes
# 1: keep 200 s for a compiled-products run at batch 128 after the grid (else the grid
# takes all the time; a row is started only if it is expected to finish)
compiled=${CURVKIT_GPU_COMPILED:-0}
reserve=$((compiled == 1 ? 200 : 60))
left() { echo $((total - ($(date +%s) - start))); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    nproc
    python3 -c "import torch, curvkit, curvlinops, backpack; print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(0))"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
python3 -c "import curvkit, curvlinops, backpack" || exit 1

echo "== CUDA oracle tests ($(left) s left)"
timeout -s INT 150 python3 -m pytest -q -rfE --durations=5 -p no:cacheprovider tests/test_cuda.py \
    >"$OUT/tests.log" 2>&1
tail -25 "$OUT/tests.log"

echo "== benchmark ($(left) s left)"
# shellcheck disable=SC2086
python3 scripts/bench.py --device "$device" --batch-sizes "$batches" --ks 16,64 $extra \
    --warmup 1 --repeats 20 --min-repeats 3 --budget-s 6 --compile --compile-batches 128 \
    --timeout 300 --deadline-s $(($(left) - reserve)) --check \
    --out "$OUT/h200.json" --md "$OUT/h200.md" >"$OUT/bench.log" 2>&1
grep -v '^|' "$OUT/bench.log" | tail -60

if [ "$compiled" = 1 ] && [ "$(left)" -gt 100 ]; then
    echo "== compiled products, batch 128 ($(left) s left)"
    # shellcheck disable=SC2086
    python3 scripts/bench.py --device "$device" --batch-sizes 128 --ks 16,64 $extra \
        --warmup 1 --repeats 20 --min-repeats 3 --budget-s 4 --compile --compile-product \
        --timeout 200 --deadline-s $(($(left) - 15)) \
        --out "$OUT/h200-compiled.json" --md "$OUT/h200-compiled.md" \
        >"$OUT/bench-compiled.log" 2>&1
    grep -v '^|' "$OUT/bench-compiled.log" | tail -20
fi
echo "== done in $(($(date +%s) - start)) s"
