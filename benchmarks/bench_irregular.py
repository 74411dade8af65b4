"""The irregular workload, measured against process-to-process noise: fresh pools per trial.

    python benchmarks/bench_irregular.py [--workers 2] [--trials 5] [--repeat 3] [--items 2000]

Items cost time proportional to their index (``parrun.bench``'s irregular workload). On a
shared VM one process can run the same pure-Python work 10% faster or slower than another for
its whole life, so a single pool per method (as ``python -m parrun bench`` has) carries that
luck into its number. Here every trial starts fresh pools for every method, warms them once,
then times them in ``--repeat`` interleaved rounds beside the serial run in the parent;
efficiency = serial time / (workers x time), per trial, and its median over trials. joblib and
mpire are measured where installed (joblib not at one worker: n_jobs=1 runs in the parent);
Ray is not (a fresh runtime per trial takes seconds to start): the suite has it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import statistics
import sys

import numpy as np

import parrun
from parrun.bench import (
    JOBLIB_IN_PROCESS,
    Method,
    Workload,
    _close_all,
    _cost,
    _cost_array,
    _cost_chunk,
    _measure,
    _mpire_pool,
    _on_signals,
    lpt_shares,
    machine_info,
    positive_int,
    rerun_without_openblas_vars,
)


def trial(n: int, w: int, repeat: int, idx) -> tuple[dict[str, float], str, float, float]:
    """Fresh pools for every method: the median seconds of each over interleaved rounds, what
    parrun's last map says of its workers, the seconds its workers spent in the items (summed
    over workers) and that map's wall time."""
    items = list(range(n))
    cyc, lpt = [items[k::w] for k in range(w)], lpt_shares(n, w)
    pool = parrun.Pool(w)
    fork = mp.get_context("fork")
    cyclic, oracle, chunks = fork.Pool(w), fork.Pool(w), fork.Pool(w)
    peers: list = [cyclic, oracle, chunks]
    runs = {
        "serial Python": lambda: _cost_chunk(items),
        "parrun.map (work stealing)": lambda: pool.map(_cost_array, idx),
        "static cyclic split": lambda: cyclic.map(_cost_chunk, cyc),
        "oracle split (costs known)": lambda: oracle.map(_cost_chunk, lpt, chunksize=1),
        "multiprocessing.Pool.map default chunks": lambda: chunks.map(_cost, items),
    }
    try:
        from joblib import Parallel, delayed

        if w not in JOBLIB_IN_PROCESS:  # n_jobs=1 runs in this process: not a process peer
            par = Parallel(n_jobs=w)
            runs["joblib auto batching"] = lambda: par(delayed(_cost)(i) for i in items)
    except ImportError:
        pass
    if importlib.util.find_spec("mpire") is not None:
        workers = _mpire_pool(w, held=peers)
        runs["mpire map default chunks"] = lambda: workers.map(_cost, items)
    try:
        # One warm-up each (imports, page faults), then interleaved rounds, as the suite does.
        wl = Workload("irregular", "items/s", n, [
            Method(name, lambda _w, fn=fn: fn, scales=name != "serial Python")
            for name, fn in runs.items()])
        rows = _measure(wl, [w], repeat, warmup=1)
        st = pool.last_stats
        busy = ", ".join(f"{x.busy_s / st.wall_s:.0%}" for x in st.workers)
        return ({k: statistics.median(next(iter(r["times_s"].values())))
                 for k, r in rows.items()},
                f"parrun's last map: {st.steals} steals, workers busy {busy} of its wall time",
                sum(st.busy_s), st.wall_s)
    finally:
        pool.close()
        _close_all(peers)


def main() -> int:
    rerun_without_openblas_vars()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=positive_int, default=2)
    ap.add_argument("--trials", type=positive_int, default=5)
    ap.add_argument("--repeat", type=positive_int, default=3)
    ap.add_argument("--items", type=positive_int, default=2000)
    ap.add_argument("--json", help="write every trial's medians here")
    a = ap.parse_args()
    w, n = a.workers, a.items
    _on_signals()  # a run cut by `timeout` or Ctrl-C closes its pools and keeps its JSON
    print(f"irregular: {n} pure-Python items, cost proportional to the index; {w} workers, "
          f"{a.trials} trials of fresh pools, median of {a.repeat} interleaved rounds each")
    if w in JOBLIB_IN_PROCESS and importlib.util.find_spec("joblib") is not None:
        print(f"joblib left out at {w} worker: its n_jobs={w} runs in this process, not in a "
              "worker process")
    idx = parrun.asshared(np.arange(n, dtype=np.int64))
    trials: list[dict[str, float]] = []
    work: list[tuple[float, float]] = []  # parrun's last map a trial: (time in items, wall)
    info = machine_info()
    try:
        for t in range(a.trials):
            med, stats, busy, wall = trial(n, w, a.repeat, idx)
            trials.append(med)
            work.append((busy, wall))
            serial = med["serial Python"]
            fastest = min((v, k) for k, v in med.items() if k != "serial Python")[1]
            print(f"trial {t}: serial {serial:.3f} s; " + ", ".join(
                f"{k.split(' (')[0]} {v:.3f} s ({serial / (w * v):.2f})"
                for k, v in med.items() if k != "serial Python")
                + f"; fastest: {fastest.split(' (')[0]}; {stats}; their time in the items "
                f"{busy:.3f} s in all, {busy / serial:.2f}x the serial run's", flush=True)
            if a.json:  # after every trial: a run cut short keeps what it measured
                with open(a.json, "w") as f:
                    json.dump({"machine": info, "workers": w, "items": n,
                               "repeat": a.repeat, "trials": trials,
                               "parrun_last_map": [{"items_s": b, "wall_s": t}
                                                   for b, t in work]}, f, indent=1)
    finally:
        idx.release()
    print(f"\n{'method':<42} {'median s':>9} {'efficiency: median':>19} {'min-max':>11}")
    for name in trials[0]:
        effs = [tr["serial Python"] / (w * tr[name]) for tr in trials]
        secs = statistics.median(tr[name] for tr in trials)
        if name == "serial Python":
            print(f"{name:<42} {secs:9.3f}")
            continue
        print(f"{name:<42} {secs:9.3f} {statistics.median(effs):19.2f} "
              f"{min(effs):5.2f}-{max(effs):.2f}")
    # Efficiency of parrun's last map a trial = (serial / time in the items) x (time in the
    # items / (w x wall)): the first factor is how fast the same items ran in w busy workers
    # against alone (the machine: clocks, shared caches), the second how much of the wall the
    # workers spent in them (the scheduler).
    alone = statistics.median(tr["serial Python"] / b for (b, _), tr in zip(work, trials))
    sched = statistics.median(b / (w * t) for b, t in work)
    eff = statistics.median(tr["serial Python"] / (w * t) for (_, t), tr in zip(work, trials))
    print(f"\nparrun's last map a trial, efficiency {eff:.2f} (medians over trials) = "
          f"{alone:.2f} (the serial run's time / its workers' time in the same items) x "
          f"{sched:.2f} (their time in the items / ({w} x the map's wall time))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
