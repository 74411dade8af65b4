"""The local pool against the Dask backend on the same work: per-task overhead, map
throughput, MLP throughput.

    python benchmarks/bench_dask.py [--workers 2] [--repeat 5] [--address tcp://host:8786]

Without ``--address`` it starts a ``distributed.LocalCluster`` of ``--workers`` worker
processes with one thread each on 127.0.0.1 (the local pool gets as many workers); with it,
the same script runs against that scheduler (the local pool then gets one worker per Dask
worker thread, on this machine). Workloads: a round trip of one no-op task (submit, wait),
1000 no-op tasks in flight; the NumPy chain ``tanh(1.7x + 0.3)^2 - 0.5x`` over ``--map-size``
float32 elements into a shared ``out``, and a compute-bound chain of ~20 transcendental
operations per element over the same array; ``nn.MLPModel.predict`` on a 4096x1024 float32 batch,
1024 -> 4096 -> 1024 (weights shipped once). Reports median and min of ``--repeat`` runs after
a warm-up, and the ratio Dask / local (lower is better; 1.0 is parity).
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np

import parrun
from parrun import nn
from parrun.bench import rerun_without_openblas_vars, timeit


def chain(x, out):
    np.multiply(x, 1.7, out=out)
    out += 0.3
    np.tanh(out, out=out)
    np.square(out, out=out)
    out -= 0.5 * x
    return out


def heavy(x, out):
    """About 20 transcendental operations per element: compute-bound, not memory-bound."""
    chain(x, out)
    for _ in range(4):
        np.sin(out, out=out)
        np.exp(out, out=out)
        np.tanh(out, out=out)
        np.sqrt(out, out=out)
    return out


def noop():
    return None


def main() -> None:
    rerun_without_openblas_vars()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2,
                    help="LocalCluster worker processes (1 thread each) and local workers")
    ap.add_argument("--address", help="a Dask scheduler to use instead of a LocalCluster")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--map-size", type=int, default=1 << 25, help="float32 elements for map")
    ap.add_argument("--mlp", default="4096,1024,4096,1024", help="batch,d_in,d_hidden,d_out")
    ap.add_argument("--round-trips", type=int, default=200)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import distributed

    cluster = None
    if args.address:
        client = distributed.Client(args.address, timeout=30, set_as_default=False)
    else:
        cluster = distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1,
                                           processes=True, host="127.0.0.1",
                                           dashboard_address=None)
        client = distributed.Client(cluster, set_as_default=False)
    dask_pool = parrun.Pool(backend="dask", client=client)
    local = parrun.Pool(dask_pool.workers)
    print(f"# {platform.node()}: {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"numpy {np.__version__}, dask {distributed.__version__}")
    print(f"# local: {local.workers} worker processes; dask: {dask_pool.info()['nthreads']} "
          f"({'LocalCluster' if cluster else args.address}); BLAS 1 thread per task")
    rows: list[dict] = []

    def compare(name: str, run_local, run_dask, work: float | None = None,
                unit: str = "") -> None:
        lm, lb = timeit(run_local, args.repeat)
        dm, db = timeit(run_dask, args.repeat)
        rows.append({"workload": name, "local_median_s": lm, "local_min_s": lb,
                     "dask_median_s": dm, "dask_min_s": db, "ratio": dm / lm})
        rate = f"  {work / lm:9.1f} vs {work / dm:9.1f} {unit}" if work else ""
        print(f"{name:<34} local {lm * 1e3:9.2f} ms (min {lb * 1e3:8.2f})   dask "
              f"{dm * 1e3:9.2f} ms (min {db * 1e3:8.2f})   dask/local {dm / lm:6.2f}x"
              f"{rate}", flush=True)

    # Per-task overhead: one task at a time (a round trip), then 1000 in flight.
    n = args.round_trips

    def trips(pool):
        def run():
            for _ in range(n):
                pool.submit(noop).result()
        return run

    def burst(pool):
        def run():
            for f in [pool.submit(noop) for _ in range(1000)]:
                f.result()
        return run

    compare(f"task round trip (x{n})", trips(local), trips(dask_pool))
    compare("1000 no-op tasks in flight", burst(local), burst(dask_pool), 1000, "tasks/s")

    # Map: the chain over a large shared float32 array into a shared out.
    x = parrun.asshared(np.random.default_rng(0).standard_normal(args.map_size,
                                                                  dtype=np.float32))
    out = parrun.empty(args.map_size, np.float32)
    compare(f"map chain, {args.map_size * 4 >> 20} MiB float32",
            lambda: local.map(chain, x, out=out), lambda: dask_pool.map(chain, x, out=out),
            args.map_size / 1e6, "M elements/s")
    expect = out.copy()
    local.map(chain, x, out=out)
    np.testing.assert_array_equal(out, expect)
    compare(f"map heavy (~20 ops/elt), {args.map_size * 4 >> 20} MiB",
            lambda: local.map(heavy, x, out=out), lambda: dask_pool.map(heavy, x, out=out),
            args.map_size / 1e6, "M elements/s")

    # MLP: weights shipped once (MLPModel keeps them shared; Dask keeps them on the workers).
    b, d_in, d_h, d_out = (int(v) for v in args.mlp.split(","))
    rng = np.random.default_rng(1)
    w = ((rng.standard_normal((d_in, d_h)) / np.sqrt(d_in)).astype(np.float32),
         np.zeros(d_h, np.float32),
         (rng.standard_normal((d_h, d_out)) / np.sqrt(d_h)).astype(np.float32),
         np.zeros(d_out, np.float32))
    batch = parrun.asshared(rng.standard_normal((b, d_in)).astype(np.float32))
    m_local, m_dask = nn.MLPModel(*w, pool=local), nn.MLPModel(*w, pool=dask_pool)
    y = parrun.empty((b, d_out), np.float32)
    flops = 2 * b * (d_in * d_h + d_h * d_out)
    compare(f"MLP {b}x{d_in}->{d_h}->{d_out} f32", lambda: m_local.predict(batch, out=y),
            lambda: m_dask.predict(batch, out=y), flops / 1e9, "GFLOP/s")
    np.testing.assert_allclose(y, m_local.predict(batch), rtol=1e-4, atol=1e-4)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"nthreads": dask_pool.info()["nthreads"], "address": args.address,
                       "rows": rows}, f, indent=1)
    m_local.release()
    m_dask.release()
    dask_pool.close()
    local.close()
    client.close()
    if cluster is not None:
        cluster.close()


if __name__ == "__main__":
    main()
