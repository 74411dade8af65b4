"""``Pool``: warm worker processes that run jobs by work stealing over shared memory.

Data flow of ``pool.map(fn, x, out=out)``::

    parent                                  worker k (one of N, started once)
    ------                                  --------
    x, out -> handles (name, offset, ...)   maps each segment once, caches it
    fn -> cloudpickle bytes, key = hash  -> Function(key, bytes), only if k lacks key
    control block: ranges, abort = 0
    Job(key, handles, grain)             -> loop: take a piece of its range (or steal half
                                                 of the fullest other range); out[lo:hi] =
                                                 fn(x[lo:hi]); count it
    wait for Done from every worker      <- Done(error or None, partial)
    read counters -> last_stats

Who does what:

* the parent starts a job, waits, and reacts to deaths (process sentinels); it never hands out
  pieces. It wakes as many workers as the job can keep busy; a function's first call, whose
  cost is unknown, wakes the rest after ``LATE_WAKE_S`` if rows are still left (they steal);
* a worker unpickles a function at its first use, with a piece of its own already claimed;
* workers split the work among themselves through the control block (``_scheduler``);
* ``_shm`` owns every segment; only handles and small records cross the pipes (``_protocol``).

A worker that dies mid-job is seen at once through its sentinel. The others finish the job
(stealing what the dead worker had left); the parent then re-runs the piece the dead worker
held (map pieces are idempotent), starts a replacement in its slot, and returns normally. A
reduction cannot re-run a lost partial, so it raises ``WorkerCrashed`` instead.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import inspect
import math
import multiprocessing as mp
import os
import pickle
import secrets
import select
import signal
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import wait as _wait
from typing import Any

import numpy as np

from . import _protocol as P
from . import _shm, _worker
from ._checks import (
    check_arrays,
    check_first_result,
    check_fn,
    check_grain,
    check_out,
    check_ufunc_out,
    out_fits,
    store_result,
)
from ._errors import BrokenPool, PoolClosedError, WorkerCrashed, describe_exit
from ._functions import pickle_function
from ._process import (
    default_start_method,
    drop_dead_forkserver,
    forget_forkserver,
    forkserver_pid,
    process_class,
)
from ._scheduler import ControlBlock, control_size, initial_ranges
from ._worker import TARGET_PIECE_NS

# Bytes of input per piece. Smaller pieces pay the ~5 us of per-piece bookkeeping too often;
# larger ones push a chain of NumPy temporaries out of L2 (typically 256 KiB - 2 MiB a core).
TILE_BYTES = 256 * 1024
# Rows map runs first, when it allocates ``out``, to learn the output's shape and dtype (and
# the cost of a row); fewer where the grain is smaller, at least a row for each worker. Rows
# of a cost known to be small run as one piece in one worker; others in pieces sized by their
# cost, the first of one row, with the other workers woken after LATE_WAKE_S if rows are left
# (a first piece of a grain of n / workers rows, run alone, made such a map take twice as
# long). More delays the parallel part; fewer gives a noisier first cost estimate.
PROBE_ROWS = 8
# Effort np.shares_memory may spend telling whether two views of one segment overlap before
# map assumes they do (and copies the input).
SHARES_MEMORY_WORK = 10_000
_TooHardError = getattr(np, "exceptions", np).TooHardError  # (np.exceptions: NumPy 1.25+)
# A worker is woken only for at least this much work (known cost): a wake-up and a reply cost
# ~30-60 us, so smaller shares make a job slower, not faster.
MIN_SHARE_S = 100e-6
# A function's first call (cost unknown) starts on as many workers as it has pieces; if it is
# still running after this long with items left, the rest are woken too (they start by
# stealing). Sooner wastes wake-ups on trivial calls; later delays a costly first call.
LATE_WAKE_S = 1e-3
# Functions a pool keeps cached in its workers; the oldest are dropped beyond this many, or
# beyond this many bytes of pickles (what they capture by value: a closure over a plain 16 MB
# array holds its own copy in every worker; 20 such closures took workers from 47 to 370 MB).
# The function just used is kept whatever its size.
FN_CACHE_SIZE = 256
FN_CACHE_BYTES = 256 * 2**20
# Seconds to wait for a worker to start, to stop, or to leave an aborted job.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0
# Seconds a worker may take to finish its current piece after Ctrl-C before it is killed and
# replaced. Longer keeps the caller waiting; shorter kills workers in healthy long pieces.
INTERRUPT_GRACE = 0.5
# Seconds a dead worker's status pipe may take to report its end (EOF) once its process is
# gone. It normally does at once; if a stray copy of the pipe's write end outlives the worker
# (a process it forked, say), the pipe never does, and the worker counts as dead after this.
# Shorter could drop a last Done still in flight; longer delays the recovery.
DEAD_PIPE_GRACE = 1.0
# Seconds the caller polls for workers' replies before it sleeps. Longer burns a core that a
# worker may need; shorter pays a sleep and a wake-up (~30 us) on every short call.
SPIN_S = 100e-6
# Worker deaths one call survives (re-running what they lost) before it fails with
# WorkerCrashed. A function that kills its process every time (a segfault in compiled code)
# would otherwise kill and replace workers forever; fewer turns a few unrelated deaths (the
# OOM killer, an operator's kill) into a failed call.
MAX_DEATHS_PER_CALL = 4
# Tries to start a replacement worker that dies while starting (killed, out of memory).
START_TRIES = 3

_live_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


def usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def default_workers() -> int:
    """``PARRUN_NUM_WORKERS`` if set, else the number of usable cores."""
    env = os.environ.get("PARRUN_NUM_WORKERS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"PARRUN_NUM_WORKERS must be a positive integer, got {env!r}") \
                from None
        if n < 1:
            raise ValueError(f"PARRUN_NUM_WORKERS must be a positive integer, got {env!r}")
        return n
    return usable_cores()


@dataclass(frozen=True)
class WorkerStats:
    """One worker's share of a job."""

    slot: int
    pid: int
    items: int
    pieces: int
    steals: int
    busy_s: float
    idle_s: float


@dataclass(frozen=True)
class JobStats:
    """What the last job did: ``pool.last_stats``.

    ``items`` counts every index of the job; ``probe_items`` of them ran first, to learn the
    output's shape and dtype (``map`` with no ``out``: a piece in one worker, or, when the
    rows may be slow, a row a worker at once); they are in ``workers``' counts and busy
    times, and ``wall_s`` is the whole call's. ``recovered`` counts the pieces run again
    after a worker died (a probe run again is not counted).
    """

    items: int
    pieces: int
    steals: int
    wall_s: float
    workers: tuple[WorkerStats, ...]
    probe_items: int = 0
    recovered: int = 0

    @property
    def busy_s(self) -> tuple[float, ...]:
        """Seconds each worker spent running ``fn`` in this call."""
        return tuple(w.busy_s for w in self.workers)

    def __str__(self) -> str:
        lines = [f"{_n(self.items, 'item')} in {_n(self.pieces, 'piece')}, "
                 f"{_n(self.steals, 'steal')}, {self.wall_s * 1e3:.2f} ms wall"
                 + (f", {_n(self.recovered, 'piece')} re-run after a crash"
                    if self.recovered else "")
                 + (f"; the first {self.probe_items} ran first, to learn the output's "
                    "shape and dtype" if self.probe_items else "")]
        for w in self.workers:
            lines.append(f"  worker {w.slot} (pid {w.pid}): {_n(w.items, 'item')}, "
                         f"{_n(w.pieces, 'piece')}, {_n(w.steals, 'steal')}, busy "
                         f"{w.busy_s * 1e3:.2f} ms, idle {w.idle_s * 1e3:.2f} ms")
        return "\n".join(lines)


def _n(count: int, noun: str) -> str:
    """``1 piece``, ``2 pieces``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class _WorkerHandle:
    __slots__ = (
        "cmd",
        "fn_keys",
        "forget_fns",
        "forget_segments",
        "pid",
        "process",
        "ready",
        "slot",
        "status",
        "tag",
    )

    def __init__(self, slot: int, process: Any, cmd: Any, status: Any, tag: str):
        self.slot = slot
        self.process = process
        self.cmd = cmd
        self.status = status
        self.tag = tag  # in the names of the segments it makes (see _close_handle)
        self.pid = process.pid
        self.ready = False  # its Ready message was read (an interrupt may cut that short)
        self.fn_keys: set[bytes] = set()
        # What this worker must drop, told with the next job or round of tasks it gets.
        self.forget_segments: list[str] = []
        self.forget_fns: list[bytes] = []


class Pool:
    """A pool of warm worker processes that run NumPy work over shared memory.

    Args:
        workers: number of worker processes; default ``PARRUN_NUM_WORKERS`` or the number of
            usable cores.
        blas_threads: BLAS threads per worker (threadpoolctl); None leaves BLAS alone.
        pin: pin worker k to the k-th usable core (psutil).
        start_method: 'forkserver' (default on Linux) or 'spawn'.
        initializer: called as ``initializer(*initargs)`` in each worker when it starts (and
            in replacements); if it raises, the pool cannot start: ``BrokenPool``.
        retries: how many times a submitted task whose worker died is run again before its
            future fails with ``WorkerCrashed``.
        backend: 'local' (worker processes on this machine), or 'dask': the same API on a
            Dask distributed cluster, ``Pool(backend="dask", client=... or address=...)``,
            which returns a ``parrun.backends.DaskPool`` (see it for its arguments).

    The pool is a context manager; ``close()`` stops the workers and frees the pool's segments.
    One job (a map, or the tasks in flight) runs at a time; calls from several threads queue.
    """

    def __new__(cls, *args: Any, backend: str = "local", **kwargs: Any) -> Pool:
        if backend == "dask" and cls is Pool:
            from .backends._dask import DaskPool  # imports dask: only when asked for

            return super().__new__(DaskPool)
        if backend not in ("local", "dask"):
            raise ValueError(f"backend must be 'local' or 'dask', got {backend!r}")
        return super().__new__(cls)

    def __init__(self, workers: int | None = None, *, blas_threads: int | None = 1,
                 pin: bool = False, start_method: str | None = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple = (),
                 retries: int = 0, backend: str = "local") -> None:
        if _worker.IN_WORKER or getattr(_worker.IN_TASK, "on", False):
            raise RuntimeError("a parrun.Pool cannot start in a pool's worker process (fn of "
                               "a map or a task runs there): pools do not nest; call NumPy "
                               "directly in fn, or make the inner call from the caller")
        if workers is None:
            workers = default_workers()
        workers = _count("workers", workers, 1)
        if blas_threads is not None:
            blas_threads = _count("blas_threads", blas_threads, 1, " (or None)")
        retries = _count("retries", retries, 0)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._initializer = None
        if initializer is not None:
            try:
                self._initializer = _shm.dumps((initializer, tuple(initargs)))
            except Exception as e:
                raise TypeError(f"initializer or initargs could not be pickled: {e}") from e
        self.retries = retries
        self._tasks: Any = None
        self._tasks_lock = threading.Lock()
        self._stopped = False
        self._terminating = False
        self._generation = 0  # bumped whenever a worker is replaced
        self._dead_poll: tuple[int, Any, dict[int, int]] = (-1, None, {})
        self._in_flight: dict[Any, int] | None = None  # see _run_phase
        self.workers = workers
        self.blas_threads = blas_threads
        self.start_method = start_method or default_start_method()
        self._ctx = mp.get_context(self.start_method)
        self._Process = process_class(self.start_method)
        self._cpus = sorted(os.sched_getaffinity(0)) if (pin and hasattr(
            os, "sched_getaffinity")) else None
        self._lock = threading.RLock()
        # Maps waiting for the lock, which the task collector holds while tasks are in
        # flight: it hands out no new task while one waits (a steady stream of tasks kept a
        # map waiting for as long as it lasted), and takes the lock again after them.
        self._turn = threading.Condition()
        self._maps_waiting: list[object] = []  # a token per map (see _map_turn)
        self._pid = os.getpid()  # a copy in a forked child must not stop our workers
        self._closed = False
        self._job_id = 0
        # fn key -> (the segments its pickle names, its bytes), least recently used first
        self._fn_lru: OrderedDict[bytes, tuple[frozenset[str], int]] = OrderedDict()
        self._fn_bytes = 0  # the pickles' bytes in _fn_lru
        self._fn_lock = threading.Lock()
        self._evicted: list[bytes] = []  # keys that left the LRU, for _queue_forgets
        # (fn key, input bytes per row) -> nanoseconds per item measured on the last job:
        # sizes pieces and decides how many workers a small job is worth waking. By row size
        # too: np.exp's cost per 1-element row once sent 48 rows of 3 MB to one worker.
        self._cost: OrderedDict[tuple[bytes, int], float] = OrderedDict()
        self._released = _shm.ReleaseLog()
        # Segments this pool's maps made, kept for its next maps once no view of them is left
        self._recycler = _shm.Recycler(_shm.recycle_limit())
        seg, raw = _shm.create_segment(control_size(workers), keep_fd=True)
        self._control_name = seg.name
        self._control_raw = raw
        # The parent takes slot locks only when it adds submitted tasks to ranges.
        self._cb = ControlBlock(raw, seg.fd, workers)
        self._workers: list[_WorkerHandle] = []
        self.last_stats: JobStats | None = None
        t0 = time.perf_counter()
        try:
            for k in range(workers):
                self._workers.append(self._launch(k))
            for k in range(workers):
                self._await_ready(self._workers[k])
        except BaseException:
            self._terminate_all()
            _shm.release_segment(self._control_name)
            self._recycler.close()
            raise
        self.startup_s = time.perf_counter() - t0
        _live_pools.add(self)

    # -- processes ------------------------------------------------------------------------
    def _launch(self, slot: int) -> _WorkerHandle:
        cmd_r, cmd_w = self._ctx.Pipe(duplex=False)
        st_r, st_w = self._ctx.Pipe(duplex=False)
        cpu = self._cpus[slot % len(self._cpus)] if self._cpus else None
        tag = secrets.token_hex(4)
        for attempt in (1, 2):
            proc = self._Process(
                target=_worker.main, name=f"parrun-worker-{slot}", daemon=True,
                args=(slot, cmd_r, st_w, self._control_name, self.workers, self.blas_threads,
                      cpu, self._initializer, tag))
            server = forkserver_pid()
            try:
                proc.start()
                break
            except (EOFError, ConnectionRefusedError, ConnectionResetError):
                # The fork server died (not a worker killed as it read its start data:
                # BrokenPipeError): a new one, once. (No server as the start began: the
                # one this start launched.)
                if attempt == 2 or not drop_dead_forkserver(server or forkserver_pid()):
                    raise
        cmd_r.close()
        st_w.close()
        return _WorkerHandle(slot, proc, cmd_w, st_r, tag)

    def _await_ready(self, w: _WorkerHandle) -> None:
        ready = _wait([w.status, w.process.sentinel], timeout=START_TIMEOUT)
        if w.status in ready:
            try:
                msg = pickle.loads(w.status.recv_bytes())
                if isinstance(msg, P.Ready):
                    w.ready = True
                    return
                if isinstance(msg, P.InitFailed):
                    w.process.join(STOP_TIMEOUT)
                    raise BrokenPool(f"the initializer failed in worker {w.slot} (pid "
                                     f"{w.pid}); the pool cannot start") from msg.error
            except EOFError:
                pass
        if not ready:
            # Killed: a hung initializer's worker outlived close() (its handle dropped)
            w.process.kill()
        w.process.join(STOP_TIMEOUT if not ready else 0.5)
        raise _StartFailed(
            f"worker {w.slot} (pid {w.pid}) failed to start: "
            + (describe_exit(w.process.exitcode) if ready else
               f"not ready after {START_TIMEOUT:g} s (a hung initializer?); killed"),
            pid=w.pid, exitcode=w.process.exitcode)

    def _replace(self, slot: int) -> None:
        if self._terminating:  # terminate() killed it: a call in flight fails, none restarts
            raise BrokenPool("the pool was terminated")
        old = self._workers[slot]
        for attempt in range(1, START_TRIES + 1):
            with _sigint_deferred():  # Ctrl-C here once left the pool broken for good
                self._generation += 1
                w = self._launch(slot)
                # In place before the old handle closes: an interrupt (SIGALRM's, say) never
                # leaves a closed handle in the pool; one not ready is seen by _replace_dead.
                self._workers[slot] = w
                if old is not None:
                    _close_handle(old)
            old = w
            try:
                # Not deferred: Ctrl-C waited out START_TRIES x START_TIMEOUT for a hung
                # initializer. Interrupted, the worker is awaited again by _replace_dead.
                self._await_ready(w)
                return
            except _StartFailed:  # died while starting (an initializer failure is final)
                if attempt == START_TRIES:
                    raise

    def _replace_dead(self, tolerate: bool = False) -> set[int]:
        """Replace the workers that have died since the last call (one poll, ~1 us). A dead
        worker's status pipe hangs up as it exits; its sentinel (the fork server's report of
        its exit status) can come milliseconds later on a busy machine, so both are
        watched. With ``tolerate``, return the slots whose replacement failed to start
        instead of raising ``WorkerCrashed``."""
        if self._dead_poll[0] != self._generation:
            poll = select.poll()
            slots = {}
            for w in self._workers:
                poll.register(w.process.sentinel, select.POLLIN)
                poll.register(w.status.fileno(), 0)  # 0: hang-ups (and errors) only
                slots[w.process.sentinel] = slots[w.status.fileno()] = w.slot
            self._dead_poll = (self._generation, poll, slots)
        _gen, poll, slots = self._dead_poll
        for w in self._workers:
            if not w.ready:  # an interrupt cut its start short: its Ready is still to read
                try:
                    self._await_ready(w)
                except WorkerCrashed:
                    w.process.kill()  # replaced below
        down = set()
        for slot in sorted({slots[fd] for fd, _ in poll.poll(0)}):
            self._workers[slot].process.join(STOP_TIMEOUT)
            try:
                self._replace(slot)
            except WorkerCrashed:
                if not tolerate:
                    raise
                down.add(slot)
        return down

    def _terminate_all(self) -> None:
        for w in self._workers:
            if w.process.is_alive():
                w.process.kill()
        for w in self._workers:
            w.process.join(STOP_TIMEOUT)
            _close_handle(w)

    def _own_segments(self) -> set[str]:
        """Names of the segments the pool itself holds (control block, task arena, and those
        it keeps for its next maps)."""
        names = {self._control_name} | self._recycler.names
        if self._tasks is not None and self._tasks.arena_seg is not None:
            names.add(self._tasks.arena_seg.name)
        return names

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [w.pid for w in self._workers]

    @property
    def closed(self) -> bool:
        """True once ``close`` or ``terminate`` was called, and in a process forked from the
        one that made the pool (its workers are not that process's to use)."""
        return self._closed or self._pid != os.getpid()

    def close(self) -> None:
        """Stop the workers and free the pool's own segments. Idempotent.

        Submitted tasks that have not started are cancelled; those running finish first.
        Called in a done-callback of this pool's futures, it returns at once and a
        background thread closes the pool. In a child made by ``os.fork()`` it only marks
        the child's copy closed: the workers are the parent's.
        """
        if self._closed:
            return
        self._closed = True
        if self._pid != os.getpid():
            return  # a copy in a child of os.fork(): the workers are the parent's
        if self._in_collector():
            threading.Thread(target=self._stop, name="parrun-close").start()
            return
        self._stop()

    def _in_collector(self) -> bool:
        """True in the thread that serves tasks and runs their done-callbacks: it cannot
        wait for itself (the running tasks failed, and the task arena leaked)."""
        tasks = self._tasks
        return tasks is not None and threading.current_thread() is tasks.thread

    def _stop(self) -> None:
        if self._tasks is not None:
            self._tasks.close()
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            stop = pickle.dumps(P.Stop())
            for w in self._workers:
                try:
                    w.cmd.send_bytes(stop)
                except OSError:
                    pass
            deadline = time.monotonic() + STOP_TIMEOUT
            for w in self._workers:
                w.process.join(max(0.0, deadline - time.monotonic()))
            self._terminate_all()
            _shm.release_segment(self._control_name)
            self._recycler.close()
            _live_pools.discard(self)

    def terminate(self) -> None:
        """Stop now: kill the workers, fail tasks in flight with ``BrokenPool``, free the
        pool's segments (from a done-callback, in a background thread)."""
        if self._pid != os.getpid():
            self._closed = True
            return  # a copy in a child of os.fork(): the workers are the parent's
        if self._in_collector():
            self._closed = True
            threading.Thread(target=self.terminate, name="parrun-terminate").start()
            return
        self._closed = True
        self._terminating = True
        tasks = self._tasks
        if tasks is not None:
            tasks.cancel_pending()
            with tasks.cv:
                tasks.closing = True
                tasks.cv.notify()
        for w in self._workers:
            try:
                if w.process.is_alive():
                    w.process.kill()
            except ValueError:  # closed: a close() in another thread has already stopped it
                pass
        if tasks is not None:
            tasks.close(timeout=STOP_TIMEOUT)
            tasks.fail_all(BrokenPool("the pool was terminated"))
        self.close()
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self._terminate_all()
                _shm.release_segment(self._control_name)
                self._recycler.close()
                _live_pools.discard(self)

    # -- tasks ----------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` in a worker; return a ``concurrent.futures.Future``.

        The task enters the same work-stealing scheduler as ``map`` (a range of one item).
        Shared arrays in the arguments travel as handles; plain arrays of 1 MiB or more go
        through a temporary shared segment, and so do such results; the rest is pickled
        (cloudpickle). Exceptions, a dead worker (``WorkerCrashed``) and unpicklable
        arguments or results end up on the future.
        """
        self._check_open()
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        tasks = self._tasks
        if tasks is None:
            with self._tasks_lock:
                self._check_open()
                if self._tasks is None:
                    from ._tasks import TaskService

                    # (Ctrl-C as its thread started left that thread and its arena to the
                    # process: the pool never saw them)
                    with _sigint_deferred():
                        self._tasks = TaskService(self, self.retries)
                tasks = self._tasks
        return tasks.submit(fn, args, kwargs)

    @property
    def task_stats(self) -> Any:
        """Counters of submitted tasks (``TaskStats``), or None before the first submit."""
        return None if self._tasks is None else self._tasks.stats

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            # Ctrl-C: stop now (as multiprocessing.Pool's __exit__ does) rather than wait
            # for the tasks in flight, which may run for minutes.
            self.terminate()
        else:
            self.close()

    def __del__(self) -> None:
        try:
            if not self._closed and not sys.is_finalizing() and self._pid == os.getpid():
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<parrun.Pool workers={self.workers} start_method={self.start_method!r} {state}>"

    def _check_open(self) -> None:
        if self._pid != os.getpid():
            # Its pipes and control block are shared with the parent: a child driving the
            # same workers read the parent's messages, or hung.
            raise PoolClosedError(
                f"this parrun.Pool belongs to process {self._pid}; a process forked from it "
                f"(os.fork(), multiprocessing's 'fork' start method) cannot use its workers: "
                "create a new Pool there (parrun.map and parrun.default_pool() do so by "
                "themselves)")
        if self._closed:
            raise PoolClosedError("this parrun.Pool is closed; create a new Pool (or use "
                                  "parrun.default_pool())")

    # -- functions ------------------------------------------------------------------------
    def _register(self, fn: Callable[..., Any],
                  what: str = "fn") -> tuple[bytes, bytes, float | None]:
        """Pickle ``fn`` (cached), note it in the pool's LRU; return (key, bytes, where fn
        takes ``out``: ``_checks.out_position``).

        Called from any thread (``submit``): it touches only the LRU. What workers hold is
        changed only where jobs and tasks are sent (see ``_queue_forgets``)."""
        key, data, out_at, names = pickle_function(fn, what)
        self._note_function(key, names, len(data))
        return key, data, out_at

    def _note_function(self, key: bytes, names: frozenset[str] = frozenset(),
                       nbytes: int = 0) -> None:
        """Put ``key`` (a pickle of ``nbytes``) at the fresh end of the LRU of functions the
        workers hold."""
        with self._fn_lock:
            lru = self._fn_lru
            if key in lru:
                lru.move_to_end(key)
            else:
                lru[key] = (names, nbytes)
                self._fn_bytes += nbytes
                while len(lru) > 1 and (len(lru) > FN_CACHE_SIZE
                                        or self._fn_bytes > FN_CACHE_BYTES):
                    old, (_, size) = lru.popitem(last=False)
                    self._fn_bytes -= size
                    self._evicted.append(old)

    def _queue_forgets(self) -> None:
        """Note, for each worker, what it must drop before its next message: functions that
        left the LRU, segments released since the last call, and functions whose pickles
        name those segments (a worker's cached function holds its mapping of them, whose
        memory stays in use as long as the function). Called where messages to workers are
        sent (under ``_lock``, or serving tasks), and before ``_send_forgets``: a function
        sent after its forgetting is kept."""
        released = self._released.drain()
        if not released and not self._evicted:
            return
        gone = set(released)
        with self._fn_lock:
            evicted, self._evicted = self._evicted, []
            stale = [k for k, (names, _) in self._fn_lru.items()
                     if names and not names.isdisjoint(gone)]
            for k in stale:
                self._fn_bytes -= self._fn_lru.pop(k)[1]
            drop = [k for k in evicted if k not in self._fn_lru] + stale
        for w in self._workers:
            w.forget_segments += released
            for k in drop:
                if k in w.fn_keys:
                    w.fn_keys.discard(k)
                    w.forget_fns.append(k)

    def _send_forgets(self, w: _WorkerHandle) -> None:
        """Send ``w`` what it must drop (see ``_queue_forgets``); OSError if it is dead."""
        msg = self._forgets(w)
        if msg is not None:
            w.cmd.send_bytes(msg)

    def _forgets(self, w: _WorkerHandle) -> bytes | None:
        """The message telling ``w`` what it must drop, if anything (now counted as sent)."""
        if not (w.forget_segments or w.forget_fns):
            return None
        msg = P.Forget(tuple(w.forget_segments), tuple(w.forget_fns))
        w.forget_segments.clear()
        w.forget_fns.clear()
        return pickle.dumps(msg, protocol=5)

    # -- jobs -----------------------------------------------------------------------------
    def map(self, fn: Callable[..., Any], *arrays: Any, out: np.ndarray | None = None,
            grain: int | None = None) -> np.ndarray:
        """Apply ``fn`` to pieces of ``arrays`` along axis 0, in parallel, into ``out``.

        Args:
            fn: called as ``fn(*(a[lo:hi] for a in arrays))`` in the workers; returns an array
                of ``hi - lo`` rows. Any picklable callable (NumPy code, BLAS, numba kernels).
                If it has an ``out`` parameter (ufuncs do), it is called with
                ``out=out[lo:hi]`` and may fill it in place.
            arrays: arrays of the same length along axis 0. Shared arrays are used in place;
                others are copied into shared memory once for this call.
            out: where results go; shape ``(n, ...)``. If None, one is allocated (a shared
                array) from what ``fn`` returns on the first rows: at most ``PROBE_ROWS``
                (8) or a row a worker, run before the others (slow ones in parallel).
                An input that overlaps ``out`` other than row for row is copied first.
            grain: items per piece. Default: pieces adapt to the measured cost of ``fn``, to
                about 0.3 ms of work each and at most ``TILE_BYTES`` (256 KiB) of input.

        Returns:
            ``out``. Pieces run in any order on any worker; each index exactly once.

        Raises:
            TypeError / ValueError: bad arguments (the message names which), a result that
                is a tuple or would not fit ``out`` without losing data.
            RuntimeError: called from a done-callback of this pool's futures.
            BrokenPool: ``terminate()`` was called meanwhile.
            Exception: the first exception ``fn`` raised, with the worker's traceback as
                ``__cause__``; the other workers stop at their next piece.
            WorkerCrashed: only when ``MAX_DEATHS_PER_CALL`` (4) workers die in one call (fn
                kills its process); fewer deaths are recovered: lost pieces are re-run.
        """
        return self._run(fn, arrays, out=out, grain=grain, reduce=None)

    def map_reduce(self, fn: Callable[..., Any], reduce: Callable[[Any, Any], Any],
                   *arrays: Any, initial: Any = P.NOTHING, grain: int | None = None) -> Any:
        """Fold ``fn`` over pieces of ``arrays`` with ``reduce``, in parallel.

        Each worker folds the results of its pieces, ``acc = reduce(acc, fn(*pieces))``,
        and the caller folds the workers' partial results (and ``initial``, if given) as
        they arrive. Pieces are taken in no fixed order, so ``reduce`` must be associative
        and commutative: ``operator.add`` on sums or histograms, ``np.maximum``, ...

        Raises:
            ValueError: empty input and no ``initial``.
            WorkerCrashed: a worker died (its partial result is lost); the pool recovers.
        """
        return self._run(fn, arrays, out=None, grain=grain, reduce=reduce, initial=initial)

    def _run(self, fn, arrays, *, out, grain, reduce, initial=P.NOTHING):
        self._check_open()
        if self._in_collector():
            # The collector runs callbacks while it serves tasks on these same workers.
            raise RuntimeError("map and map_reduce cannot run in a callback of this pool's "
                               "futures (add_done_callback); call them from another thread")
        since = time.perf_counter()  # the call's wall time (last_stats.wall_s) from here
        check_fn(fn, reduce)
        arrs = check_arrays(arrays)
        n = arrs[0].shape[0]
        if grain is not None:
            grain, adaptive = check_grain(grain), False
        else:
            grain, adaptive = self.default_grain(n, arrs), True
        if out is not None:
            out = check_out(out, n)
            check_ufunc_out(fn, arrs, out)
        fn_key, fn_data, out_at = self._register(fn)
        takes_out = out_fits(out_at, len(arrs))
        red = (*self._register(reduce, "reduce")[:2], reduce) if reduce is not None else None
        if n == 0 and out is None and reduce is None:
            # Nothing to split; the result's type comes from fn on the empty input, called
            # in a worker as every call of fn is (after its pool's initializer, say).
            t0 = time.perf_counter()
            res = self.submit(fn, *arrs).result()
            wall = time.perf_counter() - t0
            self.last_stats = JobStats(0, 0, 0, wall, tuple(
                WorkerStats(w.slot, w.pid, 0, 0, 0, 0.0, wall) for w in self._workers))
            return _allocate_from_probe([(0, 0, res)], 0)
        temps: list[np.ndarray] = []
        allocated = None  # an out this call made: released if the call fails
        try:
            ins, used = [], []
            for a in arrs:
                h = _shm.handle_of(a)
                if h is not None and out is not None and _overlaps_across_rows(a, out):
                    # Pieces would overwrite rows that other pieces have yet to read: work on
                    # a copy, as NumPy's ufuncs do.
                    h, a = None, np.array(a)
                if h is None:
                    _shm.check_not_released(a)
                    a = _shm.scratch_copy(a, self._recycler)
                    temps.append(a)
                    h = _shm.handle_of(a)
                ins.append(h)
                used.append(a)
            target, start, copy_back, out_h = out, 0, None, None
            probe: JobStats | None = None  # what the probe did, counted in the call's stats
            rerun_safe = True
            cost_key = (fn_key, _row_bytes(arrs))
            with self._map_turn(), self._lock:
                self._check_open()
                if reduce is None:
                    if target is None:
                        start = min(n, grain, PROBE_ROWS)
                        known = self._cost.get(cost_key, 0.0) if adaptive else 0.0
                        if known:
                            # Rows of a known cost: the first rows take no more than a
                            # piece's target (8 rows of 20 ms doubled a map).
                            start = min(start, max(1, int(TARGET_PIECE_NS / known)))
                        if known and start > 1:  # cheap rows: one piece in one worker
                            # (timed: rows dearer than known, when the cost depends on the
                            # data, are learned here; a map of no more rows than this
                            # piece ran them one after another in every later call)
                            pieces, probe = self._probe(
                                fn_key, fn_data, tuple(ins), start, start, False, cost_key)
                        else:
                            # Rows that may be slow: a row for each worker, run at once (a
                            # row run alone first made a map of w slow rows take 2 rows' time).
                            # With a grain given, rows for every worker's first piece (a
                            # row a worker left the rest a piece for one worker, the others
                            # idle: 16 rows in pieces of 8 took 1.5x the time with out).
                            start = min(n, max(start, self.workers) if adaptive
                                        else start * self.workers)
                            pieces, probe = self._probe(
                                fn_key, fn_data, tuple(ins), start, grain, True,
                                cost_key if adaptive else None)
                        # (fn(..., out=) may leave parts of a kept segment as they were:
                        # zeroed, as a new one is, unless fn is a bare ufunc)
                        target = allocated = _allocate_from_probe(
                            pieces, n, self._recycler,
                            zeroed=takes_out and not isinstance(fn, np.ufunc))
                    out_h = _shm.handle_of(target)
                    if out_h is None:
                        _shm.check_not_released(target)
                        # fn(..., out=) may read out or leave parts of it (a partial of a
                        # ufunc with where=); a bare ufunc, called with no where=, writes all.
                        reads = takes_out and not isinstance(fn, np.ufunc)
                        copy_back, target = target, (
                            _shm.scratch_copy(target, self._recycler) if reads else
                            _shm.scratch(target.shape, target.dtype, self._recycler))
                        temps.append(target)
                        out_h = _shm.handle_of(target)
                    if allocated is None:
                        rerun_safe = _rerun_safe(fn, takes_out, used, target)
                result = self._run_job(fn_key, fn_data, tuple(ins), out_h, n, start, grain,
                                       adaptive, takes_out, red, initial,
                                       made_out=allocated is not None, rerun_safe=rerun_safe,
                                       cost_key=cost_key, since=since, prior=probe)
            if reduce is not None:
                if isinstance(result, np.ndarray) and any(
                        np.may_share_memory(result, t) for t in temps):
                    result = np.array(result)  # a view of a copy this call made and frees
                return result
            if copy_back is not None:
                np.copyto(copy_back, target)
                self._stretch_stats(since)  # (the copy back is part of the call)
                return copy_back
            allocated = None
            return target
        except BaseException:
            # Workers may still be at work on them (an interrupted map): never recycled
            if allocated is not None:
                allocated.release()
            for t in temps:
                t.release()
            raise

    def _stretch_stats(self, since: float) -> None:
        """``last_stats``, its wall time up to now from ``since`` (the workers idle meanwhile)."""
        st = self.last_stats
        if st is None:
            return
        wall = time.perf_counter() - since
        self.last_stats = dataclasses.replace(st, wall_s=wall, workers=tuple(
            dataclasses.replace(w, idle_s=max(0.0, wall - w.busy_s)) for w in st.workers))

    @contextlib.contextmanager
    def _map_turn(self) -> Iterator[None]:
        """Wait here as a map: the task collector lets the tasks in flight end, then yields
        the lock to this map (and to any other waiting) before it serves tasks again."""
        token = object()
        try:
            # One call (atomic): a Ctrl-C lands before it or after it, inside the try, and
            # the token never outlives the map (a count left one for ever: the collector
            # waited for a map that had been interrupted).
            self._maps_waiting.append(token)
            tasks = self._tasks
            if tasks is not None and tasks.serving:  # (an idle collector sees the token as
                tasks.look_again()  # it wakes: no wake-up for it on every map)
            yield
        finally:
            with self._turn:
                if token in self._maps_waiting:
                    self._maps_waiting.remove(token)
                self._turn.notify_all()

    def default_grain(self, n: int, arrays: list[np.ndarray]) -> int:
        """The largest piece by default: about ``TILE_BYTES`` of input rows."""
        return max(1, min(n, TILE_BYTES // max(1, _row_bytes(arrays))))

    def _engaged(self, items: int, grain: int, ns_per_item: float,
                 adaptive: bool) -> tuple[int, int]:
        """How many workers to wake for ``items`` items at once, and up to how many after
        ``LATE_WAKE_S``. When the function's cost is known: none that would get less than
        ``MIN_SHARE_S`` at once, and the rest if the call proves slower than that cost said
        (a cost that depends on the data: cheap calls once left a slow one on one worker).
        Otherwise no more than there are pieces at once; and, when pieces adapt to a cost
        not yet measured, every worker (up to one an item) once the call proves slow, so
        that each loads the function (imports, JIT caches) in this call, beside the others,
        and not in a later call while they wait for it."""
        if items <= 0:
            return 0, 0
        if ns_per_item:
            k = min(self.workers, items,
                    max(1, int(items * ns_per_item / (MIN_SHARE_S * 1e9))))
            return k, min(self.workers, items)
        k = min(self.workers, -(-items // grain))
        return k, min(self.workers, items) if adaptive else k

    def _probe(self, fn_key, fn_data, ins, rows, grain, adaptive,
               cost_key) -> tuple[list[tuple[int, int, Any]], JobStats]:
        """Run ``fn`` on rows ``[0, rows)`` with no out, in pieces of up to ``grain`` rows
        (``adaptive``: sized by their cost, as a job's), and return each piece's ``(lo, hi,
        result)`` and the stats of the run. Run again if a worker dies, up to
        ``MAX_DEATHS_PER_CALL`` times."""
        for attempt in range(1, MAX_DEATHS_PER_CALL + 1):
            try:
                partials = self._run_job(fn_key, fn_data, ins, None, rows, 0, grain,
                                         adaptive, False, None, P.NOTHING, collect=True,
                                         cost_key=cost_key)
                assert self.last_stats is not None
                return [p for part in partials for p in part], self.last_stats
            except _StartFailed:  # not fn's doing: its replacement would not start
                raise
            except WorkerCrashed as e:
                if attempt == MAX_DEATHS_PER_CALL:
                    raise WorkerCrashed(
                        f"{attempt} workers died running the first piece of map (rows 0:"
                        f"{rows}), the last {describe_exit(e.exitcode)}: fn probably ends its "
                        "process (a crash in compiled code, os._exit). Replacement workers "
                        "have started.", pid=e.pid, exitcode=e.exitcode) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _run_job(self, fn_key, fn_data, ins, out, n, start, grain, adaptive, takes_out, red,
                 initial, collect=False, made_out=False, rerun_safe=True, cost_key=None,
                 since=None, prior=None):
        """Run one job. Its stats start from ``prior``'s (the probe's: one call's stats) and
        its wall time from ``since``."""
        t0 = time.perf_counter() if since is None else since
        self._job_id += 1
        cost = self._cost.get(cost_key, 0.0) if adaptive and cost_key else 0.0
        job = P.Job(job_id=self._job_id, fn_key=fn_key, inputs=ins, out=out, grain=grain,
                    reduce_key=None if red is None else red[0], adaptive=adaptive,
                    pass_out=out is not None and takes_out,
                    ns_per_item=cost, made_out=made_out)
        self._queue_forgets()
        fns = [(fn_key, fn_data)] + ([red[:2]] if red is not None else [])
        totals = [[0, 0, 0, 0] for _ in range(self.workers)]
        for w in prior.workers if prior is not None else ():
            totals[w.slot] = [w.items, w.pieces, w.steals, int(w.busy_s * 1e9)]
        base = [list(t) for t in totals]
        partials: list[Any] = []
        engaged, upto = self._engaged(n - start, grain, cost, adaptive)
        phase = initial_ranges(n, start, engaged)
        lost: list[tuple[int, int]] = []
        recovered = 0
        crashed: list[tuple[int, int, int | None]] = []
        error = None
        self._drain_stale()
        self._replace_dead()  # died while idle (OOM killer, say): not this call's loss
        try:
            while True:
                self._cb.start_job(phase)
                result = self._run_phase(job, fns, len(phase), upto)
                upto = 0  # phases that re-run a dead worker's pieces wake no one late
                for k, row in enumerate(totals):
                    for i, v in enumerate(self._cb.slot_stats(k)):
                        row[i] += v
                partials += result.partials
                error = error or result.error
                for slot in result.dead:
                    lost += self._cb.unfinished(slot)
                    old = self._workers[slot]
                    crashed.append((slot, old.pid, old.process.exitcode))
                    if result.interrupted is None:  # (else the next call's _replace_dead:
                        self._replace(slot)  # Ctrl-C waited for a slow initializer)
                if result.interrupted is not None:
                    raise result.interrupted
                if error is not None or red is not None or collect or not lost:
                    break
                if not rerun_safe:
                    slot, pid, code = crashed[-1]
                    rows = ", ".join(f"{a}:{b}" for a, b in lost)
                    raise WorkerCrashed(
                        f"worker {slot} (pid {pid}) died during map ({describe_exit(code)}). "
                        f"Rows {rows} may be unfinished, and are not run again: out is also "
                        "an input, or fn takes out and may read it (out += a), so a piece "
                        "the worker was writing would be applied twice. The other rows of a "
                        "shared out are done; a plain out is left as it was. A replacement "
                        "worker has started.", pid=pid, exitcode=code)
                if len(crashed) >= MAX_DEATHS_PER_CALL:
                    slot, pid, code = crashed[-1]
                    raise WorkerCrashed(
                        f"{len(crashed)} workers died during one map, the last worker {slot} "
                        f"(pid {pid}, {describe_exit(code)}): fn probably ends its process (a "
                        "crash in compiled code, os._exit). Replacement workers have started.",
                        pid=pid, exitcode=code)
                # Re-run what dead workers left (rerun_safe: the pieces are idempotent), one
                # range per slot and phase; the others steal from it as usual.
                phase, lost = lost[:self.workers], lost[self.workers:]
                recovered += len(phase)
        finally:  # the stats of this call, also when it fails
            wall = time.perf_counter() - t0
            self.last_stats = JobStats(
                items=n, pieces=sum(t[1] for t in totals),
                steals=sum(t[2] for t in totals), wall_s=wall,
                workers=tuple(WorkerStats(k, self._workers[k].pid, t[0], t[1], t[2],
                                          t[3] / 1e9, max(0.0, wall - t[3] / 1e9))
                              for k, t in enumerate(totals)),
                probe_items=start, recovered=recovered)
        # The cost a row, of this job's own rows (a probe's first call may have paid for
        # imports or a JIT compile).
        items_run = sum(t[0] for t in totals) - sum(t[0] for t in base)
        busy_ns = sum(t[3] for t in totals) - sum(t[3] for t in base)
        known = self._cost.get(cost_key) if cost_key else None
        if cost_key and items_run and error is None and (
                known is None or busy_ns >= MIN_SHARE_S * 1e9 or busy_ns < known * items_run):
            # A dearer cost a row is learned from a job of some length only: a few cheap
            # rows cost mostly the call (map's 8 first rows of np.sqrt: 30x the cost a row
            # of the rest, which then woke both workers for 30 us of work, one of them too
            # late: ~10 steals a call).
            self._cost[cost_key] = busy_ns / items_run
            self._cost.move_to_end(cost_key)
            while len(self._cost) > FN_CACHE_SIZE:
                self._cost.popitem(last=False)
        if error is not None:
            raise error
        if red is not None or collect:
            if crashed:
                slot, pid, code = crashed[0]
                raise WorkerCrashed(
                    f"worker {slot} (pid {pid}) died during map_reduce ({describe_exit(code)}); "
                    "its partial result is lost. A replacement worker has started; call again.",
                    pid=pid, exitcode=code)
            if collect:
                return partials
            return _fold(red[2], partials, initial)
        return None

    def _run_phase(self, job: P.Job, fns: list[tuple[bytes, bytes]],
                   engaged: int, upto: int = 0) -> _PhaseResult:
        """Send ``job`` to the first ``engaged`` workers, and after ``LATE_WAKE_S`` to those up
        to ``upto`` if items are still left; wait until each is done or dead."""
        job = dataclasses.replace(job, solo=max(engaged, upto) == 1)
        msg = pickle.dumps(job, protocol=5)
        pending: dict[Any, int] = {}
        sentinels: dict[Any, int] = {}
        result = _PhaseResult()
        cut: list[int] = []  # workers whose messages an interrupt may have cut short
        # Until this returns, the workers in ``pending`` may be running the job: if an
        # interrupt ends it early after all, the next job stops them first (_drain_stale).
        self._in_flight = pending

        def send(w: _WorkerHandle) -> None:
            # Waited for before anything is sent: a job sent is a job waited for.
            pending[w.status] = w.slot
            sentinels[w.process.sentinel] = w.slot
            try:
                self._send_forgets(w)
                for key, data in fns:
                    if key not in w.fn_keys:
                        w.cmd.send_bytes(pickle.dumps(P.Function(key, data), protocol=5))
                        w.fn_keys.add(key)
                w.cmd.send_bytes(msg)
            except OSError:  # already dead: its sentinel tells
                pass
            except BaseException:
                cut.append(w.slot)
                raise

        deadline = None

        def interrupted(e: BaseException) -> None:
            """Stop the workers at their next piece; wait for them (a while), then raise."""
            nonlocal deadline
            self._cb.abort()
            if result.interrupted is None:
                result.interrupted = e
                deadline = time.monotonic() + INTERRUPT_GRACE

        late = self._workers[engaged:upto]
        try:
            for w in self._workers[:engaged]:
                send(w)
        except KeyboardInterrupt as e:
            late = []
            interrupted(e)
        late_at = time.perf_counter() + LATE_WAKE_S
        spin_until = time.perf_counter() + SPIN_S
        spin_poll = select.poll()
        spin_on: dict[int, Any] = {}  # the status pipes polled while spinning, by fd
        spin_set: set[Any] = set()  # (the same pipes)
        gone: dict[int, float] = {}  # slot -> when its process was seen dead
        while pending:
            try:
                while cut:  # its pipe may hold half a message: it cannot be trusted again
                    slot = cut.pop()
                    self._workers[slot].process.kill()
                    self._workers[slot].process.join(STOP_TIMEOUT)
                    for r in [r for r, k in pending.items() if k == slot]:
                        del pending[r]
                    sentinels = {r: k for r, k in sentinels.items() if k != slot}
                    gone.pop(slot, None)
                    result.dead.append(slot)
                if not pending:
                    break
                if late and time.perf_counter() >= late_at:
                    if result.interrupted is None and not self._cb.aborted \
                            and self._cb.has_work():
                        for w in late:
                            send(w)
                    late = []
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                if late:
                    wake_in = max(0.0, late_at - time.perf_counter())
                    timeout = wake_in if timeout is None else min(timeout, wake_in)
                if gone:
                    now = time.monotonic()
                    for r, slot in list(pending.items()):
                        if slot in gone and now - gone[slot] > DEAD_PIPE_GRACE:
                            # Dead, and its pipe never said so: count it dead all the same.
                            del pending[r]
                            gone.pop(slot)
                            result.dead.append(slot)
                    if not pending:
                        break
                    wait_more = min(gone.values()) + DEAD_PIPE_GRACE - now if gone else None
                    if wait_more is not None:
                        timeout = max(0.0, wait_more) if timeout is None else \
                            min(timeout, max(0.0, wait_more))
                if spin_until:
                    # Short jobs finish within microseconds: poll before paying for a sleep and a
                    # wake-up (tens of microseconds each).
                    # (select.poll: Connection.poll builds a selector a call, ~2 us each)
                    if not spin_set.issuperset(pending):  # (late workers too)
                        spin_poll, spin_on = select.poll(), {c.fileno(): c for c in pending}
                        spin_set = set(pending)
                        for fd in spin_on:
                            spin_poll.register(fd, select.POLLIN)
                    ready = [c for c in (spin_on[fd] for fd, _ in spin_poll.poll(0))
                             if c in pending]
                    if not ready:
                        # (No sched_yield here: on a loaded machine it handed the core to a
                        # busy process for a whole tick, ~4 ms, every map of 1,000 rows,
                        # against 0.6-3 ms; the worker queued behind us waits at most
                        # SPIN_S, until we sleep.)
                        if time.perf_counter() < spin_until:
                            continue
                        spin_until = 0
                        ready = _wait(list(pending) + list(sentinels), timeout)
                else:
                    ready = _wait(list(pending) + list(sentinels), timeout)
                if not ready:
                    if deadline is None or time.monotonic() < deadline:
                        continue  # a dead worker's grace ran out: handled at the loop's top
                    # Interrupted, and some workers are stuck in a long piece.
                    for slot in list(pending.values()):
                        self._workers[slot].process.kill()
                        self._workers[slot].process.join(STOP_TIMEOUT)
                        result.dead.append(slot)
                    pending.clear()
                    break
                for r in ready:
                    if r in pending:
                        slot = pending[r]
                        try:
                            data = r.recv_bytes()  # type: ignore[union-attr]  # a Connection
                        except (EOFError, OSError):  # it died before saying it was done
                            self._workers[slot].process.join(STOP_TIMEOUT)
                            del pending[r]
                            sentinels = {s: k for s, k in sentinels.items() if k != slot}
                            gone.pop(slot, None)
                            result.dead.append(slot)
                            continue
                        except BaseException:
                            # Ctrl-C inside the read: half a message may be left in the pipe,
                            # whose next read took its bytes for a length (EOFError,
                            # UnpicklingError, then a read that never ended). Killed and
                            # replaced: its pipe cannot be trusted again.
                            cut.append(slot)
                            raise
                        try:
                            done = pickle.loads(data)
                        except Exception as e:  # a partial result that fails to unpickle
                            done = P.Done(job.job_id, slot, e, P.NOTHING)
                        if not isinstance(done, P.Done) or done.job_id != job.job_id:
                            continue  # not this job's (cannot happen; harmless if it does)
                        del pending[r]
                        sentinels = {s: k for s, k in sentinels.items() if k != slot}
                        gone.pop(slot, None)  # its Done came before its end: the next call
                        # sees the death (a map_reduce partial that arrived still counts)
                        if done.error is not None and result.error is None:
                            result.error = done.error
                        if done.partial is not P.NOTHING:
                            result.partials.append(done.partial)
                    elif r in sentinels:
                        # Dead. Its status pipe is now readable (a last message or EOF); reading
                        # it above decides, so that a Done sent before dying still counts. Stop
                        # watching the sentinel (it stays ready: waiting on it would spin).
                        slot = sentinels.pop(r)
                        if self._workers[slot].status in pending:
                            gone[slot] = time.monotonic()
            except KeyboardInterrupt as e:  # anywhere in the loop: the workers finish first
                interrupted(e)
        self._in_flight = None
        return result

    def _drain_stale(self) -> None:
        """Stop the workers of a job that an interrupt ended before they were waited for
        (one landed where ``_run_phase`` could not catch it), so that they cannot take the
        next job's pieces: abort it, discard what they send, kill those that do not answer
        within ``INTERRUPT_GRACE``, and replace the dead."""
        stale, self._in_flight = self._in_flight, None
        if not stale:
            return
        self._cb.abort()
        slots = set(stale.values())
        deadline = time.monotonic() + INTERRUPT_GRACE
        while slots:
            conns = {self._workers[k].status: k for k in slots}
            ready = _wait(list(conns), max(0.0, deadline - time.monotonic()))
            if not ready:
                for k in slots:
                    self._workers[k].process.kill()
                    self._workers[k].process.join(STOP_TIMEOUT)
                    self._replace(k)
                return
            for r in ready:
                k = conns[r]
                try:
                    msg = pickle.loads(r.recv_bytes())  # type: ignore[union-attr]
                except (EOFError, OSError):  # dead
                    self._workers[k].process.join(STOP_TIMEOUT)
                    self._replace(k)
                    slots.discard(k)
                    continue
                except BaseException:  # an interrupt in the read: its pipe is not whole
                    self._workers[k].process.kill()
                    self._workers[k].process.join(STOP_TIMEOUT)
                    self._replace(k)
                    raise
                if isinstance(msg, P.Done):
                    slots.discard(k)

    # -- introspection --------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What this pool runs on: workers, pids, start method, BLAS threads, start-up time."""
        return {"workers": self.workers, "pids": self.pids, "start_method": self.start_method,
                "blas_threads_per_worker": self.blas_threads, "pinned": self._cpus is not None,
                "startup_s": self.startup_s}


# help(parrun.Pool) and inspect.signature show __init__'s parameters, not __new__'s
# (*args, backend, **kwargs).
_init_params = list(inspect.signature(Pool.__init__).parameters.values())[1:]
Pool.__signature__ = inspect.Signature(_init_params)  # type: ignore[attr-defined]


class _PhaseResult:
    __slots__ = ("dead", "error", "interrupted", "partials")

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.interrupted: BaseException | None = None
        self.partials: list[Any] = []
        self.dead: list[int] = []


def _count(what: str, value: Any, least: int, alt: str = "") -> int:
    """``value`` as an int of at least ``least`` (NumPy integers too), else TypeError or
    ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int{alt}, got {type(value).__name__}")
    if value < least:
        bound = "greater than 0" if least == 1 else f"{least} or more"
        raise ValueError(f"{what} must be {bound}{alt}, got {value}")
    return int(value)


def _close_handle(w: _WorkerHandle) -> None:
    for c in (w.cmd, w.status):
        try:
            c.close()
        except OSError:
            pass
    try:
        w.process.close()
    except ValueError:  # still running (could not be stopped); leave it to the OS
        return
    # Gone, and its pipes closed: a segment it made and had not handed over (killed while
    # it pickled a big result) can no longer reach anyone. Found by its pid and its tag: a
    # pid alone could be another process's (pid reuse; containers sharing /dev/shm).
    _shm.unlink_orphans(_shm.name_prefix(w.pid, w.tag))


def _fold(reduce, partials: list[Any], initial: Any) -> Any:
    acc = initial
    for p in partials:
        acc = p if acc is P.NOTHING else reduce(acc, p)
    if acc is P.NOTHING:
        raise ValueError("map_reduce of empty arrays with no initial value")
    return acc


def _row_bytes(arrays: list[np.ndarray]) -> int:
    """Bytes of one row (along axis 0) of all the inputs together."""
    return sum(a.itemsize * math.prod(a.shape[1:]) for a in arrays)


class _StartFailed(WorkerCrashed):
    """A worker (a replacement) did not start: it died, or was not ready in time."""


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT's handler, in the main thread) until the block is done."""
    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(handler):
        yield
        return
    got: list[tuple[int, Any]] = []
    signal.signal(signal.SIGINT, lambda signum, frame: got.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        if got:
            handler(*got[0])


def _rerun_safe(fn: Any, takes_out: bool, ins: list[np.ndarray], out: np.ndarray) -> bool:
    """Whether a dead worker's piece may run again (map's crash recovery): not if ``out`` is
    also an input (the piece may have half updated it: ``out=x``), nor if ``fn`` takes
    ``out`` and may read it (``out += a``), unless fn is a ufunc (it reads ``out`` only
    where ``where=`` is false, and leaves it so) or says so (``__parrun_rerun_safe__``)."""
    if any(_shares_memory(a, out) for a in ins):
        return False
    return (not takes_out or isinstance(fn, np.ufunc)
            or bool(getattr(fn, "__parrun_rerun_safe__", False)))


def _overlaps_across_rows(a: np.ndarray, out: np.ndarray) -> bool:
    """True if writing some row of ``out`` can change a different row of ``a``: they share
    memory, and not element for element (``out`` is not ``a`` itself, or the same layout)."""
    if not _shares_memory(a, out):
        return False
    same = (a.__array_interface__["data"][0] == out.__array_interface__["data"][0]
            and a.shape == out.shape and a.strides == out.strides
            and a.itemsize == out.itemsize)
    return not same


def _shares_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` have an element in common: exactly where NumPy can tell with
    bounded work (two columns of one array share bounds, not elements), else True."""
    if not np.may_share_memory(a, b):
        return False
    try:
        # (NumPy's stubs allow only -1 and 0; the function takes any bound on its work)
        return bool(np.shares_memory(a, b, max_work=SHARES_MEMORY_WORK))  # type: ignore[arg-type]
    except _TooHardError:
        return True


def _allocate_from_probe(pieces: list[tuple[int, int, Any]], n: int,
                         recycler: _shm.Recycler | None = None,
                         zeroed: bool = True) -> np.ndarray:
    """Allocate ``out`` for ``n`` rows from the probe's ``(lo, hi, result)`` pieces, the
    first of which starts at row 0 (its result gives the shape and dtype), and store them.
    With a recycler, maybe in a segment it kept (holding old values unless ``zeroed``)."""
    pieces = sorted(pieces, key=lambda p: p[0])
    lo, hi, res = pieces[0]
    res = check_first_result(res, lo, hi)
    shape = (n, *res.shape[1:])
    out = (_shm.empty(shape, res.dtype) if recycler is None else
           _shm.scratch(shape, res.dtype, recycler, zeroed))
    try:
        out[lo:hi] = res
        for lo, hi, res in pieces[1:]:
            store_result(out[lo:hi], res, lo, hi, made_out=True)
    except BaseException:
        out.release()
        raise
    return out


def _close_all_pools() -> None:
    for pool in list(_live_pools):
        if pool._pid != os.getpid():  # a child forked by os.fork() exiting: the parent's
            continue
        try:
            # A daemon thread may be in the middle of a map, which may never end: wait for
            # it a little, then kill its workers (the map fails) rather than hang the exit.
            if pool._lock.acquire(timeout=STOP_TIMEOUT):
                pool._lock.release()
                pool.close()
            else:
                pool.terminate()
        except Exception:
            pass


atexit.register(_close_all_pools)


def _forget_workers_in_child() -> None:
    """After os.fork(), in the child: our workers are not its children. multiprocessing's
    exit hook terminates the daemon processes it counts as its own, so a child that exits
    normally stopped the parent's workers (and failed to join them)."""
    forget_forkserver()  # nor is the parent's fork server: a pool there starts its own
    children = getattr(mp.process, "_children", None)
    if children is None:  # pragma: no cover - another CPython layout
        return
    for pool in list(_live_pools):
        for w in pool._workers:
            children.discard(w.process)


os.register_at_fork(after_in_child=_forget_workers_in_child)
