"""The worker process: its main loop, its function cache and the piece loop of a job.

A worker never imports the pool. It talks to the parent over two one-way pipes (commands in,
status out) and to the other workers only through the control block (``_scheduler``). The
messages are plain tuples (``_protocol``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import select
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle
import numpy as np

from . import _protocol as P
from . import _shm
from ._checks import store_result
from ._errors import ParrunError, exception_for_transport
from ._process import detach_from_forkserver
from ._scheduler import HI, LO, RUNNING, ControlBlock, now_ns


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when our parent (the fork server or the pool) dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:  # pragma: no cover - no libc: the ppid check still applies
        pass


def _close_on_exec() -> None:
    """Make the descriptors this worker inherited close-on-exec.

    The pipes to the pool and to the resource tracker arrive through the fork server as
    inheritable descriptors; a program a task starts (``os.system``, ``subprocess`` with
    ``close_fds=False``) would otherwise hold them, and could read the pool's commands or keep
    the pool's pipes open after the worker dies.
    """
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:  # pragma: no cover - no /proc: the standard ones only
        fds = list(range(3, 256))
    for fd in fds:
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:  # closed meanwhile (listdir's own descriptor)
                pass


def _keep_heap() -> None:
    """Let glibc keep freed tile-sized temporaries in the heap.

    A NumPy expression on a 256 KiB tile allocates a few temporaries of that size; with
    glibc's defaults each one above 128 KiB is a fresh mmap whose pages fault in again on
    every piece, which costs more than the arithmetic. Raising the mmap and trim thresholds
    makes a worker reuse the same heap pages piece after piece.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 128 << 20)
    except Exception:  # pragma: no cover - not glibc
        pass


def limit_blas(threads: int | None) -> None:
    """Limit this process's BLAS to ``threads`` threads (None: leave it as it is).

    In a forked child, setting OpenBLAS's thread count starts its thread pool again (fork
    leaves it down), and each of those threads, one per core less one, then polls for work
    with ``sched_yield`` for about 0.1 s of CPU before it sleeps: measured, a worker's
    thread took 0.1 s of CPU after the pool started, and its own idle loop, yielding to it,
    waited ~4 ms (a tick) for a job sent meanwhile. With one thread the pool is never used,
    so it is shut down again at once (what OpenBLAS itself does before a fork); a later
    limit above one starts it again."""
    if threads is None:
        return
    try:
        from threadpoolctl import ThreadpoolController

        ctl = ThreadpoolController()
        ctl.limit(limits=threads)
    except Exception:  # pragma: no cover - threadpoolctl cannot see this BLAS
        return
    if threads != 1:
        return
    for lib in ctl.lib_controllers:
        shutdown = getattr(getattr(lib, "dynlib", None), "blas_thread_shutdown_", None)
        if lib.internal_api == "openblas" and shutdown is not None and \
                getattr(lib, "threading_layer", None) == "pthreads":
            try:
                shutdown()
            except Exception:  # pragma: no cover - a build without it
                pass


def _unpickle_function(data: bytes) -> Any:
    try:
        return cloudpickle.loads(data)
    except BaseException as e:  # kept, and raised when a job uses it
        return P.BadFunction(f"the task function could not be unpickled in worker "
                             f"{os.getpid()}: {type(e).__name__}: {e}")


class _Worker:
    def __init__(self, slot: int, control_name: str, nslots: int, cmd=None):
        self.slot = slot
        self.cmd = cmd
        fd, self._control_map = _shm.open_control(control_name)
        self.cb = ControlBlock(self._control_map, fd, nslots)
        self.fns: dict[bytes, Any] = {}  # key -> function, or its pickle until first used
        self.views: dict[tuple, np.ndarray] = {}
        # Per function: a running estimate of a task's cost, which sizes pieces of tasks.
        # (One estimate for all once made two slow tasks one piece, after quick tasks of
        # another function, while the other workers idled.)
        self.task_ns: dict[bytes, float] = {}
        # Per function and shape of its rows: the piece size Growth settled on in the last
        # map, and the ns a row it cost, so that the next map starts there (see Growth).
        self.grown: dict[tuple, tuple[int, float, bool]] = {}
        self.ppid = os.getppid()
        self.reporter: _Reporter | None = None  # made at the first serving round

    def array(self, handle: tuple) -> np.ndarray:
        """The array a handle names, as a plain ``np.ndarray`` view of the shared memory (a
        ``SharedArray`` operand makes every NumPy call on a piece run Python code; measured:
        ~10% of a 6-ufunc chain on 64K-element pieces); recently used handles map to the
        same view."""
        arr = self.views.get(handle)
        if arr is None:
            arr = _shm.from_handle(handle).view(np.ndarray)
            if len(self.views) >= VIEW_CACHE_SIZE:
                self.views.pop(next(iter(self.views)))
            self.views[handle] = arr
        return arr

    def fn(self, key: bytes) -> Callable[..., Any]:
        """The function ``key`` names, unpickled at its first use here: a worker can then claim
        its first piece of a job before it pays for imports and JIT loads (see run_job)."""
        fn = self.fns[key]
        if isinstance(fn, bytes):
            fn = self.fns[key] = _unpickle_function(fn)
        if isinstance(fn, P.BadFunction):
            raise TypeError(fn.message)
        return fn

    def run_task(self, arena: memoryview, wake: P.TaskWake, tid: int) -> tuple:
        """Run task ``tid`` from the arena; return ``(tid, ok, payload)``."""
        off = (tid % wake.cap) * wake.slot_bytes
        length, key = _SLOT_HEAD.unpack_from(arena, off)
        try:
            data: Any
            if length >= 0:
                data = arena[off + 24:off + 24 + length]
            else:
                name = bytes(arena[off + 24:off + 88]).rstrip(b"\0").decode()
                data = _shm.from_handle_transient(
                    (name, 0, (-length,), (1,), np.dtype(np.uint8), False))
            try:
                args, kwargs = pickle.loads(data)
            except BaseException as e:
                raise TypeError(f"the task's arguments could not be unpickled in worker "
                                f"{os.getpid()}: {type(e).__name__}: {e}") from e
            if key not in self.fns:
                self.read_functions(until=key)  # sent after this worker started serving
            fn = self.fn(key)
            value = fn(*args, **kwargs)
        except BaseException as e:
            return tid, False, _dump_error(e)
        try:
            return tid, True, _shm.dumps_result(value)
        except BaseException as e:
            err = TypeError(f"the result of the task could not be pickled: "
                            f"{type(e).__name__}: {e}")
            return tid, False, _dump_error(err)

    def read_functions(self, until: bytes | None = None) -> None:
        """Read the commands waiting in the pipe while serving tasks: functions are cached,
        forgets applied in order; wake-ups are moot (we are awake). With ``until``, wait
        for that function too: the parent sends it before the task, but does not wait for
        room in a busy worker's pipe (see ``TaskService.outbox``)."""
        while self.cmd.poll() or (until is not None and until not in self.fns):
            msg = pickle.loads(self.cmd.recv_bytes())
            if isinstance(msg, P.Function):
                self.fns[msg.key] = msg.data
            elif isinstance(msg, P.Forget):
                self.forget(msg)
            elif not isinstance(msg, P.TaskWake):
                raise RuntimeError(f"unexpected command while serving tasks: {msg!r}")

    def serve_tasks(self, wake: P.TaskWake, status) -> None:
        """Take (or steal) pieces of tasks until none is left; report each piece."""
        arena = _shm.attach(wake.arena).data
        cb, me = self.cb, self.slot
        ppid = self.ppid
        idle_said = False
        if self.reporter is None:
            self.reporter = _Reporter(status)
        reporter = self.reporter

        def key_of(tid: int) -> bytes:  # the function of task tid, from its arena slot
            return _SLOT_HEAD.unpack_from(arena, (tid % wake.cap) * wake.slot_bytes)[1]

        while True:
            # The function of the next task in our range (after a steal, of what we stole):
            # its cost sizes the piece; a function not timed here yet runs one task at first.
            nxt = cb.get(me, LO)
            est = self.task_ns.get(key_of(nxt), 0.0) if nxt < cb.get(me, HI) else 0.0
            size = max(1, min(TASK_PIECE_MAX, int(TARGET_PIECE_NS / est))) if est > 0 else 1
            piece = cb.take(me, size)
            if piece is None:
                break
            lo, hi = piece
            t0 = now_ns()
            for tid in range(lo, hi):
                cb.set(me, RUNNING, tid + 1)  # if this process dies now, tid killed it
                t1 = now_ns()
                result = self.run_task(arena, wake, tid)
                reporter.add(result, now_ns() - t1, me, wake.seq)
                if tid + 1 < hi and now_ns() - t0 > 2 * TARGET_PIECE_NS:
                    # Slower than estimated: report what is done and hand the rest back
                    # to our range, where a thief can get it.
                    if cb.give_back(me, tid + 1, hi):
                        hi = tid + 1
                        break
            dt = now_ns() - t0
            key = key_of(lo)  # now: once reported, the slot may hold another task
            # Going idle after this piece? Say so with the results: one message, one wake-up
            # of the parent. (If work turns up after all, it is taken below as usual.)
            idle_said = not cb.has_work()
            # Report, then clear: a worker killed in between has its piece reported (the
            # parent ignores results it already has) rather than lost.
            reporter.flush(me, idle_said, wake.seq)
            cb.clear_current(me)
            per_task = dt / (hi - lo)
            est = self.task_ns.get(key, 0.0)
            self.task_ns[key] = per_task if est <= 0 else 0.7 * est + 0.3 * per_task
            if len(self.task_ns) > 4 * TASK_PIECE_MAX:
                del self.task_ns[next(iter(self.task_ns))]
            if os.getppid() != ppid:
                os._exit(1)
            if idle_said:
                # Said idle: from now on the parent may stop serving and start a map, whose
                # ranges must not be taken for tasks. Work added later comes with a wake-up.
                break
        if not idle_said:
            with reporter.lock:
                status.send_bytes(pickle.dumps(P.Idle(me, wake.seq)))

    def forget(self, msg: P.Forget) -> None:
        if msg.segments:
            _shm.forget(msg.segments)
            gone = set(msg.segments)
            self.views = {h: a for h, a in self.views.items() if h[0] not in gone}
        for key in msg.fns:
            self.fns.pop(key, None)
        if msg.fns:
            gone_fns = set(msg.fns)
            self.grown = {k: v for k, v in self.grown.items() if k[0] not in gone_fns}

    def run_job(self, job: P.Job) -> P.Done:
        cb, me, grain, solo = self.cb, self.slot, job.grain, job.solo
        error = None
        acc: Any = P.NOTHING
        pieces: list[tuple[int, int, Any]] = []  # a probe's: (lo, hi, fn's result)
        try:
            ins = [self.array(h) for h in job.inputs]
            out = self.array(job.out) if job.out is not None else None
        except BaseException as e:
            cb.abort()
            return P.Done(job.job_id, me, exception_for_transport(e), P.NOTHING)
        ppid = self.ppid
        adaptive, est, pass_out = job.adaptive, job.ns_per_item, job.pass_out
        made_out = job.made_out
        busy = items = 0
        fn: Callable[..., Any] | None = None
        combine: Callable[[Any, Any], Any] | None = None
        size = grain
        rows_of = (job.fn_key, job.pass_out, tuple((h[2][1:], h[4]) for h in job.inputs))
        grow = Growth(*self.grown.get(rows_of, (0, 0.0, True))) if adaptive else Growth()
        last = (0, 0)  # rows and nanoseconds of our last piece
        while True:
            if adaptive:
                # Pieces of about TARGET_PIECE_NS of work, up to grain rows; the first piece of
                # a function never seen before is one row, to measure it. The first piece
                # after the parent's estimate is an eighth of that: a cost that depends on
                # the data may be far higher this time, and what is left in our range can be
                # stolen by the workers woken late (a 64-row piece of 10 ms rows, sized by a
                # cheaper call, once ran alone for 640 ms).
                if items:
                    est = busy / items
                    size = max(1, min(grain, int(TARGET_PIECE_NS / est))) if est > 0 else 1
                    size = grow.size(size, *last, cb.left(me))
                else:
                    size = max(1, min(grain, int(TARGET_PIECE_NS / est)) // 8) if est > 0 else 1
            piece = cb.take(me, size, solo)
            if piece is None:
                break
            if fn is None:
                # Loaded only now, with a piece of our own claimed: a worker that is slow to
                # load a function (imports, numba's cache) cannot see thieves take its whole
                # range meanwhile, so it loads the function in this call, beside the others,
                # instead of in a later call while they wait for it.
                try:
                    fn = self.fn(job.fn_key)
                    if job.reduce_key is not None:
                        combine = self.fn(job.reduce_key)
                except BaseException as e:
                    cb.abort()
                    error = exception_for_transport(e)
                    break
            lo, hi = piece
            t0 = now_ns()
            try:
                if out is not None:
                    dst = out[lo:hi]
                    if pass_out:
                        res = fn(*[a[lo:hi] for a in ins], out=dst)
                        if res is not None:
                            store_result(dst, res, lo, hi, made_out)
                    else:
                        store_result(dst, fn(*[a[lo:hi] for a in ins]), lo, hi, made_out)
                elif combine is None:  # a probe (map learning its out): each piece back
                    res = fn(*[a[lo:hi] for a in ins])
                    # Held until the worker's share ends: a copy, as fn may reuse the buffer
                    # it returned in its next call (a memoryview pickles as bytes).
                    if isinstance(res, (np.ndarray, memoryview)):
                        res = np.array(res)
                    pieces.append((lo, hi, res))
                else:
                    res = fn(*[a[lo:hi] for a in ins])
                    acc = res if acc is P.NOTHING else combine(acc, res)
            except BaseException as e:
                cb.abort()
                error = exception_for_transport(e)
                break
            dt = now_ns() - t0
            busy += dt
            items += hi - lo
            last = (hi - lo, dt)
            cb.done_piece(me, lo, hi, dt)
            if os.getppid() != ppid:  # orphaned: nobody will read what we make
                os._exit(1)
        if adaptive and error is None:
            learned = grow.learned()
            self.grown.pop(rows_of, None)  # (re-inserted: the oldest go first)
            if learned is not None:
                self.grown[rows_of] = learned
                if len(self.grown) > GROWN_KEPT:
                    del self.grown[next(iter(self.grown))]
        if out is None and job.reduce_key is None and pieces:
            acc = pieces
        return P.Done(job.job_id, me, error, acc)


def _dump_error(e: BaseException) -> bytes:
    """Pickle a task's exception as results are (cloudpickle, for a class of the script;
    its arrays by value, through segments the parent adopts: a shared array the task made
    would be gone). If that fails, even with a ``BaseException``, a ``ParrunError`` says so."""
    try:
        return _shm.dumps_result(exception_for_transport(e))
    except BaseException as e2:
        try:
            what = f"{type(e).__qualname__}: {e}"
        except BaseException:
            what = type(e).__qualname__
        return pickle.dumps(exception_for_transport(ParrunError(
            f"{what} (the exception could not be pickled: {type(e2).__name__})")))


class _Reporter:
    """Sends the results of a piece of tasks, and, from a thread of its own, those done so
    far when the piece runs on: a quick task batched with a call that turns out slow was
    reported only when that call ended (a task waiting for the caller to see another
    task's result waited for ever; ``ProcessPoolExecutor`` reports each task as it ends).
    The thread sends what waited REPORT_AFTER_NS (and, in Python code, the interpreter's
    switch interval, 5 ms, to get the GIL); the worker's sends and its take turns under
    ``lock``, so messages go in the order their results were taken."""

    def __init__(self, status) -> None:
        self.status = status
        self.lock = threading.Lock()  # one writer of the status pipe at a time
        self.cv = threading.Condition(threading.Lock())
        self.results: list = []  # done, not sent
        self.busy_ns = 0  # their time
        self.since = 0  # when the first of them was done
        self.me = self.seq = 0
        threading.Thread(target=self._run, name="parrun-reporter", daemon=True).start()

    def add(self, result: tuple, ns: int, me: int, seq: int) -> None:
        with self.cv:
            if not self.results:
                self.since, self.me, self.seq = now_ns(), me, seq
                self.cv.notify()
            self.results.append(result)
            self.busy_ns += ns

    def _take(self) -> tuple[list, int]:
        with self.cv:
            taken, busy = self.results, self.busy_ns
            self.results, self.busy_ns = [], 0
            return taken, busy

    def flush(self, me: int, idle: bool, seq: int) -> None:
        """Send what is left of the piece (and that the worker goes idle, if it does)."""
        with self.lock:
            results, busy = self._take()
            if results or idle:
                self.status.send_bytes(pickle.dumps(
                    P.TaskResults(me, results, busy, idle, seq), protocol=5))

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.results:
                    self.cv.wait()
                while self.results and now_ns() - self.since < REPORT_AFTER_NS:
                    self.cv.wait((REPORT_AFTER_NS - (now_ns() - self.since)) / 1e9)
                if not self.results:
                    continue
            with self.lock:
                me, seq = self.me, self.seq
                results, busy = self._take()
                if not results:
                    continue
                try:
                    self.status.send_bytes(pickle.dumps(
                        P.TaskResults(me, results, busy, False, seq, partial=True),
                        protocol=5))
                except OSError:  # the parent is gone: the main thread sees it too
                    return


class Growth:
    """Pieces larger than the cost a row says, for a function that also costs a fixed time
    a call.

    Sizing by ``TARGET_PIECE_NS / (ns a row)`` assumes a row costs the same in any piece. A
    function with a fixed cost a call (``a @ W`` reads all of W whatever the rows; a lookup
    table built per call) makes a row look as dear as the whole target, and its pieces
    stayed a row long (``benchmarks/bench_pieces.py``, 2 workers: ``a @ W`` over 8000 rows,
    W 1000x1000, 3.96x the time of a hand-picked grain so; 1.09x now). So after
    a piece that took half the target or more without the cost a row growing it, the next
    is twice as long, and so on until GROW_TRIES doublings in a row fail to cut the cost a
    row to GROW_GAIN of the best so far (one may fail: BLAS runs 1 row as a matrix-vector
    product, 2x faster a row than 2 rows, and slower than 8), or a piece would pass
    GROW_MAX_NS (past it, only while a doubling cuts the cost a row to GROW_FIXED: a fixed
    cost longer than that). From then on pieces are at least the smallest size whose cost
    a row came within 1 / GROW_GAIN of the best. A job's first piece is not counted (a
    first call pays for imports and cold caches). Rows that cost the same in any piece stop
    it within GROW_TRIES doublings, back at the size the cost a row gives.

    A worker recalls where growing stopped (``floor``, and ``rate``, the ns a row of pieces
    that long; or, for a map that ran out of rows still growing, the largest size it
    measured, from which the next map grows on) for the next map of the same function on
    rows of the same shape, which then starts there: exploring again in every call cost
    each one ~10 pieces a worker, each paying the fixed cost (bench_pieces' lookup table:
    3.06x a hand-picked grain). If a piece then costs RECALL_SLACK times more than
    ``floor`` rows did, or a row costs RECALL_CHEAPER times less than ``rate`` (a cost that
    depends on the data, or a fixed cost that no longer is), it explores again from the
    size the cost a row gives.
    """

    __slots__ = ("best", "done", "fails", "first", "floor", "rate", "rates", "recalled",
                 "trusted")

    def __init__(self, floor: int = 0, rate: float = 0.0, final: bool = True) -> None:
        self.first = True  # the next piece seen is the job's first
        self._explore(floor, rate)
        # A size where an earlier map ran out of rows still growing (not final): growing
        # goes on from there (restarting from one row, each small map stopped at a size a
        # bigger map then used for good: 16-row pieces, 35x slower).
        if not final:
            self.done = False

    def _explore(self, floor: int = 0, rate: float = 0.0) -> None:
        """Grow afresh, or, given a ``floor``, start where an earlier map stopped."""
        self.fails = 0  # doublings in a row that did not pay
        self.best = 0.0  # the least ns a row seen while growing
        self.rates: dict[int, float] = {}  # rows -> the least ns a row of pieces that long
        self.recalled = floor > 0  # started where an earlier map stopped growing
        self.trusted = not self.recalled  # a recalled floor, until a piece bears it out
        self.done = self.recalled  # growing stopped: pieces are at least ``floor`` rows
        self.floor = floor
        self.rate = rate  # ns a row of pieces of ``floor`` rows, when growing stopped

    def learned(self) -> tuple[int, float, bool] | None:
        """Where growing stopped, ``(floor, rate, True)``, if past one row: for the next
        map; or, if it had not stopped, ``(the largest size measured, its rate, False)``."""
        if self.done:
            return (self.floor, self.rate, True) if self.floor > 1 else None
        top = max(self.rates, default=0)
        if self.floor > top:  # a job too small to reach the size it started from (map's
            # first rows, say): that size stands (it was replaced by the job's 4-row pieces)
            top, rate = self.floor, self.rate
        else:
            rate = self.rates.get(top, 0.0)
        return (top, rate, False) if top > 1 else None

    def size(self, size: int, rows: int, ns: int, left: int) -> int:
        """The next piece's rows, given ``size`` (by the cost a row), our last piece (``rows``
        rows in ``ns`` nanoseconds) and the rows ``left`` in our range: doubling waits while
        fewer than GROW_LEFT doubled pieces are left (near its end, a long piece would be
        the one the others wait for)."""
        first, self.first = self.first, False
        if self.recalled and not first and rows > 0:
            if ns > RECALL_SLACK * self.rate * max(rows, self.floor) \
                    or RECALL_CHEAPER * ns < self.rate * rows:
                # Rows far dearer or cheaper than where the size was learned (a cost that
                # depends on the data): explore again from the size their cost gives, this
                # piece not measured for growth (a recalled size, not one growth chose).
                self._explore()
                return size
            if ns <= RECALL_SLACK * self.rate * rows:
                self.trusted = True  # a row costs about what it did: the size stands
        if first or self.done or rows <= 0 or size > rows or 2 * ns < TARGET_PIECE_NS:
            # Growing by the cost a row, or pieces well inside the target: nothing to try.
            return max(size, self._floor(left))
        rate = ns / rows
        again = rows in self.rates  # this size measured before
        self.rates[rows] = min(self.rates[rows], rate) if again else rate
        before, self.best = self.best, min(self.best, rate) if self.best else rate
        if not again:  # a doubling (a size measured again, near the end or after a steal,
            # is no doubling that failed: counted as one, it ended growth early)
            self.fails = self.fails + 1 if before and rate >= GROW_GAIN * before else 0
        if left < GROW_LEFT * 2 * rows:  # near the end: measured (for the floor), not doubled
            # (nor cut back to the size the cost a row gives: a 1-row piece after 16, then
            # measured again, ended growth at 16 rows for good)
            return max(size, min(rows, left), self._floor(left))
        if self.fails < GROW_TRIES:
            if 2 * ns <= GROW_MAX_NS or not before:
                return max(size, 2 * rows)
            # Longer pieces only while a doubling cuts the cost a row to GROW_FIXED or less
            # (a fixed cost a call longer than GROW_MAX_NS); the least rates of each size
            # are compared, and a size is measured twice before it stops growth (one piece
            # slowed by the machine once did, at 2 rows of a 1 ms fixed cost).
            half = self.rates.get(rows // 2) if rows % 2 == 0 else None
            if half is not None and self.rates[rows] <= GROW_FIXED * half:
                return max(size, 2 * rows)
            if not again:
                return max(size, rows)
        self.done = True
        self.floor = min(r for r, rt in self.rates.items() if GROW_GAIN * rt <= self.best)
        self.rate = self.rates[self.floor]
        self.rates = {}
        return max(size, self._floor(left))

    def _floor(self, left: int) -> int:
        """Pieces are at least ``floor`` rows; a recalled floor, until a piece bears it
        out, at most half the rows ``left`` in our range, so that the others can steal the
        rest (a recalled size once took a worker's whole range of dearer rows in one piece
        while the other worker idled)."""
        if self.trusted or not self.floor:
            return self.floor
        return min(self.floor, max(1, left // 2))


# Array views a worker keeps ready, by handle. Each holds its segment mapped until the parent
# says the segment was released; more costs nothing but dict entries.
VIEW_CACHE_SIZE = 64

# Nanoseconds of work per piece when pieces adapt to the cost of the function. Smaller pays the
# per-piece bookkeeping (~5 us) too often; larger leaves a longer tail when the last pieces
# run unevenly.
TARGET_PIECE_NS = 300_000
# A task's result waits at most this long (plus the GIL's switch interval) for the rest of
# its piece before it is sent on its own (see _Reporter).
REPORT_AFTER_NS = 2 * TARGET_PIECE_NS
# Growth (see ``Growth``): a doubled piece pays when a row costs less than this fraction of a
# row of the piece before it (with a cost a call ``a`` and a row ``b``, while ``b`` x rows <
# 4a: doubling stops with the fixed cost about a fifth of a piece); no piece grows past this
# many ns (what a worker may still have to finish when the others are done).
GROW_GAIN = 0.9
GROW_TRIES = 3
GROW_FIXED = 0.75
GROW_LEFT = 4
GROW_MAX_NS = 8 * TARGET_PIECE_NS
# A recalled piece size is dropped when pieces that long cost this many times what they did
# (a machine twice as busy is not a reason); and at most this many sizes are kept a worker.
RECALL_SLACK = 4.0
# ... and explores again once a row costs this many times less: a floor learned on dear rows
# (4 rows of 1 ms and a 2 ms call) held rows 3x cheaper to pieces that small, call after call
# (110x slower than pieces grown for them).
RECALL_CHEAPER = 2.0
GROWN_KEPT = 256

_SLOT_HEAD = struct.Struct("<q16s")  # a task slot's length and function key (see TaskWake)

# Most tasks in one piece: bounds how long results wait to be reported.
TASK_PIECE_MAX = 256

# Seconds a worker polls for its next command before it sleeps (yielding the core to any other
# runnable process in between). Longer wastes cycles of idle workers; shorter makes a caller
# that sends jobs back to back pay a wake-up each time. (Under Linux's EEVDF scheduler a task
# that yields waits behind a busy one for its whole slice: OpenBLAS's polling thread, before
# limit_blas stopped it, kept a job sent during the spin waiting ~4 ms.)
SPIN_S = 200e-6


def _spin(poller: select.poll) -> None:
    end = time.perf_counter() + SPIN_S
    while time.perf_counter() < end:
        if poller.poll(0):  # (~0.3 us; cmd.poll() builds a selector each call: ~2 us)
            return
        os.sched_yield()


# True in a worker process: a pool started there would nest (see Pool).
IN_WORKER = False
# ``IN_TASK.on`` true in a thread running a task of another backend's worker (a Dask worker's
# threads): a pool started there would nest too.
IN_TASK = threading.local()


def main(slot: int, cmd, status, control_name: str, nslots: int,
         blas_threads: int | None, cpu: int | None, initializer: bytes | None = None,
         name_tag: str = "") -> None:
    """Entry point of a worker process (the target of ``multiprocessing.Process``)."""
    _shm.set_name_tag(name_tag)
    detach_from_forkserver()
    _close_on_exec()
    _die_with_parent()
    # Ctrl-C goes to the whole process group; the parent decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global IN_WORKER
    IN_WORKER = True
    # Started as a daemon (the parent's multiprocessing must not wait for it at exit), but a
    # task may start processes of its own (multiprocessing refuses that to a daemon), as in
    # ProcessPoolExecutor's workers; parrun's own pools refuse to nest (IN_WORKER).
    mp.current_process()._config["daemon"] = False  # type: ignore[attr-defined]
    limit_blas(blas_threads)
    _keep_heap()
    if cpu is not None:
        try:
            import psutil

            psutil.Process().cpu_affinity([cpu])
        except Exception:  # pragma: no cover - affinity not supported here
            pass
    worker = _Worker(slot, control_name, nslots, cmd)
    if initializer is not None:
        try:
            init, initargs = cloudpickle.loads(initializer)
            init(*initargs)
        except BaseException as e:
            status.send_bytes(cloudpickle.dumps(P.InitFailed(slot, exception_for_transport(e))))
            sys.exit(1)
    status.send_bytes(pickle.dumps(P.Ready(slot, os.getpid())))
    poller = select.poll()  # the command pipe: a message, or the parent gone (POLLHUP)
    poller.register(cmd.fileno(), select.POLLIN)
    while True:
        try:
            if not poller.poll(0):
                _spin(poller)
            data = cmd.recv_bytes()
        except (EOFError, OSError):  # the parent is gone
            break
        msg = pickle.loads(data)
        if isinstance(msg, P.Job):
            done = worker.run_job(msg)
            try:
                payload = _shm.dumps_result(done)  # a big partial goes through a segment
            except BaseException as e:
                payload = pickle.dumps(P.Done(done.job_id, slot, exception_for_transport(
                    TypeError(f"the partial result of worker {slot} could not be pickled: "
                              f"{type(e).__name__}: {e}")), P.NOTHING))
            try:
                status.send_bytes(payload)
            except (BrokenPipeError, OSError):
                break
        elif isinstance(msg, P.TaskWake):
            try:
                worker.serve_tasks(msg, status)
            except (BrokenPipeError, OSError):
                break
        elif isinstance(msg, P.Function):
            worker.fns[msg.key] = msg.data  # unpickled at its first use
        elif isinstance(msg, P.Forget):
            worker.forget(msg)
        elif isinstance(msg, P.Stop):
            break
