"""Submitted tasks: the parent's side of running single calls on the work-stealing pool.

A task is a range of one item in the same scheduler that runs ``map``::

    submit(fn, *args)  -> _Task (a Future, pickled args) -> pending queue
    collector thread   -> gives the task the next id t, writes its payload to arena slot
                          t % ARENA_SLOTS, adds [t, t+1) to a worker's range in the control
                          block (an idle worker's, or the end of the last range), wakes idle
                          workers (TaskWake)
    workers            -> take pieces of their range, steal halves of others', run the tasks,
                          send TaskResults per piece, Idle when nothing is left
    collector thread   -> sets each future's result or exception; on a worker's death fails
                          (or re-queues, with ``retries``) the tasks it was running, re-queues
                          the rest of its range, and starts a replacement

The collector is the only thread that touches task state and the workers' pipes while tasks
are in flight; it holds the pool's job lock meanwhile, so a ``map`` waits until the tasks in
flight are done (and new tasks wait for a running ``map``).

Crash caveat: if a worker dies in the microseconds between recording a stolen half in its own
slot and shrinking the victim's range, tasks of that half can be handed out twice; the parent
then keeps the first result and ignores the second.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import select
import struct
import threading
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _protocol as P
from . import _shm
from ._errors import BrokenPool, PoolClosedError, SharedMemoryError, WorkerCrashed, describe_exit
from ._scheduler import CUR_HI, CUR_LO, HI, LO, RUNNING
from ._worker import TARGET_PIECE_NS

# Task payload slots in the arena, and bytes per slot. The slots bound the tasks in flight
# (more wait in the parent's queue); a payload bigger than a slot goes through a segment of
# its own (~30 us more). 4096 x 1 KiB = 4 MiB of /dev/shm per pool that runs tasks.
ARENA_SLOTS = 4096
SLOT_BYTES = 1024
_HEADER = 24  # int64 length + 16-byte function key
_NAME_FIELD = 64
_SLOT_HEAD = struct.Struct("<q16s")


def _frame(data: bytes) -> bytes:
    """``data`` framed as ``multiprocessing.connection.Connection.send_bytes`` frames it, for
    its ``recv_bytes`` on the other end."""
    n = len(data)
    if n > 0x7FFFFFFF:
        return struct.pack("!i", -1) + struct.pack("!Q", n) + data
    return struct.pack("!i", n) + data


@dataclass
class _Task:
    future: Future
    key: bytes
    fn_data: bytes
    payload: bytes
    temps: list = field(default_factory=list)
    retries_left: int = 0
    overflow: Any = None  # the segment holding a payload too big for a slot
    # The function and arguments themselves, until the task is done: a shared array made in
    # the call (``submit(np.sum, parrun.asshared(x))``) is otherwise collected, and its
    # segment unlinked, before a worker maps it.
    held: Any = None


@dataclass
class TaskStats:
    """Counters of the tasks a pool ran (``pool.task_stats``), since it started."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    retried: int = 0
    crashed: int = 0
    steals: int = 0
    pieces: int = 0
    tasks_per_worker: list = field(default_factory=list)
    busy_s_per_worker: list = field(default_factory=list)


class TaskService:
    """The parent's task machinery for one pool (created on the first ``submit``)."""

    def __init__(self, pool: Any, retries: int = 0):
        # Weakly: the collector thread must not keep an unused pool (and its workers) alive;
        # it holds the pool only while it serves.
        self._pool = weakref.ref(pool)
        self._keep: Any = None  # the pool, while tasks are pending or running (see submit)
        self.retries = retries
        # One lock for all task state; the collector and submitting threads both dispatch.
        # Reentrant: a future's done-callback may submit from inside the collector.
        self.cv = threading.Condition(threading.RLock())
        self.idle: set[int] = set()
        self.down: set[int] = set()  # slots whose replacement failed to start, this round
        # Per function: a running estimate of a task's cost, which sizes the dispatch window.
        self.task_ns: dict[bytes, float] = {}
        self.pending: deque[_Task] = deque()
        self.redo: list[tuple[int, int]] = []
        self.inflight: dict[int, _Task] = {}
        self.next_tid = 0
        self.closing = False
        self.serving = False
        self.broken: BaseException | None = None  # what ended the collector thread, if not close
        self.stats = TaskStats(tasks_per_worker=[0] * pool.workers,
                               busy_s_per_worker=[0.0] * pool.workers)
        self.arena_seg: _shm._Segment | None
        self.arena: np.ndarray | None
        self.arena_seg, self.arena = _shm.create_segment(ARENA_SLOTS * SLOT_BYTES)
        self.arena_mv = self.arena.data
        self.wake = P.TaskWake(self.arena_seg.name, ARENA_SLOTS, SLOT_BYTES)
        self.next_wake = 0
        self.wake_seq = [0] * pool.workers  # the last wake-up sent to each worker
        # Per worker slot: frames for its command pipe that it has not taken yet. While
        # serving, nothing waits on a worker's full command pipe: a busy worker reads it
        # only between tasks, and may itself be blocked sending results, which only this
        # thread reads (a 200 KB function to busy workers returning 200 KB results once
        # hung the pool). What does not fit goes out as the pipe drains (POLLOUT).
        self.outbox: dict[int, deque[memoryview]] = {}
        self._close_lock = threading.Lock()
        self._poke_r, self._poke_w = os.pipe()
        self._poked = False
        os.set_blocking(self._poke_w, False)
        self.thread = threading.Thread(target=self._run, name="parrun-tasks", daemon=True)
        self.thread.start()

    @property
    def pool(self) -> Any:
        return self._pool()

    # -- called from user threads ---------------------------------------------------------
    def submit(self, fn: Any, args: tuple, kwargs: dict) -> Future:
        pool = self.pool
        key, data, _ = pool._register(fn)
        f: Future = Future()
        try:
            payload, temps = _shm.dumps_args((args, kwargs))
        except (SharedMemoryError, _shm.ReleasedArrayError) as e:
            # /dev/shm is full, or an argument's segment was released: say so, not "could
            # not be pickled"
            f.set_exception(e)
            return f
        except Exception as e:
            f.set_exception(TypeError(f"the task's arguments could not be pickled: "
                                      f"{type(e).__name__}: {e}"))
            return f
        overflow = None
        if len(payload) > SLOT_BYTES - _HEADER:
            # Too big for an arena slot: a segment of its own, made here so that a full
            # /dev/shm fails this future (it once ended the collector thread instead).
            try:
                overflow = _shm.asshared(np.frombuffer(payload, np.uint8))
            except SharedMemoryError as e:
                for tmp in temps:
                    tmp.release()
                f.set_exception(e)
                return f
        task = _Task(f, key, data, payload, temps, self.retries, overflow, (fn, args, kwargs))
        with self.cv:
            if self.closing or self.broken is not None:
                for t in temps:
                    t.release()
                if overflow is not None:
                    overflow.release()
                if self.broken is not None:
                    raise BrokenPool(
                        f"this pool's task collector failed ({type(self.broken).__name__}: "
                        f"{self.broken}); close the pool and create a new one"
                    ) from self.broken
                raise PoolClosedError("this parrun.Pool is closed; create a new Pool")
            self.pending.append(task)
            self.stats.submitted += 1
            # Held until every task is done: a pool (or Executor) dropped right after submit
            # would otherwise be collected, and close, cancelling them.
            self._keep = pool
            if not self.serving:
                self.cv.notify()
                return f
            if self.idle:  # a worker waits: hand it over now, no hop through the collector
                self._dispatch()
                return f
            # All workers busy: the collector dispatches what queued up in one batch, as soon
            # as it next wakes (a burst of submits makes a few large ranges, not many tiny).
            if self._poked:
                return f
            self._poked = True
        self._poke()
        return f

    def cancel_pending(self) -> int:
        """Cancel every task not yet handed to a worker; return how many."""
        with self.cv:
            tasks = list(self.pending)
            self.pending.clear()
        n = 0
        for t in tasks:
            if t.future.cancel():
                n += 1
            t.future.set_running_or_notify_cancel()  # wakes wait() and as_completed()
            self._release(t)
        self.stats.cancelled += n
        return n

    def outstanding(self) -> list[Future]:
        with self.cv:
            return [t.future for t in self.pending] + [t.future for t in
                                                       list(self.inflight.values())]

    def in_callback(self) -> bool:
        """True in this service's thread: the one that completes futures and runs their
        done-callbacks."""
        return threading.current_thread() is self.thread

    def close(self, timeout: float | None = None) -> None:
        """Cancel pending tasks, let those in flight finish, stop the collector."""
        self.cancel_pending()
        with self.cv:
            self.closing = True
            self.cv.notify()
        self._poke()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)
        self._keep = None  # (no cycle with the pool left for the garbage collector)
        with self._close_lock:  # once (close and terminate may run at once)
            if self.thread.is_alive() or self.arena_seg is None:
                return
            os.close(self._poke_r)
            os.close(self._poke_w)
            self._poke_w = -1  # a late _poke must not write into a reused descriptor
            self.arena_mv.release()
            _shm.release_segment(self.arena_seg.name)
            self.arena_seg = None
            self.arena = None

    def fail_all(self, exc: BaseException) -> None:
        """Fail every task in flight (the pool is being torn down)."""
        for tid in list(self.inflight):
            t = self.inflight.pop(tid)
            self._release(t)
            if not t.future.done():
                t.future.set_exception(exc)

    def look_again(self) -> None:
        """Make the collector look again (a map started waiting for the pool)."""
        with self.cv:
            self.cv.notify()
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._poke_w, b"x")
        except (BlockingIOError, OSError):
            pass

    # -- the collector thread -------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.pending and not self.redo and not self.closing:
                    self.cv.wait()
                if self.closing and not self.pending and not self.inflight and not self.redo:
                    break
            pool = self.pool
            if pool is None:  # collected: its __del__ closed it
                break
            with pool._turn:  # maps waiting go first
                while pool._maps_waiting:
                    pool._turn.wait()
            with pool._lock:  # exclusive with map jobs
                if pool._stopped:
                    self.fail_all(PoolClosedError("the pool was closed"))
                    break
                try:
                    pool._drain_stale()  # a map an interrupt cut short: its workers first
                except WorkerCrashed:  # a replacement failed to start: tried again below
                    pass
                pool._cb.start_job([])  # every range empty, abort cleared
                try:
                    # Workers whose replacement failed (in the last round too): again. Those
                    # still dead are down for this round; the others serve. All before
                    # ``serving``: from then on submit() dispatches, on non-blocking pipes
                    # (a dispatch meanwhile once blocked on a busy worker's pipe).
                    self.down = pool._replace_dead(tolerate=True)
                    self._blocking(pool, False)
                    with self.cv:
                        self.idle = set(range(pool.workers)) - self.down
                        self.serving = True
                    self._serve()
                except BaseException as e:  # a bug here must not hang the futures
                    with self.cv:
                        self.serving = False
                        self.broken = e
                        self.fail_all(e)
                        queued, self.pending = list(self.pending), deque()
                    for t in queued:  # and those not handed out yet, and later submits
                        self._release(t)
                        if t.future.set_running_or_notify_cancel():
                            t.future.set_exception(BrokenPool(
                                f"this pool's task collector failed ({type(e).__name__}: "
                                f"{e}) before the task ran"))
                    return
                finally:
                    self._account_steals()
                    self._blocking(pool, True)
            with self.cv:
                if not self.pending and not self.inflight and not self.redo:
                    self._keep = None
            del pool  # not held while idle (dropped, it is collected and closes here)

    def _make_poller(self):
        """A poll object over every worker's status pipe and sentinel, and the poke pipe;
        command pipes are watched for room while they have frames waiting (``_send``)."""
        self._watched_out: set[int] = set()
        poller = select.poll()
        live = [w for w in self.pool._workers if w.slot not in self.down]
        conns = {w.status: w.slot for w in live}
        sentinels = {w.process.sentinel: w.slot for w in live}
        self._fds = {}
        for obj in (*conns, *sentinels, self._poke_r):
            fd = obj if isinstance(obj, int) else obj.fileno()
            self._fds[fd] = obj
            poller.register(fd, select.POLLIN)
        return poller, conns, sentinels

    def _serve(self) -> None:
        pool = self.pool
        poller_gen = -1
        while True:
            with self.cv:
                if len(self.down) == pool.workers:
                    # No worker to run anything: fail what this round holds; what is
                    # submitted from now on waits for the next round, which starts workers
                    # again (a resubmit here once waited for ever).
                    self.serving = False
                    self._fail_if_all_down(pool)
                    return
                self._dispatch()
                if (not self.inflight and not self.redo
                        and (not self.pending or pool._maps_waiting)
                        and len(self.idle) + len(self.down) == pool.workers):
                    self.serving = False  # from now on submit() queues for the next round
                    return
                outs = {pool._workers[k].cmd.fileno(): k for k in self.outbox}
            if poller_gen != pool._generation:  # workers changed: watch the new ones
                poller, conns, sentinels = self._make_poller()
                poller_gen = pool._generation
            for fd in outs.keys() - self._watched_out:
                poller.register(fd, select.POLLOUT)
            for fd in self._watched_out - outs.keys():
                poller.unregister(fd)
            self._watched_out = set(outs)
            # Block at once: a thread waiting on a future we just completed needs the GIL,
            # and gets it soonest when this thread sleeps.
            fds = self._fds
            events = poller.poll()
            if outs:
                with self.cv:
                    for fd, _ in events:  # room in a command pipe (or its reader is gone)
                        if fd in outs and poller_gen == pool._generation:
                            self._flush(pool._workers[outs[fd]])
            ready = [fds[fd] for fd, _ in events if fd in fds]
            with self.cv:
                for r in ready:
                    if poller_gen != pool._generation:
                        break  # a worker was replaced: the rest may name the old one; re-poll
                    if r == self._poke_r:
                        os.read(self._poke_r, 4096)
                        self._poked = False
                    elif r in conns:
                        slot = conns[r]
                        try:
                            msg = pickle.loads(r.recv_bytes())
                        except (EOFError, OSError):
                            self._on_death(slot)
                            continue
                        if isinstance(msg, P.TaskResults):
                            self._deliver(msg)
                            if msg.idle:
                                self._went_idle(slot, msg.seq)
                        elif isinstance(msg, P.Idle):
                            self._went_idle(slot, msg.seq)
                    elif r in sentinels:
                        slot = sentinels[r]
                        w = pool._workers[slot]
                        if not w.status.poll():  # nothing left to read from it: handle it now
                            self._on_death(slot)

    def _went_idle(self, slot: int, seq: int) -> None:
        # Idle only once it has answered the last wake-up sent to it: a wake-up still in
        # its pipe would make it serve again, perhaps after the collector stopped serving.
        if seq == self.wake_seq[slot]:
            self.idle.add(slot)

    def _dispatch(self) -> None:
        """Give pending tasks ids and payload slots, add them to ranges, wake idle workers.
        Called with ``self.cv`` held."""
        pool = self.pool
        idle = self.idle
        cb = pool._cb
        batch: list[_Task] = []
        # The oldest task in flight holds the slot the next ids would wrap around to (the
        # dict keeps insertion order, which is id order).
        oldest = next(iter(self.inflight), self.next_tid)
        head = self.pending[0].key if self.pending else None
        room = min(ARENA_SLOTS - (self.next_tid - oldest),
                   self._window(head) - len(self.inflight))
        if pool._maps_waiting:  # a map waits: no new task until it has run
            room = 0
        while self.pending and len(batch) < room:
            t = self.pending.popleft()
            # Cancelled while it waited: it takes no room. (It did once, so that a queue of
            # cancelled tasks left the window empty, no worker reported, and the tasks
            # behind them waited forever.)
            if t.future.set_running_or_notify_cancel():
                batch.append(t)
            else:
                self.stats.cancelled += 1
                self._release(t)
        first = self.next_tid
        if batch:
            pool._queue_forgets()
            dropped: set[bytes] = set()
            for w in pool._workers:
                dropped.update(w.forget_fns)
                msg = pool._forgets(w)
                if msg is not None:
                    self._send(w, msg)
            if dropped:
                # A function that left the pool's LRU (or names a released segment) while
                # tasks of it wait in the ranges: sent again after the Forget, or a worker
                # would wait for it for ever (read_functions).
                for t in self.inflight.values():
                    if t.key in dropped:
                        self._send_function(t)
                        # and forgotten again when evicted
                        pool._note_function(t.key, nbytes=len(t.fn_data))
                        dropped.discard(t.key)
        for t in batch:
            tid = self.next_tid
            self.next_tid += 1
            self._write(tid, t)
            self.inflight[tid] = t
            self._send_function(t)
        ranges = list(self.redo)
        self.redo.clear()
        if self.next_tid > first:
            ranges.append((first, self.next_tid))
        for lo, hi in ranges:
            if not self._place(lo, hi, idle):
                self.redo.append((lo, hi))
        # Wake idle workers when ranges hold work: those with work in their own range
        # first, then others to steal; no more than there are tasks waiting.
        if idle:
            sizes = {k: cb.get(k, HI) - cb.get(k, LO) for k in range(pool.workers)}
            waiting = sum(v for v in sizes.values() if v > 0)
            for k in sorted(idle, key=lambda k: -sizes[k]):
                if waiting <= 0:
                    break
                self.next_wake += 1
                if not self._send(pool._workers[k], pickle.dumps(
                        dataclasses.replace(self.wake, seq=self.next_wake))):
                    continue  # dead: its sentinel will tell
                self.wake_seq[k] = self.next_wake
                idle.discard(k)
                waiting -= 1

    def _window(self, key: bytes | None) -> int:
        """Tasks to have in flight when the next one runs function ``key``: two per worker
        when its tasks are slow (or not timed yet), so that the rest stay pending
        (cancellable) in the parent, as with ProcessPoolExecutor; up to enough to fill a
        piece of ~TARGET_PIECE_NS per worker when they are quick."""
        per_worker = 2
        est = self.task_ns.get(key, 0.0) if key is not None else 0.0
        if est > 0:
            per_worker = max(2, min(ARENA_SLOTS // self.pool.workers,
                                    int(2 * TARGET_PIECE_NS / est)))
        return per_worker * self.pool.workers

    def _place(self, lo: int, hi: int, idle: set[int]) -> bool:
        """Add ``[lo, hi)`` to a range: an idle worker's empty one, the range that ends at
        ``lo``, or any empty one. False if none fits now."""
        cb = self.pool._cb
        order = sorted(idle) + [k for k in range(self.pool.workers)
                                if k not in idle and k not in self.down]
        for k in order:
            cb._lock(k)
            try:
                a, b = cb.get(k, LO), cb.get(k, HI)
                if a >= b:
                    cb.set(k, LO, lo)
                    cb.set(k, HI, hi)
                    return True
                if b == lo:
                    cb.set(k, HI, hi)
                    return True
            finally:
                cb._unlock(k)
        return False

    def _write(self, tid: int, t: _Task) -> None:
        off = (tid % ARENA_SLOTS) * SLOT_BYTES
        mv = self.arena_mv
        n = len(t.payload)
        if n <= SLOT_BYTES - _HEADER:
            _SLOT_HEAD.pack_into(mv, off, n, t.key)
            mv[off + _HEADER:off + _HEADER + n] = t.payload
        else:  # the payload's own segment, made by submit
            seg = t.overflow
            _SLOT_HEAD.pack_into(mv, off, -n, t.key)
            struct.pack_into(f"{_NAME_FIELD}s", mv, off + _HEADER, seg.segment.encode())

    def _deliver(self, msg: P.TaskResults) -> None:
        st = self.stats
        st.pieces += not msg.partial
        per_task = msg.busy_ns / max(1, len(msg.results))
        st.busy_s_per_worker[msg.slot] += msg.busy_ns / 1e9
        timed = set()
        w = self.pool._workers[msg.slot]
        for tid, ok, payload in msg.results:
            t = self.inflight.pop(tid, None)
            if t is None:  # a duplicate after a crash: the first result stands
                _shm.unlink_unadopted(payload, _shm.name_prefix(w.pid, w.tag))
                continue
            if t.key not in timed:
                timed.add(t.key)
                est = self.task_ns.pop(t.key, 0.0)  # and back in at the end: the newest
                self.task_ns[t.key] = per_task if not est else 0.7 * est + 0.3 * per_task
                if len(self.task_ns) > ARENA_SLOTS:
                    del self.task_ns[next(iter(self.task_ns))]
            self._release(t)
            st.tasks_per_worker[msg.slot] += 1
            try:
                value = pickle.loads(payload)
            except BaseException as e:  # (never leave the future pending)
                _shm.unlink_unadopted(payload, _shm.name_prefix(w.pid, w.tag))
                ok, value = False, TypeError(f"the task's result could not be unpickled: "
                                             f"{type(e).__name__}: {e}")
            if ok:
                st.completed += 1
                t.future.set_result(value)
            else:
                st.failed += 1
                t.future.set_exception(value)

    def _on_death(self, slot: int) -> None:
        pool = self.pool
        cb = pool._cb
        w = pool._workers[slot]
        w.process.join(5.0)
        code = w.process.exitcode
        if pool._terminating:  # killed on purpose: no replacement, nothing to re-run
            self.redo.clear()
            self.fail_all(BrokenPool("the pool was terminated while this task ran"))
            self.idle.add(slot)
            return
        cb._lock(slot)  # the kernel dropped the dead worker's locks
        try:
            clo, chi = cb.get(slot, CUR_LO), cb.get(slot, CUR_HI)
            lo, hi = cb.get(slot, LO), cb.get(slot, HI)
            running = cb.get(slot, RUNNING) - 1
            cb.set(slot, LO, hi)
            cb.set(slot, CUR_LO, 0)
            cb.set(slot, CUR_HI, 0)
            cb.set(slot, RUNNING, 0)
        finally:
            cb._unlock(slot)
        if not clo <= running < chi:  # died before its piece's first task began
            running = clo - 1
        # Of its piece: the task it was running failed with it; those after it never
        # started (they go back to the queue as they were); those before it ran, but their
        # results were lost with it (they had not been sent yet).
        if running + 1 < chi:
            self.redo.append((running + 1, chi))
        lost: list[tuple[_Task, str]] = []  # failed: their futures are told below
        for tid in range(clo, min(chi, running + 1)):
            t = self.inflight.get(tid)
            if t is None:
                continue
            if tid < running and self.retries > 0:
                # It ran: re-running it is what retries allow, but it is not charged (it
                # would fail with the task that kills its piece again and again).
                self.redo.append((tid, tid + 1))
            elif t.retries_left > 0:
                t.retries_left -= 1
                self.stats.retried += 1
                self.redo.append((tid, tid + 1))
            else:
                del self.inflight[tid]
                self._release(t)
                self.stats.crashed += 1
                lost.append((t, "while running this task" if tid == running else
                             "after this task ran, before its result was sent"))
        if lo < hi:
            self.redo.append((lo, hi))
        self.outbox.pop(slot, None)  # for the dead worker's pipe
        started = False
        try:
            pool._replace(slot)
            started = True
        except WorkerCrashed:
            # Its replacement died as it started, START_TRIES times (killed, say): the slot
            # is down until the next round, and its tasks go to the others. (This once
            # ended the collector, and every later submit failed.)
            self.down.add(slot)
            self.idle.discard(slot)
            self._fail_if_all_down(pool)
            return
        finally:  # (after the replacement, whose fate the message tells)
            then = "a replacement worker has started" if started else \
                "its replacement failed to start"
            for t, what in lost:
                t.future.set_exception(WorkerCrashed(
                    f"worker {slot} (pid {w.pid}) died {what} ({describe_exit(code)}); "
                    f"{then}", pid=w.pid, exitcode=code))
        self.wake_seq[slot] = 0  # a fresh worker has answered everything
        new = pool._workers[slot]
        os.set_blocking(new.cmd.fileno(), False)
        for key, data in {(t.key, t.fn_data) for t in self.inflight.values()}:
            if not self._send(new, pickle.dumps(P.Function(key, data), protocol=5)):
                break  # the replacement died too: its sentinel will tell
            new.fn_keys.add(key)
        self.idle.add(slot)

    def _send_function(self, t: _Task) -> None:
        """Send task ``t``'s function to the workers that do not hold it."""
        data = None
        for w in self.pool._workers:
            if w.slot not in self.down and t.key not in w.fn_keys:
                data = data or pickle.dumps(P.Function(t.key, t.fn_data), protocol=5)
                if self._send(w, data):
                    w.fn_keys.add(t.key)

    # -- command pipes while serving (see ``outbox``) ------------------------------------
    def _send(self, w: Any, data: bytes) -> bool:
        """Send ``data`` to worker ``w`` as ``Connection.send_bytes`` would, without waiting:
        what its pipe cannot take now waits in ``outbox``. False if ``w`` is dead (its
        sentinel will tell). Called with ``self.cv`` held."""
        frame = memoryview(_frame(data))
        q = self.outbox.get(w.slot)
        if q is not None:
            q.append(frame)
            return True
        self.outbox[w.slot] = deque([frame])
        alive = self._flush(w)
        if w.slot in self.outbox and threading.current_thread() is not self.thread:
            self._poke()  # the collector now watches that pipe for room
        return alive

    def _flush(self, w: Any) -> bool:
        """Write what the pipe to ``w`` takes now; False if ``w`` is dead (its frames are
        dropped)."""
        q = self.outbox.get(w.slot)
        try:
            fd = w.cmd.fileno()
        except OSError:  # closed: a replacement failed
            fd = -1
        while q:
            try:
                n = os.write(fd, q[0])
            except BlockingIOError:
                return True
            except OSError:  # EPIPE (or EBADF): dead
                self.outbox.pop(w.slot, None)
                return False
            if n < len(q[0]):
                q[0] = q[0][n:]
                return True
            q.popleft()
        self.outbox.pop(w.slot, None)
        return True

    def _flush_all(self) -> None:
        """At the end of serving (every worker idle, reading its command pipe): send what
        waits, waiting for room, so that the next user of the pipes finds whole frames."""
        pool = self.pool
        for slot in list(self.outbox):
            w = pool._workers[slot]
            try:
                os.set_blocking(w.cmd.fileno(), True)
            except OSError:  # closed: a replacement failed
                self.outbox.pop(slot)
                continue
            self._flush(w)

    def _blocking(self, pool: Any, on: bool) -> None:
        """Command pipes block outside serving (``send_bytes`` of maps and ``close``)."""
        if on:
            self._flush_all()
            self.outbox.clear()
        for w in pool._workers:
            try:
                os.set_blocking(w.cmd.fileno(), on)
            except OSError:  # closed: a replacement failed
                pass

    def _fail_if_all_down(self, pool: Any) -> None:
        """With no worker left to run them, fail the tasks of this round (a later submit
        tries to start workers again)."""
        if len(self.down) < pool.workers:
            return
        w = pool._workers[0]
        err = WorkerCrashed(f"no worker of the pool could be started (the last, pid {w.pid}: "
                            f"{describe_exit(w.process.exitcode)}); the next call tries "
                            "again", pid=w.pid, exitcode=w.process.exitcode)
        self.redo.clear()
        # The queue first: a done-callback that submits again (fail_all runs callbacks)
        # queues for the next round.
        queued, self.pending = list(self.pending), deque()
        self.fail_all(err)
        for t in queued:
            self._release(t)
            if t.future.set_running_or_notify_cancel():
                t.future.set_exception(err)

    def _release(self, t: _Task) -> None:
        t.held = None
        for tmp in t.temps:
            tmp.release()
        t.temps = []
        if t.overflow is not None:
            t.overflow.release()
            t.overflow = None

    def _account_steals(self) -> None:
        cb = self.pool._cb
        self.stats.steals += sum(cb.slot_stats(k)[2] for k in range(self.pool.workers))
