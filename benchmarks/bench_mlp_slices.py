"""The MLP with its hidden layer in slices against rows alone, side by side.

    python benchmarks/bench_mlp_slices.py [--workers 2] [--cases 512:2,4096:4] [--repeat 9]
                                          [--size 1024,4096] [--json PATH]

``MLPModel.predict(batch, hidden_slices=s)`` against ``hidden_slices=1`` on one pool, runs
interleaved (one of each in turn, which first alternating, after a warm-up of each), every
result checked against ``mlp_reference``. A case ``rows:s`` is a batch of that many rows and
s slices. The default cases on 2 workers: 512 rows leave 256 a worker, the tile height 16
workers get from the suite's 4096-row batch; 4096 rows are the suite's batch. ``--size d,h``
is d_in = d_out and d_hidden (default 1024,4096, the suite's MLP).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import parrun
from parrun import nn
from parrun.bench import machine_info, rerun_without_openblas_vars


def _cases(ap: argparse.ArgumentParser, text: str) -> list[tuple[int, int]]:
    try:
        cases = [(int(r), int(s)) for r, s in (c.split(":") for c in text.split(","))]
    except ValueError:
        cases = []
    if not cases or min(min(c) for c in cases) < 1:
        ap.error(f"--cases: rows:slices pairs of positive integers, got {text!r}")
    return cases


def main() -> int:
    rerun_without_openblas_vars()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cases", default="512:2,4096:4")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--size", default="1024,4096")
    ap.add_argument("--json", help="write every time here")
    a = ap.parse_args()
    cases = _cases(ap, a.cases)
    try:
        d, h = (int(v) for v in a.size.split(","))
    except ValueError:
        d = h = 0
    if min(d, h) < 1:
        ap.error(f"--size: d,h, two positive integers, got {a.size!r}")
    if bad := [f"{r}:{s}" for r, s in cases if not 2 <= s <= h]:
        ap.error(f"--cases: slices from 2 to d_hidden ({h}), got {', '.join(bad)}")
    if a.workers < 1 or a.repeat < 1:
        ap.error("--workers and --repeat must be positive")
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((d, h)) / np.sqrt(d)).astype(np.float32)
    w2 = (rng.standard_normal((h, d)) / np.sqrt(h)).astype(np.float32)
    b1, b2 = np.zeros(h, np.float32), np.zeros(d, np.float32)
    result: dict = {"machine": machine_info(), "workers": a.workers, "size": [d, h],
                    "cases": []}
    print(f"MLP {d} -> {h} -> {d} float32 on {a.workers} workers; median (min) of {a.repeat} "
          "interleaved runs")
    with parrun.Pool(a.workers) as pool:
        model = nn.MLPModel(w1, b1, w2, b2, pool=pool)
        try:
            for rows, slices in cases:
                x = parrun.asshared(rng.standard_normal((rows, d), dtype=np.float32))
                out = parrun.empty((rows, d), np.float32)
                try:
                    ref = nn.mlp_reference(np.asarray(x), w1, b1, w2, b2)
                    times: dict[int, list[float]] = {1: [], slices: []}
                    for s in times:  # warm-up: the kept scratch and w1.T are made here
                        model.predict(x, out=out, hidden_slices=s)
                    for k in range(a.repeat):  # which goes first alternates
                        for s, ts in sorted(times.items(), reverse=k % 2 == 1):
                            t0 = time.perf_counter()
                            model.predict(x, out=out, hidden_slices=s)
                            ts.append(time.perf_counter() - t0)
                            np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)
                finally:
                    x.release()
                    out.release()
                flop = 4 * rows * d * h / 1e9
                for s, ts in times.items():
                    med = statistics.median(ts)
                    print(f"{rows:>6} rows, hidden_slices={s}: {med * 1e3:8.1f} ms "
                          f"({min(ts) * 1e3:.1f})  {flop / med:7.1f} GFLOP/s", flush=True)
                result["cases"].append({"rows": rows, "slices": slices,
                                        "times_s": {str(s): ts for s, ts in times.items()}})
                if a.json:  # after every case: a run cut short keeps what it measured
                    with open(a.json, "w") as f:
                        json.dump(result, f, indent=1)
        finally:
            model.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
