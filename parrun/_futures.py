"""``parrun.Executor``: the ``concurrent.futures`` face of a parrun pool.

An ``Executor`` owns one ``Pool`` (started on the first ``submit``, as
``ProcessPoolExecutor`` starts its processes lazily) and forwards ``submit`` to
``Pool.submit``; ``map`` is written in terms of ``submit``. So a task submitted here runs in the
same work-stealing scheduler as ``Pool.map``; ``executor.pool`` gives the pool itself (for
``map`` over arrays, or ``task_stats``).
"""

from __future__ import annotations

import atexit
import functools
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor as _Executor
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ._errors import BrokenPool, exception_for_transport
from ._pool import Pool, _count, default_workers

# What an Executor passes on to its Pool besides workers, initializer, initargs, retries.
_POOL_OPTIONS = frozenset({"backend", "blas_threads", "pin", "start_method"})

# Items per task when map batches automatically: enough that per-task costs (~20 us) vanish,
# few enough that work stealing still has pieces to balance uneven items.
MAX_AUTO_CHUNK = 1000
CHUNKS_PER_WORKER = 16


def _run_chunk(fn: Callable[..., Any], chunk: list[tuple]) -> list[tuple[bool, Any]]:
    """Run ``fn`` over a chunk of argument tuples in a worker; stop at the first exception
    (as ``ProcessPoolExecutor`` does) but keep the results before it."""
    out: list[tuple[bool, Any]] = []
    for args in chunk:
        try:
            out.append((True, fn(*args)))
        except BaseException as e:
            out.append((False, exception_for_transport(e)))
            break
    return out


class Executor(_Executor):
    """A ``concurrent.futures.Executor`` on a parrun pool: a drop-in for
    ``ProcessPoolExecutor`` that shares arrays instead of copying them.

    Args:
        max_workers: worker processes; default ``PARRUN_NUM_WORKERS`` or the usable cores.
        initializer, initargs: run in each worker as it starts. If it raises, the executor is
            broken: pending futures fail and ``submit`` raises ``BrokenProcessPool``.
        retries: times a task whose worker died is run again before its future fails.
        pool_options: passed to ``parrun.Pool`` (``blas_threads``, ``pin``,
            ``start_method``).
    """

    def __init__(self, max_workers: int | None = None, initializer: Callable[..., Any] |
                 None = None, initargs: tuple = (), *, retries: int = 0,
                 **pool_options: Any) -> None:
        max_workers = default_workers() if max_workers is None else \
            _count("max_workers", max_workers, 1)
        retries = _count("retries", retries, 0)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        unknown = sorted(set(pool_options) - _POOL_OPTIONS)
        if unknown and pool_options.get("backend", "local") == "local":  # now, not at the
            # first submit (another backend checks its own options as the pool starts)
            raise TypeError(f"unknown option(s) for parrun.Pool: {', '.join(unknown)} (it "
                            f"takes {', '.join(sorted(_POOL_OPTIONS))})")
        self._max_workers = max_workers
        self._pool_args = dict(initializer=initializer, initargs=initargs, retries=retries,
                               **pool_options)
        self._pool: Pool | None = None
        self._lock = threading.Lock()
        self._submits_done = threading.Condition(self._lock)
        self._submitting = 0  # submits past the shutdown check, not yet queued
        self._shutdown = False
        self._broken: str | None = None

    @property
    def pool(self) -> Pool:
        """The pool behind this executor (started if it was not yet)."""
        with self._lock:
            if self._shutdown and self._pool is None:
                raise RuntimeError("this executor is shut down; it has no pool")
            return self._ensure_pool()

    def _ensure_pool(self) -> Pool:
        if self._pool is None:
            try:
                self._pool = Pool(self._max_workers, **self._pool_args)
            except BrokenPool as e:
                self._broken = str(e)
                raise
            _executor_pools.add(self._pool)
        return self._pool

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)``; return its Future."""
        with self._lock:
            if self._broken:
                raise BrokenProcessPool(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            try:
                pool = self._ensure_pool()
            except BrokenPool as e:
                f: Future = Future()
                f.set_exception(e)
                return f
            self._submitting += 1  # shutdown waits for this one to be queued
        try:
            return pool.submit(fn, *args, **kwargs)
        finally:
            with self._lock:
                self._submitting -= 1
                if not self._submitting:
                    self._submits_done.notify_all()

    submit.__doc__ = _Executor.submit.__doc__

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int | None = None) -> Iterator[Any]:
        """Like ``ProcessPoolExecutor.map``: results in input order, lazily.

        ``chunksize=None`` batches automatically (about 16 chunks per worker, at most 1000
        items each); ``chunksize=1`` submits one task per item. All items are submitted when
        ``map`` is called. ``timeout`` counts from the call; an item's exception is raised
        when the iterator reaches it. Closing the iterator early cancels what has not run.
        """
        if timeout is not None:
            end_time = timeout + time.monotonic()
        items = list(zip(*iterables))
        if chunksize is None:
            workers = self._max_workers
            chunksize = max(1, min(MAX_AUTO_CHUNK,
                                   len(items) // (workers * CHUNKS_PER_WORKER)))
        elif chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            fs = [self.submit(fn, *args) for args in items]
        else:
            # fn goes with the function, not with each chunk's arguments: pickled once for
            # this call and sent to each worker once (what it captures, a plain array say,
            # was copied into every chunk).
            run = functools.partial(_run_chunk, fn)
            fs = [self.submit(run, list(chunk)) for chunk in _batched(items, chunksize)]

        def result_iterator(executor: Executor = self) -> Iterator[Any]:
            # (``executor``: not collected, its pool closed, while results are read.)
            try:
                fs.reverse()  # pop from the end: the futures left are the ones to cancel
                while fs:
                    f = fs[-1]
                    if timeout is None:
                        res = f.result()
                    else:
                        res = f.result(end_time - time.monotonic())
                    fs.pop()
                    if chunksize == 1:
                        yield res
                    else:
                        for ok, value in res:
                            if not ok:
                                raise value
                            yield value
            finally:
                for f in fs:
                    f.cancel()

        return result_iterator()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; free the workers once the tasks submitted have run.

        Args:
            wait: block until all submitted (not cancelled) tasks are done and the workers
                have exited. With False, return at once; a background thread does that (and
                the program does not exit before it has, as with ``ProcessPoolExecutor``).
            cancel_futures: cancel the tasks that have not started.

        Ctrl-C (KeyboardInterrupt) while waiting cancels what has not started, stops the
        workers at once and re-raises. ``wait=True`` from a done-callback raises
        ``RuntimeError`` (it would wait for itself); the executor still shuts down.
        """
        with self._lock:
            self._shutdown = True
            pool = self._pool
            tasks = pool._tasks if pool is not None else None
            # In a done-callback, the thread that completes futures holds the lock that a
            # submit under way waits for: waiting for it here would wait for ever (the
            # background thread below waits for it instead).
            in_callback = tasks is not None and tasks.in_callback()
            if not in_callback:
                self._await_submits()
        if pool is None:
            return
        if cancel_futures and tasks is not None:
            tasks.cancel_pending()
        if not wait or in_callback:
            threading.Thread(target=self._finish, args=(pool, True), name="parrun-shutdown",
                             daemon=True).start()
            if in_callback and wait:
                raise RuntimeError("shutdown(wait=True) in a done-callback would wait for "
                                   "the callback itself; the executor shuts down in the "
                                   "background")
            return
        try:
            self._finish(pool)
        except KeyboardInterrupt:
            if tasks is not None:
                tasks.cancel_pending()
            pool.terminate()
            raise

    def _await_submits(self) -> None:
        """Wait for the submits that passed the shutdown check to queue their tasks
        (called with ``self._lock`` held)."""
        while self._submitting:
            self._submits_done.wait()

    def _finish(self, pool: Pool, await_submits: bool = False) -> None:
        """Wait for the tasks submitted, then close the pool."""
        if await_submits:
            with self._lock:
                self._await_submits()
        if pool._tasks is not None:
            wait_futures(pool._tasks.outstanding())
        pool.close()


# The pools of executors; at exit, the tasks submitted to each run before the pools close
# (this hook runs before the pools' own: atexit runs the last registered first), also when
# the executor was dropped without shutdown (its pool lives on while tasks are pending), and
# those already running after shutdown(cancel_futures=True).
_executor_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


@atexit.register
def _wait_for_executors() -> None:
    for pool in list(_executor_pools):
        tasks = pool._tasks
        if tasks is None or pool.closed:
            continue
        # Until none is left: a done-callback may submit more.
        while outstanding := tasks.outstanding():
            wait_futures(outstanding)


def _batched(items: list, n: int) -> Iterator[tuple]:
    it = iter(items)
    while True:
        chunk = tuple(itertools.islice(it, n))
        if not chunk:
            return
        yield chunk
