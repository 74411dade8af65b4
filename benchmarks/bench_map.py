"""parrun.map against the peers on a 512 MiB float32 chain, side by side in one run.

    python benchmarks/bench_map.py [--n 134217728] [--repeat 5] [--json out.json]

The chain is ``y = tanh(1.7 x + 0.3)**2 - 0.5 x``. Every method computes the same ``y`` (checked
against the serial result) and is timed ``--repeat`` times after one warm-up. The script
re-executes itself without ``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` (they slow NumPy kernels
on some machines) and prints the BLAS that threadpoolctl sees.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import parrun
from parrun.bench import (
    NUMEXPR_CHAIN,
    _chain_into,
    _times,
    numexpr_locals,
    positive_int,
    rerun_without_openblas_vars,
)

TILE = 65536  # elements per serial tile: 256 KiB of float32, L2-resident


def chain(x):
    return np.tanh(1.7 * x + 0.3) ** 2 - 0.5 * x


chain_out = _chain_into  # (x, out, tmp): the chain through ufuncs with out=


_SCRATCH: dict[str, np.ndarray] = {}


def chain_kernel(x, out):
    """The chain written into ``out`` through one reused tile-sized scratch buffer: the
    kernel both the serial tiled loop and parrun.map (fn takes ``out``) run."""
    buf = _SCRATCH.get("tmp")
    if buf is None or len(buf) < len(x) or buf.dtype != x.dtype:
        buf = _SCRATCH["tmp"] = np.empty(max(len(x), TILE), x.dtype)
    return chain_out(x, out, buf[: len(x)])


def serial_tiled_natural(x, out):
    for lo in range(0, len(x), TILE):
        out[lo:lo + TILE] = chain(x[lo:lo + TILE])


def serial_tiled(x, out):
    for lo in range(0, len(x), TILE):
        chain_kernel(x[lo:lo + TILE], out[lo:lo + TILE])


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakAnon:
    """Samples the private (anonymous) resident memory of some processes every 5 ms."""

    def __init__(self, pids):
        self.pids = list(pids)
        self.base = sum(_rss_anon(p) for p in self.pids)
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, sum(_rss_anon(p) for p in self.pids))

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()

    @property
    def growth(self):
        return self.peak - self.base


def _mp_chunk(block):
    return chain(block)


def _joblib_chunk(x, lo, hi):
    return chain(x[lo:hi])


def check(name: str, y: np.ndarray, ref: np.ndarray) -> None:
    err = float(np.max(np.abs(np.asarray(y) - ref)))
    if not err <= 1e-5:  # nan too: a value nobody wrote
        raise AssertionError(f"{name}: max abs error {err}")


def timed_and_checked(name: str, fn, repeat: int, out: np.ndarray, ref: np.ndarray,
                      result=None) -> list[float]:
    """``fn``'s seconds (one warm-up, ``repeat`` timed runs); then, if given, ``result()``
    checked against ``ref``. ``out`` is filled with NaN first: the methods share it, and a
    method that wrote nothing would otherwise pass on the previous method's numbers."""
    if result is not None:
        out.fill(np.nan)
    ts = _times(fn, repeat, warmup=1)
    if result is not None:
        check(name, result(), ref)
    return ts


def main():
    rerun_without_openblas_vars()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=positive_int, default=2**27,
                    help="elements (default 2**27 = 512 MiB)")
    ap.add_argument("--repeat", type=positive_int, default=5)
    ap.add_argument("--skip-slow", action="store_true",
                    help="skip the peers that take seconds a run (whole-array NumPy, mp.Pool)")
    ap.add_argument("--json", help="write the raw timings here")
    args = ap.parse_args()
    n, rep = args.n, args.repeat
    nbytes = 2 * n * 4  # read x, write y
    from threadpoolctl import threadpool_info

    blas = [(i.get("internal_api"), i.get("architecture"), i.get("num_threads"))
            for i in threadpool_info()]
    print(f"n = {n:,} float32 ({n * 4 / 2**20:.0f} MiB), repeat {rep}, cores "
          f"{parrun.default_workers()}, numpy {np.__version__}, BLAS {blas}")

    rng = np.random.default_rng(0)
    x = parrun.asshared(rng.standard_normal(n, dtype=np.float32))
    out = parrun.empty(n, np.float32)
    ref = np.empty(n, np.float32)
    serial_tiled(x, ref)
    results: dict[str, list[float]] = {}
    notes: dict[str, str] = {}

    def run(name, fn, result=None):
        ts = results[name] = timed_and_checked(name, fn, rep, out, ref, result)
        print(f"  {name:<34} median {statistics.median(ts):8.4f} s  min {min(ts):8.4f} s")

    print("timings:")
    if not args.skip_slow:
        holder = {}
        run("numpy whole array (natural)", lambda: holder.__setitem__("y", chain(x)),
            lambda: holder["y"])
        del holder
    whole_tmp = np.empty(n, np.float32)
    run("numpy whole array, ufuncs out=", lambda: chain_out(x, out, whole_tmp), lambda: out)
    run("numpy serial 64K tiles", lambda: serial_tiled(x, out), lambda: out)
    run("numpy serial 64K tiles, natural", lambda: serial_tiled_natural(x, out), lambda: out)

    mem = {}
    with parrun.Pool(2, pin=True) as pool:
        run("parrun.map 2 workers pinned, out=",
            lambda: pool.map(chain_kernel, x, out=out), lambda: out)
    for w in (1, 2):
        with parrun.Pool(w) as pool:
            s = "s" if w > 1 else ""
            run(f"parrun.map {w} worker{s}, out= kernel",
                lambda pool=pool: pool.map(chain_kernel, x, out=out), lambda: out)
            run(f"parrun.map {w} worker{s}, natural",
                lambda pool=pool: pool.map(chain, x, out=out), lambda: out)
            if w == 2:
                print(f"    last_stats: {pool.last_stats}".replace("\n", "\n    "))
                with PeakAnon([os.getpid(), *pool.pids]) as peak:
                    for _ in range(3):
                        pool.map(chain_kernel, x, out=out)
                mem["parrun 2 workers"] = peak.growth
                small = parrun.asshared(np.ones(1000, np.float32))
                small_out = parrun.empty(1000, np.float32)
                for fn_name, fn in (("np.negative", np.negative), ("chain", chain)):
                    for _ in range(200):
                        pool.map(fn, small, out=small_out)
                    ts = []
                    for _ in range(3000):
                        t = time.perf_counter()
                        pool.map(fn, small, out=small_out)
                        ts.append(time.perf_counter() - t)
                    results[f"overhead 1000 elements, {fn_name}"] = ts
                    print(f"  per-call overhead, 1,000 elements, fn={fn_name}: median "
                          f"{statistics.median(ts) * 1e6:.0f} us, min {min(ts) * 1e6:.0f} us")
                small.release()
                small_out.release()

    block = 2**20  # 4 MiB of float32
    with ThreadPoolExecutor(2) as ex:
        def threads():
            def one(lo):
                out[lo:lo + block] = chain(x[lo:lo + block])
            list(ex.map(one, range(0, n, block)))
        run("ThreadPoolExecutor 2 x 4 MiB blocks", threads, lambda: out)

    xs = np.asarray(x)
    if not args.skip_slow:
        with mp.get_context("fork").Pool(2) as mpp:
            def mpool():
                parts = mpp.map(_mp_chunk, [xs[lo:lo + block] for lo in range(0, n, block)])
                np.concatenate(parts, out=out)
            run("multiprocessing.Pool 2, 4 MiB chunks", mpool, lambda: out)
    try:
        import joblib

        with joblib.Parallel(n_jobs=2, max_nbytes="1M", mmap_mode="r") as par:
            chunk = n // 8

            def jl():
                parts = par(joblib.delayed(_joblib_chunk)(xs, lo, lo + chunk)
                            for lo in range(0, n, chunk))
                np.concatenate(parts, out=out)
            run("joblib 2 (memmapped input)", jl, lambda: out)
    except ImportError:
        notes["joblib"] = "not installed: skipped"
    try:
        import numexpr as ne

        ne.set_num_threads(2)
        local = numexpr_locals(xs)  # float32 constants: computed in float32, as the others
        run("numexpr 2 threads",
            lambda: ne.evaluate(NUMEXPR_CHAIN, local_dict=local, out=out), lambda: out)
    except ImportError:
        notes["numexpr"] = "not installed: skipped"

    half = n // 2
    with ThreadPoolExecutor(2) as ex:
        def copy2():
            list(ex.map(lambda lo: np.copyto(out[lo:lo + half], xs[lo:lo + half]),
                        (0, half)))
        run("2-way np.copyto (bandwidth ref)", copy2)

    for k, v in notes.items():
        print(f"  {k}: {v}")
    base = statistics.median(results["parrun.map 2 workers, out= kernel"])
    print("\nmethod                               median s    min s    GB/s   time / parrun-2")
    for name, ts in results.items():
        if name.startswith("overhead"):
            continue
        med = statistics.median(ts)
        print(f"{name:<36} {med:8.4f} {min(ts):8.4f} {nbytes / med / 1e9:7.2f} "
              f"{med / base:10.2f}x")
    print(f"\npeak private memory growth, parent + 2 workers, during parrun.map: "
          f"{mem['parrun 2 workers'] / 2**20:.1f} MiB (input and output are shared: "
          f"{2 * n * 4 / 2**20:.0f} MiB)")
    med = {k: statistics.median(v) for k, v in results.items()}
    tt, tn = med["numpy serial 64K tiles"], med["numpy serial 64K tiles, natural"]
    print("speed-ups (median over median):")
    print(f"  out= kernel: parrun 2 workers {tt / base:.2f}x serial tiled (pinned: "
          f"{tt / med['parrun.map 2 workers pinned, out=']:.2f}x); 1 worker takes "
          f"{med['parrun.map 1 worker, out= kernel'] / tt:.3f}x the serial time")
    print(f"  natural:     parrun 2 workers "
          f"{tn / med['parrun.map 2 workers, natural']:.2f}x serial tiled; 1 worker takes "
          f"{med['parrun.map 1 worker, natural'] / tn:.3f}x the serial time")
    for peer in ("ThreadPoolExecutor 2 x 4 MiB blocks", "joblib 2 (memmapped input)",
                 "numpy whole array (natural)", "multiprocessing.Pool 2, 4 MiB chunks",
                 "numexpr 2 threads"):
        if peer in med:
            print(f"  parrun 2 workers (out= kernel) vs {peer}: {med[peer] / base:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": n, "repeat": rep, "timings_s": results,
                       "peak_private_growth_bytes": mem, "notes": notes}, f, indent=1)


if __name__ == "__main__":
    main()
