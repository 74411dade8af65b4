#!/usr/bin/env bash
# Issue [4/6]'s core-scaling run on the lent 16-core machine, as one prepared script. That
# machine has Python 3.12 with numpy, cloudpickle, psutil, threadpoolctl, joblib, numba, torch,
# matplotlib and tqdm, no internet and no install: parrun runs from the checkout. From the
# repository root:
#
#     bash benchmarks/device_scaling.sh          # -> benchmarks/results/scaling_16core.*
#     OUT=$OUT bash benchmarks/device_scaling.sh # on the device tool: files under $OUT return
#
# Sized to finish within the device's 10-minute command limit (the bench is cut at 500 s by
# SIGTERM, which it turns into a clean exit, and killed 30 s later if that hangs);
# the JSON is rewritten after each workload, so a run cut short keeps what it measured, and
# the plot is drawn from it at the end. Left out: MiniLM (its model package is not on that
# machine) and tasks (no-op tasks do not scale with workers). WORKERS overrides the counts.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=.
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
python -m parrun info > "$out/scaling_16core_info.txt" 2>&1
start=$(date +%s)
timeout -k 30 500 python -m parrun bench --workers "${WORKERS:-1,2,4,8,16}" \
    --suite map,irregular,mlp,attention,mandelbrot --repeat 3 --irregular-items 1000 \
    --no-progress --json "$out/scaling_16core.json" > "$out/scaling_16core.txt" 2>&1
echo "# bench exit status $?, $(( $(date +%s) - start )) s" >> "$out/scaling_16core.txt"
python -m parrun bench --from-json "$out/scaling_16core.json" \
    --plot "$out/scaling_16core.png" > /dev/null 2>&1 || echo "# no plot" >> "$out/scaling_16core.txt"
