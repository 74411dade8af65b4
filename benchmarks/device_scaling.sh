#!/usr/bin/env bash
# Issue [4/6]'s core-scaling run on the lent 16-core machine, as one prepared script. That
# machine has Python 3.12 with numpy, cloudpickle, psutil, threadpoolctl, joblib, numba, torch,
# matplotlib and tqdm, no internet and no install: parrun runs from the checkout. From the
# repository root:
#
#     bash benchmarks/device_scaling.sh          # -> benchmarks/results/scaling_16core.*
#     OUT=$OUT bash benchmarks/device_scaling.sh # on the device tool: files under $OUT return
#
# Sized to finish within the device's 10-minute command limit. First bench_cores.py measures
# how far the machine itself scales, per kind of work (about 90 s, cut at 150 s). Then the
# bench (284 s for these five suites there on 2026-11-27), cut at BENCH_LIMIT (380 s) by
# SIGTERM, which it turns into a clean exit, and killed 30 s later if that hangs. The signal
# goes to the bench alone (--foreground): sent to its whole process group it would also kill
# the multiprocessing.Pool peers' workers, and the bench would spend 5 s per stuck peer
# (CPython's Pool.terminate() waits for ever on a queue lock a killed worker held). The JSON
# is rewritten after each workload, so a run cut short keeps what it measured, and the plot
# is drawn from it at the end. Irregular runs last in the bench, one warm-up per method and
# count; the fresh-pool irregular bench then fills the time left. Left out: MiniLM (its model
# package is not on that machine) and tasks (no-op tasks do not scale with workers).
# WORKERS overrides the counts, SUITES the suites, BENCH_LIMIT the bench's seconds;
# IRREGULAR_TRIALS=0 leaves out the fresh-pool run.
source "$(dirname "$0")/device_env.sh"  # cd to the root, $out, $py, PYTHONPATH
counts=${WORKERS:-1,2,4,8,16}
start=$(date +%s)
{ "$py" -m parrun info; echo; lscpu 2>&1; } > "$out/scaling_16core_info.txt" 2>&1
# How far the machine itself scales (independent processes, nothing shared; pinned pairs):
# the ceiling each workload's speed-up is read against. About 90 s.
timeout --foreground -k 10 150 "$py" benchmarks/bench_cores.py --workers "$counts" --pairs \
    --json "$out/cores_16core.json" > "$out/cores_16core.txt" 2>&1
echo "# exit status $?, $(( $(date +%s) - start )) s" >> "$out/cores_16core.txt"
timeout --foreground -k 30 "${BENCH_LIMIT:-380}" "$py" -m parrun bench --workers "$counts" \
    --suite "${SUITES:-map,mlp,attention,mandelbrot,irregular}" --repeat 3 --warmup 1 \
    --irregular-items 1000 --no-progress --json "$out/scaling_16core.json" \
    > "$out/scaling_16core.txt" 2>&1
echo "# bench exit status $?, $(( $(date +%s) - start )) s" >> "$out/scaling_16core.txt"
"$py" -m parrun bench --from-json "$out/scaling_16core.json" \
    --plot "$out/scaling_16core.png" > /dev/null 2>&1 || echo "# no plot" >> "$out/scaling_16core.txt"
# With the time left, the irregular workload over fresh pools at 16 workers (the goal there:
# efficiency >= 0.9), cut so that the whole script stays under 560 s.
left=$(( 540 - ($(date +%s) - start) ))
trials=${IRREGULAR_TRIALS:-5}
if [ "$left" -gt 60 ] && [ "$trials" -gt 0 ]; then
    timeout --foreground -k 10 "$left" "$py" benchmarks/bench_irregular.py --workers "${IRREGULAR_WORKERS:-16}" \
        --trials "$trials" --items 1000 --json "$out/irregular_16core.json" > "$out/irregular_16core.txt" 2>&1
    echo "# exit status $?" >> "$out/irregular_16core.txt"
fi
