"""The control block of a job and the take / steal protocol on it.

A pool owns one control block: a small shared-memory segment that every worker maps. It holds
the abort flag and, per worker slot, the worker's remaining index range ``[lo, hi)``, the piece
it is running and its counters::

    header   ABORT | (reserved...)
    slot k   LO | HI | CUR_LO | CUR_HI | ITEMS | PIECES | STEALS | BUSY_NS | RUNNING | (reserved...)

The parent writes the initial ranges while every worker is idle, then wakes them. From then on
only workers change ranges:

* **take**: a worker cuts ``grain`` items from the bottom of its own range;
* **steal**: a worker whose range is empty picks the worker with the most items left and moves
  the upper half of that range into its own.

Both happen under POSIX record locks (``fcntl.lockf``) on one byte per slot of the control
block's file. The kernel drops a process's record locks when it dies, so a worker killed while
holding one cannot deadlock the others; this is why they are not ``multiprocessing.Lock``.
Writes are ordered so that a worker killed at any instant never *loses* items: the piece it
runs is recorded (``CUR``) before it leaves the range, and a thief records the stolen half in
its own slot before shrinking the victim's. At worst an item is listed twice, and the parent,
which inspects a dead worker's slot only after every live worker went idle, re-runs the dead
worker's current piece and whatever it left.
"""

from __future__ import annotations

import fcntl
import time

HEADER = 8  # int64 words before the first slot
SLOT = 16  # int64 words per slot
ABORT = 0
LO, HI, CUR_LO, CUR_HI, ITEMS, PIECES, STEALS, BUSY_NS, RUNNING = range(9)
# RUNNING: 1 + the task a worker serving tasks runs now (0: none), so that its death fails
# that task alone: those of its piece before it ran, those after it did not start.


def control_size(nslots: int) -> int:
    """Bytes needed for a control block of ``nslots`` worker slots."""
    return 8 * (HEADER + SLOT * nslots)


class ControlBlock:
    """Typed access to a control block mapped in this process.

    Args:
        buf: a writable buffer of at least ``control_size(nslots)`` bytes.
        fd: the segment's file descriptor, used for the record locks; -1 for none (one
            process, tests).
        nslots: number of worker slots.
    """

    def __init__(self, buf, fd: int, nslots: int):
        self.words = memoryview(buf).cast("B").cast("q")
        self.fd = fd
        self.nslots = nslots

    # -- locks ---------------------------------------------------------------------------
    def _lock(self, k: int) -> None:
        if self.fd >= 0:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, k)

    def _unlock(self, k: int) -> None:
        if self.fd >= 0:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, k)

    # -- fields --------------------------------------------------------------------------
    def get(self, k: int, field: int) -> int:
        return self.words[HEADER + SLOT * k + field]

    def set(self, k: int, field: int, value: int) -> None:
        self.words[HEADER + SLOT * k + field] = value

    @property
    def aborted(self) -> bool:
        return self.words[ABORT] != 0

    def abort(self) -> None:
        self.words[ABORT] = 1

    # -- parent side ---------------------------------------------------------------------
    def start_job(self, ranges: list[tuple[int, int]]) -> None:
        """Clear the block and give slot k the range ``ranges[k]`` (workers must be idle)."""
        w = self.words
        w[ABORT] = 0
        for k in range(self.nslots):
            base = HEADER + SLOT * k
            lo, hi = ranges[k] if k < len(ranges) else (0, 0)
            w[base + LO], w[base + HI] = lo, hi
            w[base + CUR_LO] = w[base + CUR_HI] = w[base + RUNNING] = 0
            w[base + ITEMS] = w[base + PIECES] = w[base + STEALS] = w[base + BUSY_NS] = 0

    def unfinished(self, k: int) -> list[tuple[int, int]]:
        """Ranges slot k holds but did not finish (read only once its worker is dead and the
        others are idle): the piece it was running and the rest of its range."""
        out = []
        lo, hi = self.get(k, CUR_LO), self.get(k, CUR_HI)
        if lo < hi:
            out.append((lo, hi))
        lo, hi = self.get(k, LO), self.get(k, HI)
        if lo < hi:
            out.append((lo, hi))
        return out

    def slot_stats(self, k: int) -> tuple[int, int, int, int]:
        """(items, pieces, steals, busy_ns) of slot k for the last job."""
        base = HEADER + SLOT * k
        w = self.words
        return w[base + ITEMS], w[base + PIECES], w[base + STEALS], w[base + BUSY_NS]

    # -- worker side ---------------------------------------------------------------------
    def left(self, me: int) -> int:
        """Items left in worker ``me``'s own range (read without the lock: a hint)."""
        base = HEADER + SLOT * me
        return max(0, self.words[base + HI] - self.words[base + LO])

    def take(self, me: int, grain: int, solo: bool = False) -> tuple[int, int] | None:
        """Take the next piece for worker ``me``: from its own range, else by stealing.

        Returns ``(lo, hi)`` or None when no work is left anywhere (or the job was aborted).
        ``solo``: no other worker is in this job, so nothing needs a lock or can be stolen.
        """
        w = self.words
        base = HEADER + SLOT * me
        if solo:
            lo, hi = w[base + LO], w[base + HI]
            if lo >= hi or w[ABORT]:
                return None
            end = min(hi, lo + grain)
            w[base + CUR_LO], w[base + CUR_HI] = lo, end
            w[base + LO] = end
            return lo, end
        while True:
            if w[ABORT]:
                return None
            self._lock(me)
            lo, hi = w[base + LO], w[base + HI]
            if lo < hi:
                end = min(hi, lo + grain)
                # Record the piece before leaving the range: a kill in between duplicates
                # the piece in the parent's view, never loses it.
                w[base + CUR_LO], w[base + CUR_HI] = lo, end
                w[base + LO] = end
                self._unlock(me)
                return lo, end
            self._unlock(me)
            if not self._steal(me):
                return None

    def give_back(self, me: int, lo: int, hi: int) -> bool:
        """Return the unstarted end ``[lo, hi)`` of worker ``me``'s current piece to its
        range (which must start at ``hi`` or be empty). False if it could not."""
        w = self.words
        base = HEADER + SLOT * me
        self._lock(me)
        try:
            a, b = w[base + LO], w[base + HI]
            if a >= b:
                w[base + HI] = hi
            elif a != hi:
                return False
            w[base + LO] = lo
            w[base + CUR_HI] = lo
            return True
        finally:
            self._unlock(me)

    def has_work(self) -> bool:
        """True if any range holds items (an unlocked look: a hint, not a promise)."""
        w = self.words
        for k in range(self.nslots):
            b = HEADER + SLOT * k
            if w[b + HI] > w[b + LO]:
                return True
        return False

    def clear_current(self, me: int) -> None:
        """Forget worker ``me``'s piece in progress (a piece of tasks: their statistics travel
        with their results, and counting them here could land in the next job's counters
        after the parent saw this worker idle)."""
        base = HEADER + SLOT * me
        self.words[base + CUR_LO] = self.words[base + CUR_HI] = self.words[base + RUNNING] = 0

    def done_piece(self, me: int, lo: int, hi: int, busy_ns: int) -> None:
        """Count a finished piece in worker ``me``'s slot."""
        w = self.words
        base = HEADER + SLOT * me
        w[base + CUR_LO] = w[base + CUR_HI] = 0
        w[base + ITEMS] += hi - lo
        w[base + PIECES] += 1
        w[base + BUSY_NS] += busy_ns

    def _steal(self, me: int) -> bool:
        """Move the upper half of the fullest other range into ``me``'s (empty) range."""
        w = self.words
        n = self.nslots
        while True:
            victim, best = -1, 0
            for k in range(n):
                if k != me:
                    b = HEADER + SLOT * k
                    size = w[b + HI] - w[b + LO]
                    if size > best:
                        victim, best = k, size
            if victim < 0:
                return False
            first, second = (me, victim) if me < victim else (victim, me)
            self._lock(first)
            self._lock(second)
            try:
                mb = HEADER + SLOT * me
                if w[mb + HI] > w[mb + LO]:
                    return True  # the parent gave us tasks meanwhile: take those instead
                vb = HEADER + SLOT * victim
                lo, hi = w[vb + LO], w[vb + HI]
                if lo >= hi:
                    continue  # someone got there first: look again
                mid = lo + (hi - lo) // 2
                # Our slot first, then the victim's: a kill in between duplicates, never loses.
                w[mb + LO], w[mb + HI] = mid, hi
                w[vb + HI] = mid
                w[mb + STEALS] += 1
                return True
            finally:
                self._unlock(second)
                self._unlock(first)


def initial_ranges(n: int, start: int, workers: int) -> list[tuple[int, int]]:
    """Split ``[start, n)`` into ``workers`` contiguous shares, as equal as can be."""
    total = max(n - start, 0)
    out = []
    for k in range(workers):
        lo = start + total * k // workers
        hi = start + total * (k + 1) // workers
        out.append((lo, hi))
    return out


def now_ns() -> int:
    return time.perf_counter_ns()
