"""parrun.Executor against the peers on small tasks, round trips and big array arguments.

    python benchmarks/bench_tasks.py [--tasks 20000] [--trips 2000] [--items 100000]

Side by side in one run, 2 workers each: throughput of no-op tasks submitted then awaited,
latency of sequential submit-then-result round trips, ``map`` over many tiny items, and a task
that takes a 64 MiB array and returns one (time and peak private memory of the parent and its
workers). Peers that are not installed are reported as skipped.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np

import parrun
from parrun.bench import positive_int, rerun_without_openblas_vars

sys.path.insert(0, os.path.dirname(__file__))
from bench_map import PeakAnon

W = 2


def noop(*args):
    return None


def double(a):
    return a * 2


def _children_pids():
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


class Peer:
    """One way of running tasks: start, submit, map, stop."""

    def __init__(self, name):
        self.name = name

    def start(self):
        pass

    def stop(self):
        pass


class FuturesPeer(Peer):
    def __init__(self, name, make):
        super().__init__(name)
        self.make = make

    def start(self):
        self.ex = self.make()
        self.ex.submit(noop).result()

    def burst(self, n):
        fs = [self.ex.submit(noop) for _ in range(n)]
        cf.wait(fs)

    def trip(self):
        self.ex.submit(noop).result()

    def map(self, items):
        return list(self.ex.map(abs, items, **self.map_kwargs(len(items))))

    def map_kwargs(self, n):
        return {}

    def call(self, fn, arg):
        return self.ex.submit(fn, arg).result()

    def stop(self):
        self.ex.shutdown(wait=True)


class ParrunPeer(FuturesPeer):
    def __init__(self):
        super().__init__("parrun.Executor", lambda: parrun.Executor(W))


def _no_shared_arrays():
    """Initializer: make this process pickle every array by value (parrun's old path)."""
    import parrun._shm

    parrun._shm.BIG_ARRAY_BYTES = 1 << 62


class ParrunPickledPeer(FuturesPeer):
    """parrun with its shared-memory path for big arrays turned off: the difference it
    makes."""

    def __init__(self):
        super().__init__("parrun, arrays pickled",
                         lambda: parrun.Executor(W, initializer=_no_shared_arrays))

    def start(self):
        import parrun._shm

        self.saved = parrun._shm.BIG_ARRAY_BYTES
        _no_shared_arrays()
        super().start()

    def stop(self):
        import parrun._shm

        super().stop()
        parrun._shm.BIG_ARRAY_BYTES = self.saved


class PPEPeer(FuturesPeer):
    def __init__(self):
        super().__init__("ProcessPoolExecutor",
                         lambda: cf.ProcessPoolExecutor(W, mp_context=mp.get_context("fork")))

    def map_kwargs(self, n):
        return {"chunksize": max(1, n // (W * 16))}


class ThreadPeer(FuturesPeer):
    def __init__(self):
        super().__init__("ThreadPoolExecutor", lambda: cf.ThreadPoolExecutor(W))


class LokyPeer(FuturesPeer):
    def __init__(self):
        def make():
            from loky import get_reusable_executor

            return get_reusable_executor(W)
        super().__init__("loky reusable executor", make)

    def map_kwargs(self, n):
        return {"chunksize": max(1, n // (W * 16))}

    def stop(self):
        self.ex.shutdown(wait=True, kill_workers=True)


class MpPoolPeer(Peer):
    def __init__(self):
        super().__init__("multiprocessing.Pool")

    def start(self):
        self.pool = mp.get_context("fork").Pool(W)
        self.pool.apply_async(noop).get()

    def burst(self, n):
        rs = [self.pool.apply_async(noop) for _ in range(n)]
        for r in rs:
            r.get()

    def trip(self):
        self.pool.apply_async(noop).get()

    def map(self, items):
        return self.pool.map(abs, items)

    def call(self, fn, arg):
        return self.pool.apply_async(fn, (arg,)).get()

    def stop(self):
        self.pool.close()
        self.pool.join()


class JoblibPeer(Peer):
    def __init__(self):
        super().__init__("joblib (loky, auto batching)")

    def start(self):
        from joblib import Parallel, delayed

        self.delayed = delayed
        self.par = Parallel(n_jobs=W)
        self.par.__enter__()
        self.par([delayed(noop)()])

    def burst(self, n):
        self.par(self.delayed(noop)() for _ in range(n))

    def trip(self):
        self.par([self.delayed(noop)()])

    def map(self, items):
        return self.par(self.delayed(abs)(i) for i in items)

    def call(self, fn, arg):
        return self.par([self.delayed(fn)(arg)])[0]

    def stop(self):
        self.par.__exit__(None, None, None)


def main():
    rerun_without_openblas_vars()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=positive_int, default=20000)
    ap.add_argument("--trips", type=positive_int, default=2000)
    ap.add_argument("--items", type=positive_int, default=100000)
    ap.add_argument("--repeat", type=positive_int, default=3)
    ap.add_argument("--only", help="comma-separated name fragments of the peers to run")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"{W} workers each; {args.tasks} no-op tasks, {args.trips} round trips, "
          f"{args.items} map items, 64 MiB array task; median of {args.repeat}")
    peers = [ParrunPeer(), ParrunPickledPeer(), PPEPeer(), LokyPeer(), MpPoolPeer(),
             JoblibPeer(), ThreadPeer()]
    if args.only:
        peers = [p for p in peers if any(o in p.name for o in args.only.split(","))]
    big = np.random.default_rng(0).standard_normal(2**23)  # 64 MiB float64
    rows = {}
    for peer in peers:
        row = {}
        try:
            t = time.perf_counter()
            peer.start()
            row["startup_s"] = time.perf_counter() - t
        except ImportError as e:
            print(f"  {peer.name}: skipped ({e})")
            rows[peer.name] = {"skipped": str(e)}
            continue
        try:
            ts = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                peer.burst(args.tasks)
                ts.append(time.perf_counter() - t)
            row["tasks_per_s"] = args.tasks / statistics.median(ts)
            for _ in range(50):
                peer.trip()
            lat = []
            for _ in range(args.trips):
                t = time.perf_counter()
                peer.trip()
                lat.append(time.perf_counter() - t)
            row["trip_us_median"] = statistics.median(lat) * 1e6
            row["trip_us_p99"] = float(np.percentile(lat, 99)) * 1e6
            items = list(range(-args.items // 2, args.items // 2))
            ts = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                res = peer.map(items)
                ts.append(time.perf_counter() - t)
            assert list(res) == [abs(i) for i in items]
            row["map_items_per_s"] = args.items / statistics.median(ts)
            peer.call(double, big[:10])
            ts = []
            with PeakAnon([os.getpid(), *_children_pids()]) as peak:
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    r = peer.call(double, big)
                    ts.append(time.perf_counter() - t)
                    assert r.shape == big.shape and r[5] == 2 * big[5]
                    del r
            row["array64_s"] = statistics.median(ts)
            row["array64_peak_private_mib"] = peak.growth / 2**20
        finally:
            peer.stop()
        rows[peer.name] = row
        print(f"  {peer.name:<30} start {row['startup_s'] * 1e3:7.1f} ms | "
              f"{row['tasks_per_s']:9.0f} tasks/s | trip {row['trip_us_median']:7.0f} us "
              f"(p99 {row['trip_us_p99']:6.0f}) | map {row['map_items_per_s']:9.0f} items/s | "
              f"64 MiB {row['array64_s'] * 1e3:6.1f} ms, +{row['array64_peak_private_mib']:.0f}"
              " MiB", flush=True)
    base = rows.get("parrun.Executor")
    if base is None:
        return
    print("\nratios (parrun relative to each peer; > 1 means parrun is better):")
    print(f"{'peer':<30} {'throughput':>10} {'latency':>9} {'map':>8} {'64 MiB':>8}")
    for name, row in rows.items():
        if name == "parrun.Executor" or "skipped" in row:
            continue
        print(f"{name:<30} {base['tasks_per_s'] / row['tasks_per_s']:9.2f}x "
              f"{row['trip_us_median'] / base['trip_us_median']:8.2f}x "
              f"{base['map_items_per_s'] / row['map_items_per_s']:7.2f}x "
              f"{row['array64_s'] / base['array64_s']:7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
