#!/usr/bin/env bash
# Issue [4/6]'s goals that the first 16-core runs missed (MLP and attention at least 12x over
# 1 worker, irregular efficiency at least 0.9), measured again on the lent 16-core machine as
# one prepared script (device_scaling.sh is the whole suite). From the repository root:
#
#     OUT=$OUT bash benchmarks/device_goals.sh   # on the device tool: files under $OUT return
#
# About 300 s there, each step cut by `timeout` (at most 560 s in all):
# 1. bench_cores.py, python and sgemm kernels, 1 and W processes: what the machine itself
#    gives in this run (its speed drifts from run to run).
# 2. bench_mlp_slices.py at W workers: the hidden layer in 2 to 16 slices against rows alone,
#    1024 to 8192 rows (4096 is the suite's batch: 256 rows a worker at 16).
# 3. The mlp and attention suites at COUNTS workers (1,4,8,16), with the rows "parrun nn.mlp,
#    hidden in 4 slices" and the equal static shares beside the peers.
# 4. bench_irregular.py at W workers, 2000 items (the issue's size; the first runs had 1000),
#    5 trials of fresh pools, efficiency split into the machine's part and the scheduler's.
# Eight files, the most the device tool brings back: the machine (`parrun info`, lscpu) heads
# the cores file, and the plot is drawn afterwards from the JSON (`python -m parrun bench
# --from-json goals_nn_16core.json --plot goals_nn_16core.png`).
# W and COUNTS override the worker counts (W=2 COUNTS=1,2 for a dry run on 2 cores).
source "$(dirname "$0")/device_env.sh"  # cd to the root, $out, $py, PYTHONPATH
w=${W:-16}
counts=${COUNTS:-1,4,8,16}
start=$(date +%s)
stamp() { echo "# exit status $1, $(( $(date +%s) - start )) s since the script began" >> "$2"; }
f=$out/goals_cores_16core
{ "$py" -m parrun info; echo; lscpu; echo; } > "$f.txt" 2>&1
timeout --foreground -k 10 60 "$py" benchmarks/bench_cores.py --workers "1,$w" \
    --kernels python,sgemm --json "$f.json" >> "$f.txt" 2>&1
stamp $? "$f.txt"
f=$out/goals_mlp_slices_16core
timeout --foreground -k 10 90 "$py" benchmarks/bench_mlp_slices.py --workers "$w" --repeat 15 \
    --cases 1024:4,2048:4,2048:8,4096:2,4096:4,4096:8,4096:16,8192:2,8192:4 \
    --json "$f.json" > "$f.txt" 2>&1
stamp $? "$f.txt"
f=$out/goals_nn_16core
timeout --foreground -k 30 200 "$py" -m parrun bench --workers "$counts" --suite mlp,attention \
    --repeat 3 --warmup 1 --no-progress --json "$f.json" > "$f.txt" 2>&1
stamp $? "$f.txt"
f=$out/goals_irregular_16core
timeout --foreground -k 10 190 "$py" benchmarks/bench_irregular.py --workers "$w" --trials 5 \
    --items 2000 --json "$f.json" > "$f.txt" 2>&1
stamp $? "$f.txt"
