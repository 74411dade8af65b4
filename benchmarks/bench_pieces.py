"""Default piece sizes against a hand-picked grain, for functions with a cost a call.

    python benchmarks/bench_pieces.py [--workers 2] [--repeat 5] [--scale 1] [--json PATH]

``pool.map`` sizes pieces to ~0.3 ms of work from the cost a row. Functions that also pay a
fixed cost a call made that measure say "one row a piece" (see ``parrun._worker.Growth``);
this prints, for such functions and for rows of a fixed cost (where pieces must stay small),
the default's median time and pieces beside ``grain=n // (8 x workers)``, a grain a user
would pick by hand, runs interleaved, every result checked:

- ``a @ W``: 8000 rows of 1000 float64 times a 1000x1000 W (BLAS reads all of W a call);
- lookup table: a 1M-entry table built a call, indexed by 20,000 rows;
- pure-Python rows: the irregular workload's items (cost proportional to the index), where
  pieces of one row are right.

``--scale`` multiplies the rows of each case (a smoke test: 0.02).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import parrun
from parrun.bench import _cost_array, machine_info, rerun_without_openblas_vars

_W: list[np.ndarray] = []


def _matmul(a: np.ndarray) -> np.ndarray:
    return a @ _W[0]


def _lookup(a: np.ndarray) -> np.ndarray:
    table = np.sqrt(np.arange(1_000_000, dtype=np.float64))  # built every call
    return table[a]


def main() -> int:
    rerun_without_openblas_vars()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0, help="times the rows of each case")
    ap.add_argument("--json", help="write every time here")
    a = ap.parse_args()
    if a.workers < 1 or a.repeat < 1 or not a.scale > 0:
        ap.error("--workers, --repeat and --scale must be positive")

    def rows(n: int) -> int:
        return max(16, round(n * a.scale))

    rng = np.random.default_rng(0)
    w = parrun.asshared(rng.standard_normal((1000, 1000)))
    _W[:] = [w]  # read by the workers through the function's globals (a shared handle)
    cases = [
        (f"a @ W, {rows(8000)} x 1000 float64", _matmul,
         parrun.asshared(rng.standard_normal((rows(8000), 1000))), lambda x: x @ w),
        (f"lookup table built a call, {rows(20_000)} rows", _lookup,
         parrun.asshared(rng.integers(0, 1_000_000, rows(20_000))),
         lambda x: np.sqrt(x.astype(np.float64))),
        (f"pure-Python rows, cost proportional to the index, {rows(1000)} rows", _cost_array,
         parrun.asshared(np.arange(rows(1000), dtype=np.int64)), None),
    ]
    result: dict = {"machine": machine_info(), "workers": a.workers, "cases": []}
    print(f"{a.workers} workers; median (min) of {a.repeat} interleaved runs; pieces of the "
          "last run")
    try:
        with parrun.Pool(a.workers) as pool:
            for name, fn, x, ref in cases:
                n = len(x)
                hand = max(1, n // (8 * a.workers))
                want = ref(np.asarray(x)) if ref is not None else _cost_array(np.asarray(x))
                grains = {"default": None, f"grain={hand}": hand}
                times: dict[str, list[float]] = {g: [] for g in grains}
                pieces: dict[str, int] = {}
                for grain in grains.values():  # warm-up: the function's first call
                    pool.map(fn, x, grain=grain).release()
                for k in range(a.repeat):
                    for g, grain in sorted(grains.items(), reverse=k % 2 == 1):
                        t0 = time.perf_counter()
                        y = pool.map(fn, x, grain=grain)
                        times[g].append(time.perf_counter() - t0)
                        pieces[g] = pool.last_stats.pieces
                        try:
                            np.testing.assert_allclose(y, want, rtol=1e-9, atol=1e-9)
                        finally:
                            y.release()
                print(name)
                for g, ts in times.items():
                    print(f"  {g:<12} {statistics.median(ts) * 1e3:8.1f} ms "
                          f"({min(ts) * 1e3:.1f})  {pieces[g]:6d} pieces", flush=True)
                result["cases"].append({"name": name, "rows": n, "times_s": times,
                                        "pieces": pieces})
                if a.json:
                    with open(a.json, "w") as f:
                        json.dump(result, f, indent=1)
    finally:
        for _, _, x, _ in cases:
            x.release()
        w.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
