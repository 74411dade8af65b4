"""What one small or medium ``map`` call costs: parrun against serial NumPy and threads.

    python benchmarks/bench_small.py [--workers 2] [--calls 300] [--sizes 1e3,1e4,1e5,1e6]
                                     [--json PATH]

Per-call overhead decides whether a small array is worth sending to the pool at all. For each
size, on a warm ``parrun.Pool(--workers)`` (50 calls first), the calls of the three methods
interleave call by call (a slow moment of this shared machine falls on all alike), and the
median and the fastest call of each are printed, in microseconds:

- ``sqrt, out``: ``pool.map(np.sqrt, x, out=o)`` (float64);
- ``sqrt, no out``: ``y = pool.map(np.sqrt, x)``, as in a loop: the last call's result is
  dropped as the new one is bound, and the pool keeps its segment for the next call (the
  first rows run first to learn the output: a second job);
- ``sqrt, no out, released``: the same, with ``y.release()`` each call: a segment made and
  unlinked a call;
- ``chain, out``: ``tanh(1.7x + 0.3)**2 - 0.5x`` (Python operators on arrays) into ``o``;
- ``submit``: ``pool.submit(pow, 2, 3).result()``, one round trip.

Serial is the same NumPy in this process; threads, a ``ThreadPoolExecutor`` of ``--workers``
splitting the array in equal parts (the best way to split small arrays by hand: no process
boundary). Every result is checked against serial NumPy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import parrun
from parrun.bench import machine_info, positive_int, rerun_without_openblas_vars


def chain(t: np.ndarray) -> np.ndarray:
    return np.tanh(1.7 * t + 0.3) ** 2 - 0.5 * t


def interleaved(fns: dict[str, Callable[[], object]], calls: int,
                warm: int) -> dict[str, dict[str, float]]:
    """Each of ``fns`` ``warm`` times, then ``calls`` rounds of one call each, timed: median
    and fastest call, in microseconds."""
    for _ in range(warm):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(calls):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: {"median_us": statistics.median(v) * 1e6, "min_us": min(v) * 1e6}
            for k, v in times.items()}


def split(tp: ThreadPoolExecutor, w: int, fn: Callable[[np.ndarray, np.ndarray], object],
          src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """``fn(src part, dst part)`` on ``w`` equal parts, in the thread pool ``tp``."""
    bounds = [len(src) * k // w for k in range(w + 1)]
    for f in [tp.submit(fn, src[a:b], dst[a:b]) for a, b in itertools.pairwise(bounds)]:
        f.result()
    return dst


def sqrt_into(a: np.ndarray, d: np.ndarray) -> None:
    np.sqrt(a, out=d)


def chain_into(a: np.ndarray, d: np.ndarray) -> None:
    d[...] = chain(a)


def one_size(pool: parrun.Pool, tp: ThreadPoolExecutor, w: int, n: int, calls: int,
             warm: int) -> dict[str, dict]:
    """The map cases for ``n`` float64 elements, each result checked."""
    x = parrun.asshared(np.random.default_rng(0).random(n))
    o = parrun.empty(n)
    xp = np.array(x).view(np.ndarray)
    op = np.empty(n)
    got: list[np.ndarray] = []
    released: list[np.ndarray] = []

    def no_out() -> None:
        got[:] = [pool.map(np.sqrt, x)]  # the last call's result goes now

    def no_out_released() -> None:
        y = pool.map(np.sqrt, x)
        y.release()
        released[:] = [y]  # (still readable here after release)
    runs = {  # name: (methods, the right answer, parrun's last one)
        f"sqrt, out, {n:.0e}": ({"parrun": lambda: pool.map(np.sqrt, x, out=o),
                                 "serial": lambda: np.sqrt(xp, out=op),
                                 "threads": lambda: split(tp, w, sqrt_into, xp, op)},
                                np.sqrt, lambda: o),
        f"sqrt, no out, {n:.0e}": ({"parrun": no_out,
                                    "serial": lambda: np.sqrt(xp),
                                    "threads": lambda: split(tp, w, sqrt_into, xp,
                                                             np.empty(n))},
                                   np.sqrt, lambda: got[0]),
        f"sqrt, no out, released, {n:.0e}": ({"parrun": no_out_released,
                                              "serial": lambda: np.sqrt(xp),
                                              "threads": lambda: split(tp, w, sqrt_into, xp,
                                                                       np.empty(n))},
                                             np.sqrt, lambda: released[0]),
        f"chain, out, {n:.0e}": ({"parrun": lambda: pool.map(chain, x, out=o),
                                  "serial": lambda: chain(xp),
                                  "threads": lambda: split(tp, w, chain_into, xp, op)},
                                 chain, lambda: o),
    }
    out = {}
    try:
        for name, (fns, want, parrun_got) in runs.items():
            out[name] = res = interleaved(fns, calls, warm)
            if not np.allclose(parrun_got(), want(xp), rtol=1e-12, atol=0):
                sys.exit(f"{name}: parrun's result differs from NumPy's")
            _print(name, res)
    finally:
        x.release()
        o.release()
        got.clear()
        released.clear()
    return out


def main() -> None:
    rerun_without_openblas_vars()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=positive_int, default=2)
    ap.add_argument("--calls", type=positive_int, default=300)
    ap.add_argument("--warm", type=positive_int, default=50)
    ap.add_argument("--sizes", default="1e3,1e4,1e5,1e6")
    ap.add_argument("--json", help="write the machine and every figure here")
    args = ap.parse_args()
    try:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    except ValueError:
        ap.error(f"--sizes: comma-separated numbers of elements, got {args.sizes!r}")
    w = args.workers
    if min(sizes) < w:
        ap.error(f"--sizes: each at least --workers ({w}), got {args.sizes}")
    cases: dict[str, dict] = {}
    print(f"per call, us: median (fastest) of {args.calls}; {w} workers or threads")
    print(f"{'case':<31} {'parrun':>18} {'serial':>16} {'threads':>16}  parrun / threads")
    with parrun.Pool(w) as pool, ThreadPoolExecutor(w) as tp:
        for n in sizes:
            cases.update(one_size(pool, tp, w, n, args.calls, args.warm))
        name = "submit(pow, 2, 3)"
        cases[name] = res = interleaved({"parrun": lambda: pool.submit(pow, 2, 3).result(),
                                         "serial": lambda: pow(2, 3),
                                         "threads": lambda: tp.submit(pow, 2, 3).result()},
                                        args.calls, args.warm)
        if pool.submit(pow, 2, 3).result() != 8:
            sys.exit("submit: wrong result")
        _print(name, res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(), "workers": w, "calls": args.calls,
                       "cases": cases}, f, indent=1)


def _print(name: str, res: dict[str, dict[str, float]]) -> None:
    cells = [f"{r['median_us']:8.1f} ({r['min_us']:6.1f})" for r in res.values()]
    ratio = res["parrun"]["median_us"] / res["threads"]["median_us"]
    print(f"{name:<31} {cells[0]:>18} {cells[1]:>16} {cells[2]:>16}  {ratio:8.2f}x",
          flush=True)


if __name__ == "__main__":
    main()
