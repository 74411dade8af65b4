"""What a function's first calls cost on a fresh pool.

    python benchmarks/bench_first_call.py [--workers 2] [--calls 4]

A function's first call starts on as many workers as it has pieces and, if it is still
running after ``parrun._pool.LATE_WAKE_S`` with rows left, wakes the rest; each worker loads
the function (unpickles it, imports what it needs, loads numba's cache) with a row of its own
claimed, so that all load it in that call. Printed, side by side in one run:

1. the first ``--calls`` calls of a costly pure-Python function (400 rows of ~1 ms) on a fresh
   pool of ``--workers`` and on a fresh pool of 1 worker (how the first call ran when it woke
   one worker);
2. the same for ``parrun.nn.mandelbrot`` (400x400, 128 iterations), whose numba kernel each
   worker loads at its first use (skipped without numba);
3. calls of a trivial function on 1,000 rows, the same function every call against a new
   closure every call (each a first call, which should stay on one worker).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import parrun
from parrun import nn
from parrun.bench import _cost, rerun_without_openblas_vars
from parrun.nn._mandelbrot import HAVE_NUMBA


def costly(idx):
    return np.array([_cost(400) for _ in idx], dtype=np.int64)  # ~1 ms a row here


def first_calls(workers: int, calls: int, call) -> list[str]:
    """Times of the first calls on a fresh pool, and the items each worker ran."""
    out = []
    with parrun.Pool(workers) as p:
        for _ in range(calls):
            t = time.perf_counter()
            call(p)
            dt = time.perf_counter() - t
            out.append(f"{dt * 1e3:.0f} ms {[w.items for w in p.last_stats.workers]}")
    return out


def main() -> None:
    rerun_without_openblas_vars()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--trivial-calls", type=int, default=500)
    args = ap.parse_args()
    idx = parrun.asshared(np.arange(400))
    res = parrun.empty(400, np.int64)

    def run_costly(p):
        p.map(costly, idx, out=res)

    def run_mandelbrot(p):
        nn.mandelbrot(400, 400, 128, pool=p).release()

    cases = [("costly Python, 400 rows of ~1 ms", run_costly)]
    if HAVE_NUMBA:
        cases.append(("nn.mandelbrot 400x400, 128 iterations", run_mandelbrot))
    else:
        print("nn.mandelbrot: skipped (numba not installed)")
    print("first calls on fresh pools: time, and items per worker")
    for name, call in cases:
        for w in sorted({1, args.workers}):
            print(f"  {name}, {w} worker{'s' if w > 1 else ''}: "
                  + "; ".join(first_calls(w, args.calls, call)))

    x, out = parrun.asshared(np.ones(1000)), parrun.empty(1000)

    def times(fns, p) -> float:
        ts = []
        for f in fns:
            t = time.perf_counter()
            p.map(f, x, out=out)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts[len(ts) // 10:]) * 1e6

    n = args.trivial_calls
    with parrun.Pool(args.workers) as p:
        def scaled(k):
            return lambda a: a * k
        same = times([scaled(2)] * n, p)
        new = times([scaled(k) for k in range(n)], p)
    print(f"trivial function on 1,000 rows, {args.workers} workers, median of {n} calls: "
          f"the same function {same:.0f} us, a new closure each call {new:.0f} us")
    for a in (idx, res, x, out):
        a.release()


if __name__ == "__main__":
    main()
