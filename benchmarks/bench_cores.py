"""How far the machine itself scales: w independent processes, each running the same job.

    python benchmarks/bench_cores.py [--workers 1,2,4,8,16] [--kernels python,sgemm,mandelbrot,copy]
                                     [--repeat 5] [--pairs] [--json PATH]

Nothing is shared, sent or scheduled. For each count w (1 always, first), w processes are
forked, each with one BLAS thread; they run the job once to warm up, then ``--repeat``
times, all starting each round together at a barrier. On a machine that scaled perfectly
each process would take as long as one alone: aggregate speed-up = w x t(1) / t(w), where
t(w) is the median over rounds of the slowest process's time. That is the most any pool can
get from w workers on this machine for that kind of work: it includes clocks that drop as
more cores are busy, hyperthreads sold as cores, and shared caches and memory bandwidth.

Kernels: ``python`` (the irregular workload's pure-Python items 0..499), ``sgemm`` (one
256-row tile of the MLP workload, 1024 -> 4096 -> 1024 float32, the piece parrun's workers run
at 16 workers), ``mandelbrot`` (100 rows of the Mandelbrot workload, numba; skipped without
it) and ``copy`` (each process copies its own 64 MiB, float32; the numbers are GB/s read +
written in all).

``--pairs`` pins one process to the first CPU and another to each other CPU in turn, both
running the sgemm and python jobs, and prints how much the pair slows the first process
down against it alone just before: a CPU that shares a core with the first (a hyperthread
sibling) shows as a slowdown far above the rest.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from parrun.bench import _cost, machine_info, rerun_without_openblas_vars
from parrun.nn import _mandelbrot as M
from parrun.nn._mlp import _MLPTile

BARRIER_TIMEOUT = 120.0  # seconds a process waits for the others before it gives up
COPY_BYTES = 64 * 2**20


def _python_job() -> Callable[[], Any]:
    return lambda: [_cost(i) for i in range(500)]


def _sgemm_job() -> Callable[[], Any]:
    rng = np.random.default_rng(0)
    d, h, rows = 1024, 4096, 256
    w1 = (rng.standard_normal((d, h)) / 32).astype(np.float32)
    w2 = (rng.standard_normal((h, d)) / 64).astype(np.float32)
    tile = _MLPTile(w1, np.zeros(h, np.float32), w2, np.zeros(d, np.float32), "relu")
    x = rng.standard_normal((rows, d), dtype=np.float32)
    out = np.empty((rows, d), np.float32)

    def run() -> None:
        for _ in range(3):
            tile(x, out)
    return run


def _mandelbrot_job() -> Callable[[], Any]:
    size, it = 2000, 256
    rows = np.arange(950, 1050)
    out = np.empty((len(rows), size), np.int32)
    return lambda: M.escape_rows(rows, out, size, size, it, *M.VIEW)


def _copy_job() -> Callable[[], Any]:
    src = np.ones(COPY_BYTES // 4, np.float32)
    dst = np.zeros_like(src)

    def run() -> None:
        for _ in range(4):
            np.copyto(dst, src)
    return run


KERNELS: dict[str, Callable[[], Callable[[], Any]]] = {
    "python": _python_job, "sgemm": _sgemm_job, "mandelbrot": _mandelbrot_job, "copy": _copy_job}
# Work in one job, in its unit: GFLOP for sgemm, GB read + written for copy.
WORK = {"sgemm": 3 * 4 * 256 * 1024 * 4096 / 1e9, "copy": 4 * 2 * COPY_BYTES / 1e9}
UNIT = {"sgemm": "GFLOP/s", "copy": "GB/s"}


def _child(kernel: str, repeat: int, cpu: int | None, barrier: Any, conn: Any) -> None:
    """Send the job's times, or what went wrong (the barrier broken: the others stop
    waiting at once)."""
    from parrun._worker import _die_with_parent, limit_blas

    try:
        _die_with_parent()
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        limit_blas(1)  # (threadpool_limits alone left OpenBLAS's threads polling ~0.1 s)
        job = KERNELS[kernel]()  # each process builds its own inputs: nothing shared
        job()
        times = []
        for _ in range(repeat):
            barrier.wait(BARRIER_TIMEOUT)
            t0 = time.perf_counter()
            job()
            times.append(time.perf_counter() - t0)
        conn.send(times)
    except BaseException as e:
        barrier.abort()
        conn.send(e if isinstance(e, threading.BrokenBarrierError) else
                  RuntimeError(f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def together(kernel: str, w: int, repeat: int,
             cpus: list[int] | None = None) -> list[list[float]]:
    """Each of ``w`` forked processes' job times over ``repeat`` rounds started together;
    ``cpus`` pins process k to ``cpus[k]``."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(w)
    procs, conns = [], []
    try:
        for k in range(w):
            r, s = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(kernel, repeat, cpus[k] if cpus else None,
                                                 barrier, s), daemon=True)
            p.start()
            s.close()
            procs.append(p)
            conns.append(r)
        got = [c.recv() for c in conns]
    finally:
        for p in procs:
            p.join(BARRIER_TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [g for g in got if isinstance(g, BaseException)]
    if errors:  # the one that broke the barrier, not the others it stopped
        first = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)),
                     errors[0])
        raise RuntimeError(f"{kernel} x {w} processes: {first}")
    return got


def slowest(times: list[list[float]]) -> float:
    """The median over rounds of the slowest process's time."""
    return statistics.median(max(rnd) for rnd in zip(*times))


def main() -> int:
    rerun_without_openblas_vars()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4,8,16")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pairs", action="store_true", help="pin pairs of processes to CPUs")
    ap.add_argument("--json", help="write every time here")
    a = ap.parse_args()
    try:
        counts = [int(w) for w in a.workers.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        ap.error(f"--workers: positive integers separated by commas, got {a.workers!r}")
    if a.repeat < 1:
        ap.error(f"--repeat: a positive integer, got {a.repeat}")
    counts = sorted(set(counts) | {1})  # 1 process, first: what the speed-ups are against
    kernels = a.kernels.split(",")
    if unknown := [k for k in kernels if k not in KERNELS]:
        ap.error(f"--kernels: unknown {', '.join(unknown)}; choose from {', '.join(KERNELS)}")
    if not M.HAVE_NUMBA and "mandelbrot" in kernels:
        print("mandelbrot: skipped, numba not installed")
        kernels.remove("mandelbrot")
    cpus = sorted(os.sched_getaffinity(0))
    result: dict[str, Any] = {"machine": machine_info(), "repeat": a.repeat, "kernels": {},
                              "pairs": {}}

    def save() -> None:
        if a.json:  # after every kernel: a run cut short keeps what it measured
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)

    print(f"{len(cpus)} CPUs usable; w independent processes, one BLAS thread each, "
          f"median of {a.repeat} rounds of the slowest process")
    for kernel in kernels:
        unit = UNIT.get(kernel)
        print(f"\n{kernel}\n{'w':>3} {'job s':>8} {'slowdown':>9} {'speed-up':>9} "
              f"{'effic.':>7}" + (f" {unit:>9}" if unit else ""))
        rows = result["kernels"][kernel] = {}
        t1 = None
        for w in counts:
            times = together(kernel, w, a.repeat)
            t = slowest(times)
            t1 = t1 or t
            rows[w] = times
            line = f"{w:>3} {t:8.4f} {t / t1:8.2f}x {w * t1 / t:8.2f}x {t1 / t:7.2f}"
            if unit:
                line += f" {w * WORK[kernel] / t:9.1f}"
            print(line, flush=True)
        save()
    if a.pairs and not {"sgemm", "python"} & set(kernels):
        print("\npairs: skipped, they run the sgemm and python kernels (see --kernels)")
    if a.pairs and len(cpus) > 1:
        first = cpus[0]
        print(f"\npairs: slowdown of a process pinned to CPU {first} while another runs on "
              "CPU j (1.00 = none)")
        for kernel in [k for k in ("sgemm", "python") if k in kernels]:
            slow, alone = {}, {}
            for j in cpus[1:]:
                # Alone just before each pair: a shared machine's speed drifts over a run.
                alone[j] = slowest(together(kernel, 1, a.repeat, [first]))
                times = together(kernel, 2, a.repeat, [first, j])
                slow[j] = statistics.median(times[0]) / alone[j]
            result["pairs"][kernel] = {"cpu": first, "alone_s": alone, "slowdown": slow}
            print(f"{kernel:>10}: " + " ".join(f"{j}:{s:.2f}" for j, s in slow.items()),
                  flush=True)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
