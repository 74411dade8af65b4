"""Shared-memory segments: the only module that creates, attaches and unlinks them.

Ownership
    The process that creates a segment owns it and alone unlinks it: when ``release()`` is
    called, when the last array or view of it is garbage collected, or at interpreter exit.
    The owner registers the segment with ``multiprocessing``'s resource tracker, a separate
    process that unlinks what is still registered if the owner dies, even by SIGKILL.

Attaching
    Other processes attach by name, once, and cache the mapping. Attaching never registers
    with the resource tracker: CPython 3.11's ``SharedMemory(name)`` does, and the tracker
    then unlinks the segment when the *attaching* process exits (CPython gh-82300), so
    segments are opened here with ``_posixshmem`` directly.

Handles
    ``SharedArray`` (any view of a segment) pickles as a small handle: segment name, byte
    offset, shape, strides, dtype and writeability. Unpickling maps the same memory.

Recycling
    A segment a pool's ``map`` made for itself (its output, a shared copy of a plain input)
    goes to that pool's ``Recycler`` when its last view dies, instead of being unlinked: the
    pool's next map takes it, already mapped and its pages touched here and in the workers
    (creating, faulting in and unlinking 8 MB cost ~5 ms; a map of it ~1 ms). A segment whose
    handle was ever pickled (a task's argument, a queue) is unlinked as usual: whoever got the
    handle may still map it. Closing the pool unlinks what it keeps.

Names are ``parrun_<pid>_<96 random bits>`` (a worker's with its pool's 32-bit tag before
the random bits) and segments are created with mode 0600.
"""

from __future__ import annotations

import _posixshmem
import _thread
import bisect
import ctypes
import importlib
import io
import math
import mmap
import operator
import os
import pickle
import re
import secrets
import signal
import sys
import threading
import time
import types
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from multiprocessing import resource_tracker
from typing import Any, Literal

import cloudpickle
import numpy as np

from ._errors import SharedMemoryError

PREFIX = "parrun_"
_SHM_DIR = "/dev/shm"

_lock = threading.RLock()
# name -> _Segment for segments this process created and still owns.
_owned: dict[str, _Segment] = {}
# name -> whole-segment uint8 array for segments this process attached (worker side cache).
_attached: dict[str, np.ndarray] = {}
# Sorted start addresses and the matching (end, name, size) of every mapped segment, owned
# or attached, so that any array can be traced back to the segment that holds it.
_starts: list[int] = []
_spans: list[tuple[int, str, int]] = []
# name -> (start, end) of segments released (``.release()``) while still mapped here: an array
# in one can no longer be sent to a worker (it went by value, its writes lost, unseen).
_released: dict[str, tuple[int, int]] = {}

# At exit, segments still alive are released by their weakref.finalize, whose atexit hook is
# registered with the first finalizer made. Made now, before the pools' and executors' own
# hooks: atexit runs the last registered first, so tasks finish and pools close while their
# segments are still there (a segment released first once failed the tasks still pending).
weakref.finalize(np.empty(0), lambda: None)  # (runs, a no-op, as the array goes)


class ReleaseLog:
    """Names of segments released since the subscriber (a pool) last drained the log; the
    pool tells its workers to drop their mappings of them."""

    def __init__(self) -> None:
        self._names: list[str] = []
        with _lock:
            _subscribers.add(self)

    def drain(self) -> tuple[str, ...]:
        with _lock:
            names, self._names = tuple(self._names), []
        return names


_subscribers: weakref.WeakSet[ReleaseLog] = weakref.WeakSet()


# A worker's segment names carry a tag its pool chose, so that the pool can tell them from
# any other process's when the worker dies (see unlink_orphans).
_name_tag = ""


def set_name_tag(tag: str) -> None:
    global _name_tag
    _name_tag = tag


def name_prefix(pid: int, tag: str = "") -> str:
    """How the names of the segments process ``pid`` (with ``tag``) makes begin."""
    return f"{PREFIX}{pid}_{tag}"


_TOKEN_HEX = 24  # hex digits of a name's random part (96 bits)


def _new_name() -> str:
    return f"{name_prefix(os.getpid(), _name_tag)}{secrets.token_hex(_TOKEN_HEX // 2)}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _shm_space() -> str:
    try:
        st = os.statvfs(_SHM_DIR)
    except OSError:
        return "its free space is unknown"
    return (f"{_fmt_bytes(st.f_bavail * st.f_frsize)} free of "
            f"{_fmt_bytes(st.f_blocks * st.f_frsize)}")


def _index_add(start: int, size: int, name: str) -> None:
    i = bisect.bisect_left(_starts, start)
    _starts.insert(i, start)
    _spans.insert(i, (start + size, name, size))


def _index_remove(name: str) -> None:
    for i, (_, n, _) in enumerate(_spans):
        if n == name:
            del _starts[i]
            del _spans[i]
            return


class _Mapping:
    """A shared mapping of a segment that holds no file descriptor: unmapped when the last
    array over it dies.

    ``mmap.mmap`` keeps a duplicate of the descriptor for as long as the mapping lives (until
    Python 3.13's ``trackfd``), so every live shared array, every task's big argument and
    every segment a worker had mapped held one: about 1,000 of them hit the usual limit of
    1,024 open files (``OSError: Too many open files``). libc's mmap, through ctypes, does not.
    """

    __slots__ = ("__array_interface__", "__weakref__", "addr", "size")

    def __init__(self, fd: int, size: int) -> None:
        assert _libc is not None
        addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.addr, self.size = addr, size
        self.__array_interface__ = {"shape": (size,), "typestr": "|u1", "version": 3,
                                    "data": (addr, False)}

    def __del__(self) -> None:
        try:
            _libc.munmap(self.addr, self.size)  # type: ignore[union-attr]
        except KeyboardInterrupt:  # (raised as munmap returned: the mapping is gone)
            _interrupt_later()
        except Exception:  # pragma: no cover - interpreter teardown
            pass


_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int, ctypes.c_int64]
    _libc.munmap.restype = ctypes.c_int
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _MAP_FAILED = ctypes.c_void_p(-1).value
except (OSError, AttributeError):  # pragma: no cover - no libc mmap: mmap.mmap it is
    _libc = None


def _map(fd: int, size: int) -> np.ndarray:
    """A writable uint8 array over the first ``size`` bytes of segment ``fd`` (shared). The
    caller may close ``fd`` at once."""
    if _libc is None:  # pragma: no cover
        return np.frombuffer(mmap.mmap(fd, size), dtype=np.uint8)
    return np.asarray(_Mapping(fd, size))


def _create_fd(nbytes: int) -> tuple[str, int, int]:
    """shm_open a new segment (exclusive, mode 0600) and reserve its pages; (name, fd, size)."""
    name = _new_name()
    size = max(int(nbytes), 1)  # mmap refuses a length of 0
    if not _tracker_checked:
        _tracker_apart()
    # Tell the resource tracker first: a process killed at any instant after shm_open then
    # leaves nothing behind (the tracker ignores a name that was never created). Registering
    # after shm_open leaked the segment when SIGKILL came in between.
    resource_tracker.register("/" + name, "shared_memory")
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    except OSError:  # nothing made (the name is ours: 96 random bits)
        resource_tracker.unregister("/" + name, "shared_memory")
        raise
    except BaseException:
        # Ctrl-C (a signal's exception) as shm_open returned: the segment may exist, with
        # no one left to unlink it once unregistered (it outlived the process).
        try:
            _posixshmem.shm_unlink("/" + name)
        except OSError:
            pass
        resource_tracker.unregister("/" + name, "shared_memory")
        raise
    try:
        # Reserve the pages now: tmpfs would otherwise accept the size and SIGBUS the first
        # process that touches a page it has no room for.
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:  # pragma: no cover - macOS
            os.ftruncate(fd, size)
    except OSError as e:
        os.close(fd)
        _unlink(name)
        raise SharedMemoryError(
            f"cannot create a shared array of {_fmt_bytes(size)} in {_SHM_DIR}: {e.strerror}; "
            f"{_SHM_DIR} has {_shm_space()}. Free space there (leaked segments are files "
            f"named {PREFIX}*) or enlarge it.") from e
    except BaseException:
        os.close(fd)
        _unlink(name)
        raise
    return name, fd, size


_tracker_checked = False
_tracker_lock = threading.Lock()


def _tracker_apart() -> None:
    """Start multiprocessing's resource tracker, the process that unlinks this process's
    segments if it dies, in a session of its own, unless one runs already.

    Started by multiprocessing, it shares the process group of the program, and dies with
    it when the group is signalled: a terminal hanging up (SIGHUP, which it does not ignore)
    or ``kill -9 -PGID`` left every segment in /dev/shm until reboot. The same tracker,
    started as multiprocessing would start it, but with ``setsid``; multiprocessing then
    finds it running and uses it. It still ends once this process (and every child holding
    its pipe) is gone, after unlinking what they left. One that multiprocessing started
    before (for a stdlib ``SharedMemory``, a lock of a spawn context) is used as it is."""
    global _tracker_checked
    with _tracker_lock:
        if _tracker_checked:
            return
        _tracker_checked = True
    rt = getattr(resource_tracker, "_resource_tracker", None)
    if rt is None or not all(hasattr(rt, a) for a in ("_lock", "_fd", "_pid")):
        return  # pragma: no cover - another multiprocessing: its own tracker, as before
    from multiprocessing import spawn, util

    with rt._lock:
        if rt._fd is not None or rt._pid is not None:  # running (or inherited): leave it
            return
        r, w = os.pipe()
        try:
            exe = spawn.get_executable()
            args = [exe, *util._args_from_interpreter_flags(),  # type: ignore[attr-defined]
                    "-c", f"from multiprocessing.resource_tracker import main;main({r})"]
            os.set_inheritable(r, True)
            # (posix_spawn, not subprocess: a Popen kept for ever warns at exit that its
            # process still runs.) SIGINT and SIGTERM blocked until it ignores them, as
            # multiprocessing starts it; stdin and stdout on /dev/null, stderr ours.
            pid = os.posix_spawn(exe, args, os.environ, setsid=True,
                                 setsigmask={signal.SIGINT, signal.SIGTERM},
                                 file_actions=[
                                     (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                     (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
        except Exception:  # pragma: no cover - multiprocessing starts one as before
            os.close(w)
            return
        finally:
            os.close(r)
        rt._fd, rt._pid = w, pid


class _Segment:
    """One segment this process owns: it alone unlinks it."""

    __slots__ = ("fd", "mapping", "name", "owner_pid", "raw_first", "raw_ref", "recycler",
                 "size", "start")

    def __init__(self, name: str, fd: int, size: int, keep_fd: bool = False,
                 recycler: Recycler | None = None):
        self.name = name
        self.size = size
        self.owner_pid = os.getpid()
        try:
            raw = _map(fd, size)
        except BaseException:
            os.close(fd)
            _unlink(name)
            raise
        if keep_fd:
            self.fd = fd
        else:
            os.close(fd)
            self.fd = -1
        self.start = raw.__array_interface__["data"][0]
        # The pool that takes the segment back when its last view dies, and the mapping it
        # then keeps (otherwise the mapping lives exactly as long as the views of it).
        self.recycler = None if recycler is None else weakref.ref(recycler)
        self.mapping: Any = None if recycler is None else raw.base
        with _lock:
            _owned[name] = self
            _index_add(self.start, size, name)
        self._watch(raw)

    def _watch(self, raw: np.ndarray) -> None:
        """``raw`` is the segment's whole-memory array, the base of every view of it: unlink
        the segment (or recycle it) when it dies, or at interpreter exit."""
        self.raw_ref = weakref.ref(raw)
        weakref.finalize(raw, _raw_gone, self.name)
        self.raw_first: np.ndarray | None = raw  # handed to the creator by take_raw()

    def never_recycle(self) -> None:
        """Unlink it when its last view dies, as a segment no pool made (see Recycling)."""
        self.recycler = None
        self.mapping = None

    @classmethod
    def new(cls, nbytes: int, keep_fd: bool = False,
            recycler: Recycler | None = None) -> _Segment:
        try:
            made = _create_fd(nbytes)
        except SharedMemoryError:  # no room in /dev/shm: free what the pools keep, once
            if not _clear_recyclers():
                raise
            made = _create_fd(nbytes)
        return cls(*made, keep_fd=keep_fd, recycler=recycler)

    @classmethod
    def adopt(cls, name: str) -> _Segment:
        """Take ownership of a segment another process created for us (see create_detached)."""
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        except FileNotFoundError:
            raise SharedMemoryError(f"shared segment {name!r} handed over by a worker no "
                                    "longer exists") from None
        # Ours now. (The worker registered it with the same tracker, which keeps a set.)
        resource_tracker.register("/" + name, "shared_memory")
        return cls(name, fd, os.fstat(fd).st_size)

    def take_raw(self) -> np.ndarray:
        raw, self.raw_first = self.raw_first, None
        assert raw is not None
        return raw


def _unlink(name: str) -> None:
    """Remove segment ``name`` from /dev/shm and from the resource tracker (idempotent)."""
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        # Unlinked (and unregistered) by another process: unregistering it again made the
        # resource tracker print a KeyError traceback.
        return
    try:
        resource_tracker.unregister("/" + name, "shared_memory")
    except Exception:  # pragma: no cover - tracker already gone at interpreter exit
        pass


def _raw_gone(name: str) -> None:
    """The last view of an owned segment died: recycle it or unlink it, and forget it was
    released (a finalizer: see ``_interrupt_later``)."""
    try:
        if not _recycle(name):
            _release_name(name)
        with _lock:
            _released.pop(name, None)
    except KeyboardInterrupt:
        _interrupt_later()


def _recycle(name: str) -> bool:
    """Hand an owned segment with no view left to its pool's recycler; False if it has
    none (or it is closed, or full)."""
    with _lock:
        seg = _owned.get(name)
        if seg is None or seg.recycler is None or seg.owner_pid != os.getpid():
            return False
        rec = seg.recycler()
        if rec is None:
            return False
        evicted = rec._keep(seg)
        if evicted is None:
            return False
        del _owned[name]
        _index_remove(name)
    for old in evicted:
        _drop(old)
    return True


def _drop(seg: _Segment, free_pages: bool = False) -> None:
    """Unlink a segment a recycler kept (it is in no index) and let it be unmapped; the
    pools tell their workers to unmap it too, at their next job. With ``free_pages``, its
    pages go now: tmpfs keeps them while any process maps it, and the workers do until then
    (no one touches a kept segment's pages, so none of them can fault on it)."""
    try:
        with _lock:
            for log in _subscribers:
                log._names.append(seg.name)
        seg.mapping = None
        if free_pages:
            try:
                fd = _posixshmem.shm_open("/" + seg.name, os.O_RDWR, mode=0o600)
            except OSError:
                pass
            else:
                try:
                    os.ftruncate(fd, 0)
                finally:
                    os.close(fd)
    finally:
        _unlink(seg.name)


class Recycler:
    """A pool's store of segments its maps made and no longer use (see Recycling above),
    at most ``limit`` bytes in all, the least recently kept dropped first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free: OrderedDict[str, _Segment] = OrderedDict()
        self._bytes = 0
        self._open = True
        self._pid = os.getpid()
        with _lock:
            _recyclers.add(self)

    @property
    def names(self) -> set[str]:
        """The segments kept now (they hold /dev/shm space until taken or closed)."""
        with _lock:
            return set(self._free)

    def _keep(self, seg: _Segment) -> list[_Segment] | None:
        """Under ``_lock``: keep ``seg``, returning the segments to drop to make room, or
        None to refuse it (closed, too big, or /dev/shm short of room: a worker's big
        result, made there, could not free what is kept here)."""
        if (not self._open or self._pid != os.getpid() or _pages(seg.size) > self.limit
                or _shm_short()):
            return None
        self._free[seg.name] = seg
        self._bytes += _pages(seg.size)
        evicted = []
        while self._bytes > self.limit or len(self._free) > RECYCLE_MAX_SEGMENTS:
            _, old = self._free.popitem(last=False)
            self._bytes -= _pages(old.size)
            evicted.append(old)
        return evicted

    def take(self, nbytes: int) -> tuple[_Segment, np.ndarray] | None:
        """A kept segment of at least ``nbytes`` (at most twice that, or 64 KiB) with a new
        whole-memory array over it, owned again; None if none fits."""
        with _lock:
            if not self._free or self._pid != os.getpid():
                return None
            cap = max(2 * nbytes, RECYCLE_SLACK_BYTES)
            fits = [g for g in self._free.values() if nbytes <= g.size <= cap]
            if not fits:
                return None
            seg = min(fits, key=lambda g: g.size)
            try:
                del self._free[seg.name]
                self._bytes -= _pages(seg.size)
                raw = (np.asarray(seg.mapping) if _libc is not None
                       else np.frombuffer(seg.mapping, dtype=np.uint8))  # pragma: no cover
                _owned[seg.name] = seg
                _index_add(seg.start, seg.size, seg.name)
                seg._watch(raw)
            except BaseException:
                # (Ctrl-C, say) out of the store and not handed out: in neither table,
                # nothing would unlink it until the process exits
                self._bytes = sum(_pages(g.size) for g in self._free.values())
                if seg.name not in self._free:
                    if _owned.get(seg.name) is seg:
                        del _owned[seg.name]
                        _index_remove(seg.name)
                    _drop(seg)
                raise
        return seg, seg.take_raw()

    def clear(self, free_pages: bool = False) -> None:
        """Unlink every kept segment (``free_pages``: see ``_drop``); in a child of
        ``os.fork()``, nothing (they are the parent's)."""
        with _lock:
            if self._pid != os.getpid():
                return
            segs = list(self._free.values())
            self._free.clear()
            self._bytes = 0
        for seg in segs:
            _drop(seg, free_pages)

    def close(self) -> None:
        """Keep nothing more, and unlink what is kept. Idempotent."""
        self._open = False
        self.clear()

    def _forget_in_child(self) -> None:
        """In a child of ``os.fork()``: drop the inherited mappings of what the parent keeps
        (they held its /dev/shm space for as long as the child lived), unlinking nothing."""
        for seg in self._free.values():
            seg.mapping = None
        self._free.clear()
        self._bytes = 0


_recyclers: weakref.WeakSet[Recycler] = weakref.WeakSet()


def _clear_recyclers() -> bool:
    """/dev/shm is full: unlink every segment the pools of this process keep, their pages
    freed now; False if they kept none."""
    with _lock:
        recs = [r for r in _recyclers if r._free and r._pid == os.getpid()]
    for rec in recs:
        rec.clear(free_pages=True)
    return bool(recs)


def _before_fork() -> None:
    """A child of ``os.fork()`` inherits every array alive now, outside any pickle: such a
    segment is never recycled (the next map would write over what the child reads)."""
    with _lock:
        for seg in _owned.values():
            seg.never_recycle()


def _after_fork_in_child() -> None:
    for rec in list(_recyclers):
        rec._forget_in_child()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)

# A kept segment may be up to twice the size asked for, or this many bytes.
RECYCLE_SLACK_BYTES = 64 << 10
# At most this many kept segments a pool (each is a mapping here and in every worker).
RECYCLE_MAX_SEGMENTS = 64
_PAGE = mmap.PAGESIZE


def _pages(size: int) -> int:
    """The /dev/shm space a segment of ``size`` bytes takes: whole pages."""
    return -(-size // _PAGE) * _PAGE


def _shm_short() -> bool:
    """Less than a quarter of /dev/shm is free."""
    try:
        st = os.statvfs(_SHM_DIR)
    except OSError:  # pragma: no cover - no /dev/shm to look at
        return False
    return st.f_bavail < st.f_blocks // 4


def recycle_limit() -> int:
    """Bytes a pool keeps for its next maps: an eighth of /dev/shm, at most 1 GiB."""
    try:
        st = os.statvfs(_SHM_DIR)
        room = st.f_blocks * st.f_frsize
    except OSError:  # pragma: no cover - no /dev/shm to look at
        room = 1 << 30
    return min(1 << 30, room // 8)


def _interrupt_later() -> None:
    """Ctrl-C's ``KeyboardInterrupt`` raised in a finalizer (where Python only prints
    "Exception ignored"): raise it again in the main thread once the finalizer is done, as
    though the signal came a moment later. Swallowed, it let a loop of maps run on."""
    def again() -> None:
        time.sleep(INTERRUPT_AGAIN_S)
        if callable(signal.getsignal(signal.SIGINT)):
            # A real SIGINT, to the main thread: it also cuts short a blocking call there
            # (interrupt_main only sets the flag that a sleep, say, checks when it ends).
            signal.pthread_kill(threading.main_thread().ident,  # type: ignore[arg-type]
                                signal.SIGINT)
        else:  # pragma: no cover - no Python handler: as interrupt_main decides
            _thread.interrupt_main()

    try:
        _thread.start_new_thread(again, ())
    except Exception:  # pragma: no cover - interpreter teardown
        pass


# Seconds after a finalizer caught Ctrl-C that it is raised again (the finalizer has ended).
INTERRUPT_AGAIN_S = 0.002


def _release_name(name: str) -> None:
    """Unlink an owned segment (idempotent); the memory goes when its last mapping does."""
    seg = None
    try:
        with _lock:
            seg = _owned.pop(name, None)
            if seg is None:
                return
            _index_remove(name)
            if seg.raw_ref() is not None:  # released while views of it live: remember where
                _released[name] = (seg.start, seg.start + seg.size)
            if seg.owner_pid != os.getpid():  # inherited through fork: not ours to unlink
                seg = None
                return
            for log in _subscribers:
                log._names.append(name)
        if seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1
    finally:
        # Also when Ctrl-C lands in between: out of _owned, nothing else would unlink it
        # (until the process exits).
        if seg is not None:
            _unlink(name)


def unlink_orphans(prefix: str) -> int:
    """Unlink the segments whose names begin with ``prefix`` (a dead worker's: see
    ``name_prefix``) that this process does not hold (a result the worker was still
    pickling when it died, say); return how many."""
    try:
        names = [n for n in os.listdir(_SHM_DIR) if n.startswith(prefix)]
    except OSError:  # pragma: no cover - no /dev/shm to look at
        return 0
    with _lock:
        names = [n for n in names if n not in _owned and n not in _attached]
    for name in names:
        _unlink(name)
    return len(names)


def unlink_unadopted(payload: bytes, prefix: str) -> int:
    """Unlink the segments named in a worker's result ``payload`` that were made for this
    process to adopt (names beginning with the worker's ``prefix``) and are not held here:
    a result that was never unpickled (a duplicate, or one that failed to unpickle) would
    leave them until the pool closes. Return how many."""
    pattern = re.escape(prefix.encode()) + rb"[0-9a-f]{%d}" % _TOKEN_HEX
    names = {m.decode() for m in re.findall(pattern, payload)}
    with _lock:
        names = {n for n in names if n not in _owned and n not in _attached}
    for name in names:
        _unlink(name)
    return len(names)


def create_segment(nbytes: int, keep_fd: bool = False) -> tuple[_Segment, np.ndarray]:
    """Create an owned segment; return it and a uint8 array over all of it."""
    seg = _Segment.new(nbytes, keep_fd=keep_fd)
    return seg, seg.take_raw()


def create_detached(nbytes: int) -> tuple[str, np.ndarray]:
    """Create a segment for another process to adopt (a worker's large result).

    It is registered with the resource tracker (shared with the parent), so it is unlinked if
    nobody adopts it before the parent exits, but this process never unlinks it.
    """
    name, fd, size = _create_fd(nbytes)  # registered with the tracker there
    try:
        return name, _map(fd, size)
    finally:
        os.close(fd)


def adopt(handle: tuple) -> SharedArray:
    """Rebuild a worker's result array in the parent, which becomes the segment's owner."""
    seg = _Segment.adopt(handle[0])
    raw = seg.take_raw()
    _name, offset, shape, strides, dtype, _w = handle
    return np.ndarray(shape, dtype, buffer=raw, offset=offset,
                      strides=strides).view(SharedArray)


def from_handle_transient(handle: tuple) -> np.ndarray:
    """Map the array a handle describes without caching the mapping: it goes away with the
    array (used for a task's temporary arguments)."""
    name, offset, shape, strides, dtype, writeable = handle
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    except FileNotFoundError:
        raise SharedMemoryError(f"shared segment {name!r} no longer exists") from None
    try:
        raw = _map(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    arr = np.ndarray(shape, dtype, buffer=raw, offset=offset, strides=strides)
    if not writeable:
        arr.flags.writeable = False
    return arr


def release_segment(name: str) -> None:
    """Unlink an owned segment now (idempotent)."""
    _release_name(name)


def attach(name: str) -> np.ndarray:
    """Map a segment by name, once per process; return a uint8 array over all of it."""
    with _lock:
        seg = _owned.get(name)
        if seg is not None:
            raw = seg.raw_ref()
            if raw is not None:
                return raw
        raw = _attached.get(name)
        if raw is not None:
            return raw
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    except FileNotFoundError:
        raise SharedMemoryError(
            f"shared segment {name!r} no longer exists: the array was released, or the "
            "process that owned it exited") from None
    try:
        size = os.fstat(fd).st_size
        raw = _map(fd, size)
    finally:
        os.close(fd)
    with _lock:
        _attached[name] = raw
        _index_add(raw.__array_interface__["data"][0], size, name)
    return raw


def forget(names: Iterable[str]) -> None:
    """Drop cached attachments (their memory is freed once no view of them is left)."""
    with _lock:
        for name in names:
            if _attached.pop(name, None) is not None:
                _index_remove(name)


def open_control(name: str) -> tuple[int, mmap.mmap]:
    """Open a segment for a pool's control block: keep the fd (for record locks), map it."""
    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    return fd, mmap.mmap(fd, os.fstat(fd).st_size)


def _bounds(arr: np.ndarray) -> tuple[int, int, int]:
    """(data pointer, lowest byte, one past the highest byte) of ``arr``'s memory."""
    ptr = arr.__array_interface__["data"][0]
    if arr.flags.contiguous or arr.flags.f_contiguous or arr.size == 0:
        return ptr, ptr, ptr + arr.nbytes
    lo = hi = ptr
    for n, st in zip(arr.shape, arr.strides):
        if st < 0:
            lo += (n - 1) * st
        else:
            hi += (n - 1) * st
    return ptr, lo, hi + arr.itemsize


def locate(arr: np.ndarray) -> tuple[str, int, int] | None:
    """Return (segment name, segment size, offset of ``arr``'s data) if it lies in one."""
    if not _starts:
        return None
    ptr, lo, hi = _bounds(arr)
    with _lock:
        i = bisect.bisect_right(_starts, lo) - 1
        if i < 0:
            return None
        end, name, size = _spans[i]
        start = _starts[i]
    if hi > end:
        return None
    return name, size, ptr - start


class ReleasedArrayError(ValueError):
    """An array whose segment was released was sent to the workers (see
    ``check_not_released``): the caller's mistake, said as such wherever it is sent."""


def check_not_released(arr: np.ndarray) -> None:
    """ValueError if ``arr`` lies in a segment this process released while it still maps
    it: sent to a worker, it would go as a copy (what the worker writes, lost)."""
    if not _released:
        return
    _ptr, lo, hi = _bounds(arr)
    with _lock:
        spans = list(_released.items())
    for name, (start, end) in spans:
        if start <= lo and hi <= end:
            raise ReleasedArrayError(
                f"this array's shared segment {name!r} was released (.release()): it can no "
                "longer go to the workers; make a new shared array (parrun.asshared) or pass "
                "a copy (np.array(a))")


def _escaped(name: str) -> None:
    """A handle of segment ``name`` was pickled: whoever gets it may map the segment at any
    time, so it is never recycled (see Recycling)."""
    seg = _owned.get(name)
    if seg is not None:
        seg.never_recycle()


def handle_of(arr: np.ndarray) -> tuple | None:
    """The handle (a plain tuple) of an array that lives in shared memory, else None."""
    loc = locate(arr)
    if loc is None:
        return None
    name, _size, offset = loc
    return (name, offset, arr.shape, arr.strides, arr.dtype, bool(arr.flags.writeable))


def from_handle(handle: tuple) -> SharedArray:
    """Map the array a handle describes (attaching its segment once per process)."""
    name, offset, shape, strides, dtype, writeable = handle
    raw = attach(name)
    arr = np.ndarray(shape, dtype, buffer=raw, offset=offset, strides=strides)
    shared = arr.view(SharedArray)
    if not writeable:
        shared.flags.writeable = False
    return shared


def _check_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(f"dtype {dt} holds Python objects, which cannot live in shared memory; "
                        "use a numeric, bool, string or structured dtype without objects")
    return dt


class SharedArray(np.ndarray):
    """A NumPy array whose memory is a shared-memory segment.

    Behaves as an ``np.ndarray``; views and slices stay ``SharedArray``. Pickling (pickle,
    cloudpickle) sends a small handle, never the bytes; another process that unpickles it maps
    the same memory. Results of arithmetic on it are ordinary arrays.
    """

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        if return_scalar:
            return arr[()]
        # This runs on every ufunc and matmul with a shared operand: keep it cheap. An ``out=``
        # that is shared comes back as itself (the lookup cost ~6 us a call, 25% of a map
        # of a 6-ufunc chain over 64K-element tiles); a result that owns its memory is a
        # fresh allocation, never a segment.
        if type(arr) is SharedArray:
            return arr
        if arr.flags.owndata or locate(arr) is None:
            return arr.view(np.ndarray)
        return arr.view(SharedArray)

    def __reduce_ex__(self, protocol):
        handle = handle_of(self)
        if handle is None:
            check_not_released(self)
            return np.asarray(self).__reduce_ex__(protocol)
        _escaped(handle[0])
        return from_handle, (handle,)

    def __reduce__(self):
        return self.__reduce_ex__(2)

    @property
    def segment(self) -> str | None:
        """The name of the segment holding this array, or None if it is not shared."""
        loc = locate(self)
        return None if loc is None else loc[0]

    def release(self) -> None:
        """Free the segment now (this array, and every other view of it, must not be used
        across processes after this). Idempotent; only the owning process may release."""
        loc = locate(self)
        base = self.base
        while loc is None and self.size == 0 and isinstance(base, np.ndarray):
            # An empty view may point past its segment (a[::-1] of shape (5, 0)): find the
            # segment through the arrays it views. (It was silently left in place.)
            loc, base = locate(base), base.base
        if loc is None:
            return
        with _lock:
            owned = loc[0] in _owned
        if not owned:
            raise ValueError(f"segment {loc[0]!r} is owned by another process; only its "
                             "creator can release it")
        _release_name(loc[0])

    def __enter__(self) -> SharedArray:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _dims(shape: Any) -> tuple[int, ...]:
    """``shape`` as a tuple of ints; as NumPy, an int or a sequence of ints (2.5 is not a
    length)."""
    try:
        return (operator.index(shape),)
    except TypeError:
        pass
    try:
        return tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None


def _nbytes(shape: tuple[int, ...], dt: np.dtype) -> int:
    nbytes = math.prod(shape) * dt.itemsize  # Python ints: np.prod wraps around at 2**63
    if nbytes > sys.maxsize:
        raise ValueError(f"a shared array of shape {shape} and dtype {dt} would take "
                         f"{_fmt_bytes(nbytes)}, more than any process can map")
    return nbytes


def empty(shape: int | tuple[int, ...], dtype: Any = np.float64,
          order: Literal["C", "F"] = "C") -> SharedArray:
    """A new shared array of ``shape`` and ``dtype``. Its memory reads as zeros.

    Raises:
        TypeError: for an object dtype.
        SharedMemoryError: when ``/dev/shm`` has no room (the message gives the sizes).
    """
    dt = _check_dtype(dtype)
    shape = _dims(shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimensions are not allowed: shape {shape}")
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', got {order!r}")
    _seg, raw = create_segment(_nbytes(shape, dt))
    arr = np.ndarray(shape, dt, buffer=raw, order=order)
    return arr.view(SharedArray)


def zeros(shape: int | tuple[int, ...], dtype: Any = np.float64,
          order: Literal["C", "F"] = "C") -> SharedArray:
    """A new shared array filled with zeros (fresh segments are zeroed by the kernel)."""
    return empty(shape, dtype, order)


def full(shape: int | tuple[int, ...], fill_value: Any, dtype: Any = None,
         order: Literal["C", "F"] = "C") -> SharedArray:
    """A new shared array filled with ``fill_value``."""
    fill = np.asarray(fill_value)
    arr = empty(shape, fill.dtype if dtype is None else dtype, order)
    arr[...] = fill  # broadcast, as np.full does (fill() takes a scalar only)
    return arr


def asshared(a: Any, dtype: Any = None) -> SharedArray:
    """Return ``a`` as a shared array: in place if it already is one, else one copy.

    A plain ``np.ndarray`` view of shared memory is also returned without a copy.
    """
    if isinstance(a, np.ma.MaskedArray):  # np.asarray would drop the mask silently
        raise TypeError("a masked array cannot be shared (its mask would be lost); share "
                        "a.filled(value) or the data and the mask as two arrays")
    arr = np.asarray(a, dtype=dtype)
    if locate(arr) is not None:
        return arr.view(SharedArray)
    out = empty(arr.shape, arr.dtype, _copy_order(arr))
    np.copyto(out, arr, casting="no")
    return out


def _copy_order(a: np.ndarray) -> Literal["C", "F"]:
    """The order of a shared copy of ``a``: F if ``a`` is F-contiguous only (fn then sees
    the layout it was given), else C."""
    return "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"


def scratch(shape: tuple[int, ...], dtype: np.dtype, recycler: Recycler,
            zeroed: bool = False, order: Literal["C", "F"] = "C") -> SharedArray:
    """A shared array for a pool's map to fill (see Recycling): a segment the pool kept if
    one fits, whose memory holds old values unless ``zeroed``, else a new one."""
    dtype = _check_dtype(dtype)
    nbytes = _nbytes(shape, dtype)
    got = recycler.take(nbytes)
    if got is None:
        raw = _Segment.new(nbytes, recycler=recycler).take_raw()
    else:
        raw = got[1]
        if zeroed:
            raw[:nbytes] = 0
    return np.ndarray(shape, dtype, buffer=raw, order=order).view(SharedArray)


def scratch_copy(a: np.ndarray, recycler: Recycler) -> SharedArray:
    """A shared copy of ``a``, laid out as ``asshared`` copies, in a segment the pool may
    recycle (see scratch)."""
    out = scratch(a.shape, a.dtype, recycler, order=_copy_order(a))
    np.copyto(out, a, casting="no")
    return out


def is_shared(a: Any) -> bool:
    """True if ``a`` is an array whose memory lies in a live parrun segment."""
    return isinstance(a, np.ndarray) and locate(a) is not None


# Plain arrays at least this big travel through a shared segment instead of inside a pickle:
# one copy instead of three (pickle, pipe, unpickle). Smaller ones are cheaper to pickle than a
# segment is to create (~30 us).
BIG_ARRAY_BYTES = 1 << 20


def _reduce_array(pickler: Any, obj: Any):
    """The reduction of an ndarray for parrun's picklers: a handle if it lives in shared
    memory that the receiver can map, else whatever ``pickler.big_array`` says (None: pickle
    it by value)."""
    handle = handle_of(obj)
    if handle is not None and pickler.may_share(handle[0]):
        _escaped(handle[0])
        return from_handle, (handle,)
    if handle is None:
        check_not_released(obj)
    if obj.nbytes < BIG_ARRAY_BYTES or obj.dtype.hasobject:
        # By value; a SharedArray would otherwise reduce itself to its handle.
        return None if handle is None else np.asarray(obj).__reduce_ex__(5)
    return pickler.big_array(obj)


def _owned_here(name: str) -> bool:
    seg = _owned.get(name)
    return seg is not None and seg.owner_pid == os.getpid()


class _Detached:
    """A segment made for another process to adopt, unlinked here if it never is sent."""

    def __init__(self, name: str) -> None:
        self.name = name

    def release(self) -> None:
        _unlink(self.name)


class _ArgsArrays:
    """A task's arguments: big plain arrays are copied once into temporary segments that the
    parent releases when the task is over (``temps``)."""

    temps: list

    def big_array(self, obj: np.ndarray):
        tmp = asshared(obj)
        self.temps.append(tmp)
        return from_handle_transient, (handle_of(tmp),)


class _ResultArrays:
    """A worker's result: big plain arrays are copied once into a segment the parent adopts.
    So are arrays in segments the worker made itself: it unlinks them when they die here,
    maybe before the parent maps them (small ones go by value)."""

    temps: list

    def may_share(self, name: str) -> bool:
        return not _owned_here(name)

    def big_array(self, obj: np.ndarray):
        name, raw = create_detached(obj.nbytes)
        self.temps.append(_Detached(name))  # unlinked if the pickling fails after all
        dst = np.ndarray(obj.shape, obj.dtype, buffer=raw)
        np.copyto(dst, obj, casting="no")
        return adopt, ((name, 0, dst.shape, dst.strides, dst.dtype, True),)


def _module_attr(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def _reduce_by_reference(obj: Any) -> tuple | None:
    """A numba dispatcher bound at the top level of an importable module, as a reference to
    that module's attribute. numba pickles a dispatcher by value and rebuilds it, uncached, in
    the receiving process, which compiles it again (0.2-1.2 s a kernel, in every worker of
    every pool); by reference, a worker uses its own module's dispatcher, with its disk cache
    where it has one (``cache=True``)."""
    if not type(obj).__module__.startswith("numba."):
        return None
    module = getattr(getattr(obj, "py_func", None), "__module__", None)
    m = sys.modules.get(module) if module not in (None, "__main__") else None
    # Found by identity, not by the function's name: ``f = njit(g)`` binds it as f.
    name = next((k for k, v in vars(m).items() if v is obj), None) if m is not None else None
    return (_module_attr, (module, name)) if name is not None else None


# The array types sent as handles (or through segments when big). Other subclasses (masked
# arrays, say) pickle as their class says, by value: a handle would drop what they add.
_PLAIN_ARRAYS = (np.ndarray, SharedArray, np.memmap)


class _HandlePickler(cloudpickle.Pickler):
    """cloudpickle, with every ndarray that lives in shared memory sent as a handle. This
    catches plain ``np.ndarray`` views of shared memory too (captured by a closure, say).
    Compiled numba kernels of importable modules go by reference (``_reduce_by_reference``)."""

    def __init__(self, file, protocol=None):
        super().__init__(file, protocol=protocol)
        self.names: set[str] = set()  # the segments whose handles it wrote

    def reducer_override(self, obj):
        if type(obj) in _PLAIN_ARRAYS:
            r = _reduce_array(self, obj)
            if r is not None:
                if r[0] is from_handle:
                    self.names.add(r[1][0][0])
                return r
        else:
            ref = _reduce_by_reference(obj)
            if ref is not None:
                return ref
        return super().reducer_override(obj)

    def may_share(self, name: str) -> bool:
        return True

    def big_array(self, obj: np.ndarray):
        return None


class _ArgsPickler(_ArgsArrays, _HandlePickler):
    def __init__(self, file, protocol=None):
        super().__init__(file, protocol=protocol)
        self.temps = []


class _ResultPickler(_ResultArrays, _HandlePickler):
    def __init__(self, file, protocol=None):
        super().__init__(file, protocol=protocol)
        self.temps = []


class _FastPickler(pickle.Pickler):
    """The C pickler with the same array rules: ~10x faster for plain data; anything it
    cannot pickle by reference (a lambda, say) falls back to the cloudpickle twin."""

    def __init__(self, file, protocol=None):
        super().__init__(file, protocol=5)
        self.temps = []

    def reducer_override(self, obj):
        if type(obj) in _PLAIN_ARRAYS:
            r = _reduce_array(self, obj)
            if r is not None:
                return r
        elif (isinstance(obj, (types.FunctionType, type))
              and getattr(obj, "__module__", None) == "__main__"):
            # By reference it would name the script, which workers do not import:
            # cloudpickle sends it by value.
            raise pickle.PicklingError("a function or class of __main__")
        return NotImplemented

    def may_share(self, name: str) -> bool:
        return True


class _FastArgsPickler(_ArgsArrays, _FastPickler):
    pass


class _FastResultPickler(_ResultArrays, _FastPickler):
    pass


def dumps(obj: Any, protocol: int | None = None) -> bytes:
    """cloudpickle ``obj``, sending shared arrays (and views of them) as handles."""
    return dumps_naming(obj, protocol)[0]


def dumps_naming(obj: Any, protocol: int | None = None) -> tuple[bytes, frozenset[str]]:
    """``dumps``, and the names of the segments whose handles the pickle holds."""
    buf = io.BytesIO()
    p = _HandlePickler(buf, protocol=protocol or 5)
    p.dump(obj)
    return buf.getvalue(), frozenset(p.names)


_NO_ARGS = pickle.dumps(((), {}), protocol=5)


def _dump_with(fast, slow, obj: Any) -> tuple[bytes, list[SharedArray]]:
    for cls in (fast, slow):
        buf = io.BytesIO()
        p = cls(buf, protocol=5)
        try:
            p.dump(obj)
        except Exception:
            for t in getattr(p, "temps", ()):
                t.release()
            if cls is slow:
                raise
            continue
        return buf.getvalue(), getattr(p, "temps", [])
    raise AssertionError("unreachable")  # pragma: no cover


def dumps_args(obj: tuple) -> tuple[bytes, list[SharedArray]]:
    """Pickle a task's ``(args, kwargs)``; return the bytes and the temporary segments to
    release once the task is over."""
    if obj == ((), {}):
        return _NO_ARGS, []
    return _dump_with(_FastArgsPickler, _ArgsPickler, obj)


def dumps_result(obj: Any) -> bytes:
    """Pickle a task's result in a worker (big arrays go through segments the parent
    adopts)."""
    if obj is None:
        return _NONE
    return _dump_with(_FastResultPickler, _ResultPickler, obj)[0]


_NONE = pickle.dumps(None, protocol=5)
