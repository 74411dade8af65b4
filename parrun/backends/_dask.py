"""``DaskPool``: parrun's ``map``, ``map_reduce`` and ``submit`` on a Dask distributed cluster.

Data flow of ``pool.map(fn, x, out=out)``::

    caller (this process)                         Dask worker (any machine, any thread)
    ------                                        -----------
    fn -> pickled by value (_ValuePickler); its
          arrays of 1 MiB or more become Dask
          data keyed by a hash of their content,
          broadcast once to every worker and
          kept across calls; the rest (< 64 KiB)
          rides inside each task               -> fn loaded once per worker (cached by key),
    x  -> pieces (a few per worker thread), each    BLAS limited to ``blas_threads``
          scattered once, to one worker        -> fn over ``grain``-row tiles of its piece
                                                    (L2-sized by default), into a local buffer
    out[lo:hi] = rows, as pieces complete      <- the piece's rows (map_reduce: its partial)

Who does what:

* Dask schedules the tasks, moves the data, balances the workers (its own work stealing) and
  re-runs the tasks of a worker that dies;
* the caller splits the arrays, ships each function and array once, and writes what comes
  back into its own (shared) arrays; it re-sends a piece whose scattered input died with a
  worker;
* workers never touch ``/dev/shm``: every array reaches them by value, so the cluster may be
  on other machines.

Shared arrays pickle as ``/dev/shm`` handles for the local pool, and a function may write into
a shared array it captured (``parrun.nn.attention`` writes its output so). Here such arrays
travel by value, and reach the function read-only. If the function writes into one (numpy
raises "read-only"), the worker marks that function a writer and runs the piece again on
private copies, then returns the elements that changed; the caller writes them into its
arrays. So a function that only reads its captured arrays (model weights) pays nothing.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import math
import os
import pickle
import queue
import secrets
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cloudpickle
import numpy as np

import parrun
from parrun import _protocol, _shm, _worker
from parrun._checks import (
    accepts_out,
    check_arrays,
    check_first_result,
    check_fn,
    check_grain,
    check_out,
    check_ufunc_out,
    store_result,
)
from parrun._pool import _count, _overlaps_across_rows

try:
    import distributed
    from distributed.client import ClosedClientError, FutureCancelledError
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError("parrun's Dask backend needs dask and distributed: "
                      "pip install 'parrun[dask]'") from e

# Results fetched per round trip by the fetcher thread: more makes one gather hold more
# results in memory at once; fewer pays a round trip (~3 ms) for fewer tasks.
FETCH_BATCH = 256
# Seconds close() waits for the fetcher thread to finish its batch.
FETCH_STOP_TIMEOUT = 5.0
# Seconds close() lets the tasks already running finish before it cancels them: as the local
# pool, running tasks finish first, but a task that hangs must not hang close() for ever.
CLOSE_TIMEOUT = 60.0
# cancel() asks the workers which tasks run, for at most this many seconds (a task on a
# worker that does not answer counts as not running: cancelled, as Dask does), and reuses an
# answer for this long.
CANCEL_ASK_S = 1.0
CANCEL_ANSWER_S = 0.05
# Arrays at least this big travel as Dask data of their own (keyed by content, sent once per
# worker, reused across calls) instead of inside a pickle. Smaller ones cost less to send
# with each task than a scatter round trip (~1 ms) and a hash.
EXTERNAL_BYTES = 1 << 20
# A pickled function (or task arguments) up to this size rides inside each task; a larger one
# is broadcast once, as big arrays are. Larger inline payloads are re-sent with every task.
INLINE_BYTES = 64 * 1024
# Pieces per Dask worker thread. More balances uneven pieces and a lost worker better; fewer
# pays the per-task cost (a scheduler round trip and a transfer, ~1-3 ms) less often.
PIECES_PER_THREAD = 4
# Smallest piece (bytes of input) when the caller gave no grain: a cheap function on a smaller
# piece spends more on the task and its transfers than on the work.
MIN_PIECE_BYTES = 4 << 20
# Largest piece (bytes of input): larger pieces hold more memory per worker at once, and the
# first results arrive later (less overlap of transfer with work).
MAX_PIECE_BYTES = 64 << 20
# Input bytes per call of fn inside a piece when no grain is given, as the local pool's tiles:
# a chain of NumPy temporaries on a larger tile leaves L2 and runs up to 2x slower.
TILE_BYTES = 256 * 1024
# Content-keyed arrays and functions a pool keeps on the cluster between calls; the oldest
# are released beyond either bound (more keeps model weights warm, but holds worker memory).
CACHE_BYTES = 2 << 30
CACHE_ENTRIES = 256
# Loaded functions a worker process keeps (each may hold its arrays alive).
WORKER_CACHE_ENTRIES = 32
# Times a piece or task whose input died with its worker is sent again before the call fails.
RESEND_ROUNDS = 3
# Changed runs of a written-back array sent as (start, stop) spans; beyond this, a bit mask.
MAX_SPANS = 4096
# Seconds to reach the scheduler and to see a first worker, by default.
CONNECT_TIMEOUT = 10.0


# "No initial value": the default that parrun.map_reduce passes on.
_NOTHING = _protocol.NOTHING


# -- pickling by value -----------------------------------------------------------------------
_PLAIN_ARRAYS = (np.ndarray, parrun.SharedArray)


class _ValuePickler(cloudpickle.Pickler):
    """cloudpickle that never sends a ``/dev/shm`` handle.

    Arrays in shared memory (which may be written back) and plain arrays of
    ``EXTERNAL_BYTES`` or more are left out of the bytes and listed in ``arrays``; the pickle
    refers to them by position (``_array_at``). Other arrays are pickled by value.
    """

    def __init__(self, file: io.BytesIO):
        super().__init__(file, protocol=5)
        self.arrays: list[np.ndarray] = []
        self.shared: list[bool] = []

    def reducer_override(self, obj: Any) -> Any:
        # Plain and shared arrays only: a subclass (a masked array, np.matrix) would arrive
        # as a plain array, without its mask or its meaning of ``*``.
        if type(obj) in _PLAIN_ARRAYS and not obj.dtype.hasobject:
            shared = parrun.is_shared(obj)
            if shared:
                _shm.check_not_released(obj)  # (as the local pool refuses it)
            if shared or obj.nbytes >= EXTERNAL_BYTES:
                self.arrays.append(obj)
                self.shared.append(shared)
                return _array_at, (len(self.arrays) - 1,)
        return super().reducer_override(obj)


_loading = threading.local()


def _array_at(i: int) -> np.ndarray:
    """Unpickling, in a worker: the array at position ``i`` of the payload being loaded."""
    return _loading.table[i]


@dataclass(frozen=True)
class _Payload:
    """A pickled object (a function, or a task's arguments) and the arrays left out of it.

    ``inline`` holds (position, array) of small arrays; ``external`` (position, Dask key) of
    big ones, whose values the task receives beside the payload. ``shared`` lists positions of
    arrays that were shared in the caller; ``writable`` those of them it may see written.
    """

    key: str
    blob: bytes
    inline: tuple[tuple[int, np.ndarray], ...]
    external: tuple[tuple[int, str], ...]
    shared: frozenset[int]
    writable: frozenset[int]
    n_arrays: int


@dataclass
class _Shipped:
    """What the caller keeps of a shipped object: the payload (or its Dask future), the
    futures of its external arrays, and its original arrays (write-back targets)."""

    payload: Any
    external: tuple
    arrays: list[np.ndarray]
    key: str


def _plain(a: np.ndarray) -> np.ndarray:
    """``a`` as a plain C-contiguous ndarray (a view where possible)."""
    return np.ascontiguousarray(a).view(np.ndarray) if a.ndim else np.array(a)


def _digest(a: np.ndarray) -> str:
    """A content hash of an array: its dtype, shape and bytes."""
    a = np.ascontiguousarray(a) if a.ndim else np.array(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.reshape(-1).data.cast("B"))
    return h.hexdigest()[:32]


# -- worker side -----------------------------------------------------------------------------
_worker_lock = threading.Lock()
# payload key -> loaded object (functions only: task arguments are loaded fresh every time).
_worker_cache: OrderedDict[str, Any] = OrderedDict()
# keys of payloads whose function wrote into its read-only shared arrays once: run on copies.
_writers: set[str] = set()
_blas_limit: list[Any] = [None]


def _limit_blas(threads: int | None) -> None:
    """Limit BLAS in this worker process to ``threads`` threads per task (once per value)."""
    if threads is None or _blas_limit[0] == threads:
        return
    with _worker_lock:
        if _blas_limit[0] != threads:
            try:
                from threadpoolctl import threadpool_limits

                threadpool_limits(limits=threads)
            except Exception:  # pragma: no cover - threadpoolctl cannot see this BLAS
                pass
            _blas_limit[0] = threads


def _materialize(p: _Payload, ext: tuple, private: bool) -> tuple[Any, list, list]:
    """Unpickle ``p``. Shared arrays are read-only views of the received data, or private
    writable copies (``private``, for the writable ones); other arrays are writable copies.
    Returns the object, the received arrays and the arrays the object holds."""
    src: list[Any] = [None] * p.n_arrays
    for i, a in p.inline:
        src[i] = a
    for (i, _key), a in zip(p.external, ext):
        src[i] = _aligned(a)
    table = []
    for i, a in enumerate(src):
        if i in p.shared and not (private and i in p.writable):
            v = a.view()
            v.flags.writeable = False
        else:
            v = np.array(a, order="C")
        table.append(v)
    _loading.table = table
    try:
        obj = cloudpickle.loads(p.blob)
    finally:
        _loading.table = None
    return obj, src, table


def _cached(p: _Payload, ext: tuple) -> Any:
    with _worker_lock:
        obj = _worker_cache.get(p.key)
        if obj is not None:
            _worker_cache.move_to_end(p.key)
            return obj
    obj = _materialize(p, ext, private=False)[0]
    with _worker_lock:
        _worker_cache[p.key] = obj
        while len(_worker_cache) > WORKER_CACHE_ENTRIES:
            _worker_cache.popitem(last=False)
    return obj


def _forget(token: str) -> int:
    """On a worker: drop the functions that the pool ``token`` (now closed) loaded here; each
    may hold private copies of big arrays. Returns how many."""
    prefix = f"parrun-payload-{token}-"
    with _worker_lock:
        keys = [k for k in _worker_cache if k.startswith(prefix)]
        for k in keys:
            del _worker_cache[k]
        _writers.difference_update([k for k in _writers if k.startswith(prefix)])
    return len(keys)


def _running_keys(dask_worker: Any) -> list[str]:
    """On a worker: the keys of the tasks its threads are running (not those queued)."""
    state = dask_worker.state
    return [ts.key for ts in (*state.executing, *state.long_running)]


def _aligned(a: np.ndarray) -> np.ndarray:
    """``a``, copied if its data is not aligned to its dtype. Dask hands received arrays over
    at any byte offset of a message, and NumPy runs unaligned data through slow loops
    (measured: the chain ~2x slower; matmul leaves BLAS)."""
    return a if a.flags.aligned else np.array(a)


def _words(a: np.ndarray) -> np.ndarray:
    """A C-contiguous array's elements as unsigned integers (rows of them for odd sizes), so
    that comparing them compares bytes (NaN equals NaN)."""
    flat = a.reshape(-1)
    s = a.dtype.itemsize
    if s in (1, 2, 4, 8):
        return flat.view(f"u{s}")
    return flat.view(np.uint8).reshape(-1, s)


def _changes(p: _Payload, src: list, table: list) -> tuple:
    """The elements of ``p``'s writable shared arrays that the task changed:
    ``((position, kind, where, values), ...)``."""
    out: list[tuple[int, str, np.ndarray, np.ndarray]] = []
    for i in sorted(p.writable):
        new, old = table[i], src[i]
        diff = _words(new) != _words(old)
        if diff.ndim == 2:
            diff = diff.any(axis=1)
        if not diff.any():
            continue
        values = new.reshape(-1)[diff]
        edges = np.flatnonzero(np.diff(diff.view(np.int8), prepend=0, append=0))
        if len(edges) // 2 <= MAX_SPANS:
            out.append((i, "spans", edges.reshape(-1, 2), values))
        else:
            out.append((i, "mask", np.packbits(diff), values))
    return tuple(out)


def _call_tracked(fn_p: _Payload, fn_ext: tuple, args_p: _Payload | None, args_ext: tuple,
                  run: Callable[..., Any],
                  before_rerun: Callable[[], None] | None = None) -> tuple[Any, tuple, tuple]:
    """``run(fn, args)`` with fn (cached) and args (fresh) loaded, their shared arrays
    read-only; if the function writes into one, again (after ``before_rerun``) on private
    copies, returning what changed. Returns (result, changes in fn's arrays, changes in args'
    arrays). A write NumPy lets through a read-only view (``np.add.at`` in NumPy 2.4,
    ``torch.from_numpy``) is not seen: see the README."""
    writable = bool(fn_p.writable or (args_p is not None and args_p.writable))
    if fn_p.key not in _writers:
        fn = _cached(fn_p, fn_ext)
        args = _materialize(args_p, args_ext, False)[0] if args_p is not None else None
        try:
            return run(fn, args), (), ()
        except Exception as e:  # NumPy: ValueError; numba: TypingError on "readonly array"
            if not writable or not ("read-only" in str(e) or "readonly array" in str(e)):
                raise
            with _worker_lock:
                _writers.add(fn_p.key)
        if before_rerun is not None:
            before_rerun()
    fn, fsrc, ftab = _materialize(fn_p, fn_ext, True)
    args, asrc, atab = (_materialize(args_p, args_ext, True) if args_p is not None
                        else (None, [], []))
    res = run(fn, args)
    return (res, _changes(fn_p, fsrc, ftab),
            _changes(args_p, asrc, atab) if args_p is not None else ())


class _ResultPickler(cloudpickle.Pickler):
    """cloudpickle with the shared arrays a result holds by value: their segments are this
    worker's (on another machine, maybe), and go when it releases them."""

    found_shared = False

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, parrun.SharedArray):
            self.found_shared = True
            return np.array(obj).__reduce_ex__(5)
        return super().reducer_override(obj)


@dataclass(frozen=True)
class _Pickled:
    """A result pickled on the worker: one that Dask failed to pickle there made Dask's
    next calls on that client fail too (an AssertionError on a later map). Its arrays' data
    stays out of the pickle (``buffers``, as byte arrays)."""

    blob: bytes
    buffers: tuple = ()


def _result_value(v: Any, what: str = "the result of the task") -> Any:
    """A task's result (``what``) as it travels: an array as it is (an array in this
    worker's shared memory, copied out). Anything else is pickled here first, so that an
    object that cannot be is this task's ``TypeError`` (its arrays' data out of band: not
    copied); then it goes as it is, for Dask to serialize (its own array frames: a 200 MB
    array in a tuple took 3x the time through our pickle), unless it holds shared arrays:
    then as that pickle, which has them by value."""
    if type(v) in _PLAIN_ARRAYS:
        return np.array(v) if parrun.is_shared(v) else v
    buf = io.BytesIO()
    buffers: list[pickle.PickleBuffer] = []
    pickler = _ResultPickler(buf, protocol=5, buffer_callback=buffers.append)
    try:
        pickler.dump(v)
    except Exception as e:
        raise TypeError(f"{what} could not be pickled: {type(e).__name__}: {e}") from None
    if not pickler.found_shared:
        return v
    return _Pickled(buf.getvalue(), tuple(np.frombuffer(b.raw(), np.uint8) for b in buffers))


def _unpacked(v: Any) -> Any:
    """A result as ``_result_value`` sent it, here (its arrays writable, as a result's are
    on the local pool)."""
    if not isinstance(v, _Pickled):
        return v
    return pickle.loads(v.blob, buffers=[b if b.flags.writeable else np.array(b)
                                         for b in v.buffers])


@dataclass(frozen=True)
class _MapSpec:
    """How a worker runs its piece of a map or map_reduce."""

    tile: int  # rows per call of fn
    takes_out: bool
    out_dtype: Any  # None: out was not given, the first tile's result decides
    out_trail: tuple
    out_sent: bool  # out's rows come last in each piece: fn(..., out=) starts from them
    reduce: bool
    blas_threads: int | None


@dataclass(frozen=True)
class _PieceResult:
    lo: int
    value: Any
    fn_changes: tuple
    pid: int
    address: str
    busy_ns: int


class _Carried(Exception):
    """Raised by a task, on a worker, for an exception Dask cannot carry as it is: one that
    is not an ``Exception`` (``SystemExit`` there would stop the worker's thread and the
    nanny would restart the worker) or one that cannot be pickled (Dask would send a bare
    ``Exception``). The caller raises ``exc``, with ``tb`` (the worker's traceback)."""

    def __init__(self, exc: BaseException, tb: str):
        super().__init__(exc, tb)
        self.exc = exc
        self.tb = tb


def _pickles(e: BaseException) -> bool:
    try:
        pickle.loads(cloudpickle.dumps(e))
    except Exception:
        return False
    return True


def _carrying(body: Callable[..., Any], *args: Any) -> Any:
    """``body(*args)`` in a Dask task, with what Dask cannot carry raised as ``_Carried``."""
    _worker.IN_TASK.on = True  # (a Pool started by fn: "pools do not nest", not Dask's
    try:  # daemonic-process assertion)
        return body(*args)
    except BaseException as e:
        # A CancelledError of fn's own goes carried: as it is, it reads as a task that Dask
        # cancelled (lost with its worker), and was run again.
        if isinstance(e, Exception) and _pickles(e) and not isinstance(
                e, (cf.CancelledError, FutureCancelledError)):
            raise
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        # Only the exception travels (its text traceback beside it): its context may be
        # what does not pickle.
        e.__traceback__ = e.__cause__ = e.__context__ = None
        exc = e if _pickles(e) else parrun.ParrunError(
            f"{type(e).__qualname__}: {e} (the original exception could not be pickled)")
        carried = _Carried(exc, tb)
    finally:
        _worker.IN_TASK.on = False
    # Raised here, outside the handler, so that it has no context (Dask pickles that too).
    raise carried


def _run_piece(spec: _MapSpec, fn_p: _Payload, fn_ext: tuple, red_p: _Payload | None,
               red_ext: tuple, lo: int, piece: tuple) -> _PieceResult:
    """A Dask task: fn over the tiles of one piece (its rows start at ``lo``)."""
    result: _PieceResult = _carrying(_piece, spec, fn_p, fn_ext, red_p, red_ext, lo, piece)
    return result


def _piece(spec: _MapSpec, fn_p: _Payload, fn_ext: tuple, red_p: _Payload | None,
           red_ext: tuple, lo: int, piece: tuple) -> _PieceResult:
    _limit_blas(spec.blas_threads)
    t0 = time.perf_counter_ns()
    combine = _cached(red_p, red_ext) if red_p is not None else None
    piece = tuple(_aligned(a) for a in piece)
    n = piece[0].shape[0]
    start = None
    if spec.out_sent:
        *piece, start = piece  # type: ignore[assignment]
    # fn may change its piece in place before it turns out to write into a captured shared
    # array (which makes it run again): keep the piece as it came for that second run.
    saved = (tuple(np.array(a) for a in piece)
             if fn_p.writable and fn_p.key not in _writers else None)

    def restore() -> None:
        nonlocal piece
        piece = saved  # type: ignore[assignment]

    def run(fn: Any, _args: Any) -> Any:
        acc: Any = _NOTHING
        made_out = False  # buf made here from the first tile's result
        if start is not None:
            buf = np.array(start)  # writable, and what fn does not write stays as it was
        elif spec.out_dtype is not None:
            buf = np.empty((n, *spec.out_trail), spec.out_dtype)
        else:
            buf = None
        for a in range(0, n, spec.tile):
            b = min(n, a + spec.tile)
            ins = [p[a:b] for p in piece]
            if spec.reduce:
                r = fn(*ins)
                acc = r if acc is _NOTHING else combine(acc, r)  # type: ignore[misc]
            elif buf is None:  # out not given: the first tile decides its dtype and shape
                r = check_first_result(fn(*ins), lo + a, lo + b)
                buf = np.empty((n, *r.shape[1:]), r.dtype)
                buf[a:b] = r
                made_out = True
            elif spec.takes_out:
                dst = buf[a:b]
                r = fn(*ins, out=dst)
                if r is not None:
                    store_result(dst, r, lo + a, lo + b, made_out)
            else:
                store_result(buf[a:b], fn(*ins), lo + a, lo + b, made_out)
        return acc if spec.reduce else buf

    value, changes, _ = _call_tracked(fn_p, fn_ext, None, (), run,
                                      restore if saved is not None else None)
    worker = distributed.get_worker()
    return _PieceResult(lo, _result_value(value, f"the partial result of rows {lo}:{lo + n}"),
                        changes, os.getpid(), worker.address, time.perf_counter_ns() - t0)


def _run_task(blas_threads: int | None, fn_p: _Payload, fn_ext: tuple, args_p: _Payload,
              args_ext: tuple) -> tuple[Any, tuple, tuple]:
    """A Dask task: ``fn(*args, **kwargs)``."""
    def task() -> tuple[Any, tuple, tuple]:
        _limit_blas(blas_threads)
        value, fn_changes, args_changes = _call_tracked(fn_p, fn_ext, args_p, args_ext, run)
        return _result_value(value), fn_changes, args_changes

    def run(fn: Any, args: Any) -> Any:
        a, kw = args
        return fn(*a, **kw)

    result: tuple[Any, tuple, tuple] = _carrying(task)
    return result


# -- caller side -----------------------------------------------------------------------------
def _apply_changes(arrays: list[np.ndarray], changes: tuple) -> None:
    """Write the elements a task changed into the caller's arrays."""
    for i, kind, where, values in changes:
        target = arrays[i]
        contiguous = target.flags.c_contiguous
        flat = target.reshape(-1) if contiguous else np.array(target, order="C").reshape(-1)
        if kind == "spans":
            o = 0
            for s, e in where:
                flat[s:e] = values[o:o + e - s]
                o += e - s
        else:
            flat[np.unpackbits(where, count=flat.size).view(bool)] = values
        if not contiguous:
            target[...] = flat.reshape(target.shape)


def _remote_error(fut: Any) -> BaseException:
    """The exception of a failed Dask future, as a copy with the worker's traceback as its
    ``__cause__`` (as the local pool raises it). A copy, because the Dask future keeps the
    original until its key is released, and raising it would pin the caller's frames (and
    their arrays) there."""
    exc = fut.exception()
    if isinstance(exc, _Carried):
        tb = exc.tb
        exc = exc.exc
    else:
        tb = "".join(traceback.format_exception(type(exc), exc, fut.traceback()))
    try:
        copy = pickle.loads(pickle.dumps(exc))
    except Exception:  # its class pickles by value only (cloudpickle): a local class
        copy = exc
    copy.__cause__ = parrun.RemoteTraceback(f'\n"""\n{tb}"""')
    return copy


def _lost(fut: Any) -> bool:
    """True if a Dask future failed because its data or its task was lost with a worker
    (rather than because the function raised)."""
    if fut.status in ("cancelled", "lost"):
        return True
    if fut.status == "error":
        exc = fut.exception()
        return isinstance(exc, (FutureCancelledError, cf.CancelledError))
    return False


# ``on`` > 0 in a thread delivering a task's result (and running its done-callbacks).
_delivering = threading.local()


class _TaskFuture(cf.Future):
    """The ``concurrent.futures.Future`` of a task on Dask; ``cancel()`` cancels the Dask
    task too, unless it runs on a worker or has finished (``running_keys``: the keys of the
    Dask tasks running now), as a local pool's task can be cancelled only until it starts."""

    def __init__(self, running_keys: Callable[[], set[str]] | None = None) -> None:
        super().__init__()
        self._dask: Any = None
        self._running_keys = running_keys

    def cancel(self) -> bool:
        d = self._dask
        if not self.done() and d is not None and self._running_keys is not None and (
                d.done() or d.key in self._running_keys()):
            return False  # (Dask would drop it, and what it writes, while it runs on)
        return self._cancel()

    def _cancel(self) -> bool:
        """Cancel, running or not (``terminate``, and tasks known not to have started)."""
        with self._condition:
            pending = not self.done()
            if not super().cancel():
                return False
            if pending:
                # As an executor does on dequeuing it: ``concurrent.futures.wait`` counts a
                # cancelled future done only once notified, and no one else will.
                self.set_running_or_notify_cancel()
        d = self._dask
        if d is not None:
            try:
                d.cancel()
            except Exception:  # a closed client: its tasks went with it
                pass
        return True


class _Tasks:
    """The submitted tasks not finished yet (what ``parrun.Executor.shutdown`` waits for or
    cancels). ``running()`` gives the keys of the Dask tasks running on the workers."""

    def __init__(self, running: Callable[[], set[str]]) -> None:
        self._lock = threading.Lock()
        self._live: set[_TaskFuture] = set()
        self._running = running

    def add(self, f: _TaskFuture) -> None:
        with self._lock:
            self._live.add(f)

    def discard(self, f: _TaskFuture) -> None:
        with self._lock:
            self._live.discard(f)

    def count(self) -> int:
        return len(self._live)

    def outstanding(self) -> list[_TaskFuture]:
        with self._lock:
            return list(self._live)

    def cancel_pending(self) -> None:
        """Cancel the tasks that have not started; those running (or finished, their result
        on its way) go on, as on the local pool."""
        live = [f for f in self.outstanding() if not f.done()]
        if not live:
            return
        running = self._running()
        for f in live:
            d = f._dask
            if d is None or not (d.done() or d.key in running):
                f._cancel()

    def cancel_all(self) -> None:
        for f in self.outstanding():
            f._cancel()

    @staticmethod
    def in_callback() -> bool:
        """True in a thread delivering a task's result (running its done-callbacks)."""
        return bool(getattr(_delivering, "on", 0))


class _Fetcher(threading.Thread):
    """Fetches the results of finished tasks, as many per ``client.gather`` as have finished
    meanwhile. Dask runs ``add_done_callback`` callbacks on one thread; a ``result()`` there
    is one round trip to a worker per task (~3 ms here: 1,000 tasks took 4.6 s); a gather of
    many costs about one."""

    def __init__(self, client: Any) -> None:
        super().__init__(name="parrun-dask-fetcher", daemon=True)
        self.client = client
        self.queue: queue.SimpleQueue = queue.SimpleQueue()

    def fetch(self, d: Any, deliver: Callable[[Any], None],
              settle: Callable[[Any], None]) -> None:
        """Fetch ``d``'s result and call ``deliver(result)``; if the batch fails, ``settle(d)``
        (the one-at-a-time path, which handles lost workers and errors)."""
        self.queue.put((d, deliver, settle))

    def stop(self) -> None:
        self.queue.put(None)

    def run(self) -> None:
        stopping = False
        while not stopping:
            item = self.queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < FETCH_BATCH:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            try:
                values = self.client.gather([d for d, _, _ in batch])
            except BaseException:  # a result lost with its worker, a closed client...
                values = None
            for k, (d, deliver, settle) in enumerate(batch):
                try:
                    if values is None:
                        settle(d)
                    else:
                        deliver(values[k])
                except BaseException:  # pragma: no cover - both handle their own errors
                    pass


class DaskPool(parrun.Pool):
    """parrun's pool API on a Dask distributed cluster: ``parrun.Pool(backend="dask", ...)``.

    Accepted wherever parrun takes ``pool=`` (``parrun.map``, ``parrun.nn``...). Arrays reach
    the workers by value, never as ``/dev/shm`` handles, so the cluster may span machines
    (parrun, numpy and the function's modules must be installed on every worker).

    Args:
        workers: not used: the cluster's worker threads run the work (``parrun.Executor``
            passes its ``max_workers``, which sizes its own batches).
        client: a ``distributed.Client`` to run on; the pool leaves it open when it closes.
        address: or the scheduler's address (``"tcp://host:8786"``); the pool opens a client
            and closes it with itself.
        timeout: seconds to reach the scheduler and to see at least one worker; past it,
            ``ConnectionError``.
        blas_threads: BLAS threads per task on the workers (threadpoolctl); None leaves BLAS
            alone. One per task keeps a worker with N threads on N cores.
        direct: send pieces and fetch results straight to and from the workers (they must be
            reachable from here); False routes that data through the scheduler.
        retries, initializer, initargs: only their defaults: Dask re-runs the tasks of a lost
            worker itself (``distributed.scheduler.allowed-failures``), and per-worker set-up
            is a ``distributed.WorkerPlugin``.

    Raises:
        ConnectionError: the scheduler cannot be reached, or has no workers, within
            ``timeout``.
    """

    def __init__(self, workers: int | None = None, *, client: Any = None,
                 address: str | None = None, timeout: float = CONNECT_TIMEOUT,
                 blas_threads: int | None = 1, direct: bool = True, retries: int = 0,
                 initializer: Callable[..., Any] | None = None, initargs: tuple = (),
                 backend: str = "dask"):
        if (client is None) == (address is None):
            raise TypeError("parrun.Pool(backend='dask') needs client=distributed.Client(...) "
                            "or address='tcp://host:port' (one of them)")
        if blas_threads is not None:
            blas_threads = _count("blas_threads", blas_threads, 1, " (or None)")
        if timeout <= 0:
            raise ValueError(f"timeout must be greater than 0, got {timeout}")
        if retries:
            raise ValueError("retries is not supported on the Dask backend: Dask re-runs the "
                             "tasks of a lost worker itself (distributed.scheduler."
                             "allowed-failures)")
        if initializer is not None or initargs:
            raise ValueError("initializer is not supported on the Dask backend; register a "
                             "distributed.WorkerPlugin with client.register_plugin instead")
        self._pid = os.getpid()  # (an Executor's exit hook reads it, as of a local pool)
        self._closed = True  # until connected (close() and __del__ then do nothing)
        self._closing = False  # close() began: no new calls; the maps running finish
        self._maps = 0  # maps and map_reduces running
        self._maps_done = threading.Condition()
        self._tasks = _Tasks(self._running_keys)
        self.retries = 0
        self.blas_threads = blas_threads
        self.timeout = float(timeout)
        self.direct = direct
        self.last_stats: parrun.JobStats | None = None
        self._cache: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        # In every key this pool puts on the cluster: pools sharing a client must not cancel
        # each other's data when one closes.
        self._token = secrets.token_hex(6)
        self._cache_bytes = 0
        self._cache_lock = threading.RLock()
        self._running_seen: tuple[float, set[str]] = (-1e9, set())  # (when, keys): cancel()
        self._fetch: _Fetcher | None = None
        t0 = time.perf_counter()
        self._owns_client = client is None
        if client is None:
            try:
                client = distributed.Client(address, timeout=self.timeout,
                                            set_as_default=False)
            except (OSError, TimeoutError) as e:
                raise ConnectionError(
                    f"cannot reach the Dask scheduler at {address!r} within {self.timeout:g} s "
                    f"({type(e).__name__}: {e}). Start one with `dask scheduler` and workers "
                    "with `dask worker tcp://host:8786`, or check the address.") from e
        elif not isinstance(client, distributed.Client):
            raise TypeError(f"client must be a distributed.Client, got "
                            f"{type(client).__name__}")
        elif client.status not in ("running", "connecting", "newly-created"):
            raise ValueError(f"the Dask client is {client.status}; pass an open one")
        self._client = client
        try:
            client.wait_for_workers(1, timeout=self.timeout)
        except (OSError, TimeoutError) as e:
            # The address first: a closed client has no scheduler to ask.
            where = getattr(client.scheduler, "address", address)
            if self._owns_client:
                client.close()
            raise ConnectionError(
                f"the Dask cluster at {where} has no workers after {self.timeout:g} s; "
                f"start some with `dask worker {where}`") from e
        self._threads = self._count_threads()
        self._address = getattr(client.scheduler, "address", None) or address
        self.startup_s = time.perf_counter() - t0
        self._closed = False
        # In-process (Client(processes=False)): scattered pieces are the caller's own
        # arrays, so a function writing into its piece wrote into the caller's input.
        self._in_process = str(getattr(client.scheduler, "address", "")).startswith("inproc")

    # -- the cluster ------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The ``distributed.Client`` this pool runs on."""
        return self._client

    def _count_threads(self) -> int:
        return max(1, sum(self._client.nthreads().values()))

    @property
    def workers(self) -> int:  # type: ignore[override]
        """Worker threads on the cluster (as of the last call): what runs pieces at once."""
        return self._threads

    @property
    def pids(self) -> list[int]:
        """Process ids of the Dask workers (on their own machines)."""
        self._check_open()
        return sorted(self._client.run(os.getpid).values())

    def info(self) -> dict[str, Any]:
        """The scheduler, the workers and their threads, BLAS threads per task."""
        self._check_open()
        return {"backend": "dask", "scheduler": self._client.scheduler.address,
                "workers": self._threads, "nthreads": dict(self._client.nthreads()),
                "blas_threads_per_task": self.blas_threads, "startup_s": self.startup_s}

    @property
    def task_stats(self) -> None:
        """Not kept on the Dask backend (see Dask's dashboard)."""
        return None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        where = getattr(getattr(self, "_client", None), "scheduler", None)
        return (f"<parrun.backends.DaskPool scheduler={getattr(where, 'address', None)!r} "
                f"threads={getattr(self, '_threads', 0)} {state}>")

    def _running_keys(self, timeout: float | None = None) -> set[str]:
        """The keys of the Dask tasks running on the workers now; none if the workers do not
        answer within ``timeout`` (default: the pool's; a lost or hung worker must not hang
        ``close``)."""
        try:
            if self._client.status != "running":
                return set()
            # callback_timeout bounds the call (Client.sync's), and is not passed to the
            # function; a worker that fails to answer is left out.
            per_worker = self._client.run(_running_keys, on_error="ignore",
                                          callback_timeout=timeout or self.timeout)
        except Exception:  # the client closing, a timeout
            return set()
        return {k for keys in per_worker.values() for k in keys}

    def _running_now(self) -> set[str]:
        """``_running_keys`` for ``cancel()``: asked within ``CANCEL_ASK_S`` (a worker that
        does not answer, stopped or holding the GIL, blocked each cancel for ``timeout``),
        and one answer serves the cancels of the next ``CANCEL_ANSWER_S`` (an executor's map
        cancels many at once)."""
        with self._cache_lock:
            at, keys = self._running_seen
        if time.monotonic() - at > CANCEL_ANSWER_S:
            keys = self._running_keys(CANCEL_ASK_S)
            with self._cache_lock:
                self._running_seen = (time.monotonic(), keys)
        return keys

    def close(self) -> None:
        """Cancel the tasks that have not started (those running finish first, for up to
        ``CLOSE_TIMEOUT`` seconds), release what the pool keeps on the cluster (its data,
        the functions its workers loaded), and close the client if the pool opened it.
        Idempotent."""
        self._close(wait=True)

    def terminate(self) -> None:
        """As ``close``, but the tasks running are cancelled too (the Dask workers belong to
        the cluster: they go on)."""
        self._close(wait=False)

    def _close(self, wait: bool) -> None:
        if self._closed or self._closing:
            return
        self._closing = True
        # Not in a done-callback of a task: the thread it holds is the one that delivers the
        # results waited for.
        waits = wait and self._client.status == "running" and not getattr(_delivering, "on", 0)
        if waits:
            # As the local pool, a map running in another thread finishes first (cancelling
            # its pieces made it send them and its functions again, after the cache was
            # dropped: they stayed on the cluster).
            with self._maps_done:
                self._maps_done.wait_for(lambda: not self._maps)
        self._closed = True
        if waits:
            self._tasks.cancel_pending()
            cf.wait(self._tasks.outstanding(), timeout=CLOSE_TIMEOUT)
        self._tasks.cancel_all()
        if self._fetch is not None:
            self._fetch.stop()
            if threading.current_thread() is not self._fetch:  # not from a done-callback
                self._fetch.join(FETCH_STOP_TIMEOUT)
        with self._cache_lock:
            futures = [f for f, _ in self._cache.values()]
            self._cache.clear()
            self._cache_bytes = 0
        try:
            if self._client.status == "running":
                if futures:
                    self._client.cancel(futures)
                try:  # the workers' loaded functions (process-global: they outlive the pool)
                    self._client.run(_forget, self._token, on_error="ignore",
                                     callback_timeout=self.timeout)
                except Exception:  # a timeout, the client closing: their LRU drops them
                    pass
        finally:
            if self._owns_client:
                self._client.close()

    def __del__(self) -> None:
        try:
            if not self._closed and not __import__("sys").is_finalizing():
                self._close(wait=False)
        except Exception:
            pass

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise parrun.PoolClosedError("this DaskPool is closed; create a new one")
        if self._client.status in ("closing", "closed"):
            if self._owns_client:  # closed by itself: it lost the scheduler
                raise self._cluster_lost(None)
            raise parrun.PoolClosedError("the Dask client of this DaskPool is closed; create "
                                         "a new pool on a running client")

    def _cluster_lost(self, e: BaseException | None) -> parrun.BrokenPool:
        """The error for a call the cluster failed: its client lost the scheduler."""
        where = self._address
        why = f" ({type(e).__name__}: {e})" if e is not None else ""
        err = parrun.BrokenPool(
            f"this DaskPool lost its Dask scheduler at {where}{why}; the client is "
            f"{self._client.status}. Restart the scheduler and create a new pool.")
        err.__cause__ = e
        return err

    def _is_cluster_lost(self, e: BaseException) -> bool:
        """True if ``e`` (raised by a call to the cluster, not by fn) came of a lost
        scheduler: the client is closed or reconnecting."""
        return isinstance(e, (ClosedClientError, OSError, TimeoutError)) and \
            not self._closed and self._client.status != "running"

    # -- shipping ---------------------------------------------------------------------------
    def _put(self, key: str, value: Any, nbytes: int, broadcast: bool) -> Any:
        """A Dask future holding ``value`` under ``key``: kept from an earlier call, or
        scattered now (to every worker if ``broadcast``)."""
        with self._cache_lock:
            if self._closed:  # terminate() during a map: nothing more goes to the cluster
                raise parrun.PoolClosedError("this DaskPool was closed during the call")
            hit = self._cache.get(key)
            if hit is not None and hit[0].status == "finished":
                self._cache.move_to_end(key)
                return hit[0]
        fut = self._client.scatter({key: value}, broadcast=broadcast, direct=self.direct,
                                   hash=False, timeout=self.timeout)[key]
        with self._cache_lock:
            old = self._cache.pop(key, None)
            if old is not None:
                self._cache_bytes -= old[1]
            self._cache[key] = (fut, nbytes)
            self._cache_bytes += nbytes
            while len(self._cache) > 1 and (len(self._cache) > CACHE_ENTRIES
                                            or self._cache_bytes > CACHE_BYTES):
                _, (_f, b) = self._cache.popitem(last=False)
                self._cache_bytes -= b
        return fut

    def _ship(self, obj: Any, what: str, local_ids: frozenset[int] = frozenset()) -> _Shipped:
        """Pickle ``obj`` by value; put its big arrays on the cluster (broadcast, unless their
        id is in ``local_ids``: those go to one worker). Cached by content across calls."""
        buf = io.BytesIO()
        p = _ValuePickler(buf)
        try:
            p.dump(obj)
        except _shm.ReleasedArrayError:
            raise
        except Exception as e:
            raise TypeError(f"{what} could not be pickled for the Dask cluster (cloudpickle): "
                            f"{type(e).__name__}: {e}") from e
        blob = buf.getvalue()
        h = hashlib.sha256(blob)
        inline, external, ext_futs, writable = [], [], [], []
        size = len(blob)
        for i, (a, shared) in enumerate(zip(p.arrays, p.shared)):
            if shared and a.flags.writeable:
                writable.append(i)
            if a.nbytes >= EXTERNAL_BYTES:
                key = f"parrun-array-{self._token}-{_digest(a)}"
                ext_futs.append(self._put(key, _plain(a), a.nbytes,
                                          broadcast=id(a) not in local_ids))
                external.append((i, key))
                h.update(key.encode())
            else:
                c = np.array(a, order="C").view(np.ndarray)
                inline.append((i, c))
                size += c.nbytes
                h.update(_digest(c).encode())
            h.update(b"s" if shared else b"p")
        key = f"parrun-payload-{self._token}-{h.hexdigest()[:32]}"
        payload = _Payload(key, blob, tuple(inline), tuple(external),
                           frozenset(i for i, s in enumerate(p.shared) if s),
                           frozenset(writable), len(p.arrays))
        ref = payload if size <= INLINE_BYTES else self._put(key, payload, size, True)
        return _Shipped(ref, tuple(ext_futs), p.arrays, key)

    # -- jobs -------------------------------------------------------------------------------
    def map(self, fn: Callable[..., Any], *arrays: Any, out: np.ndarray | None = None,
            grain: int | None = None) -> np.ndarray:
        """Apply ``fn`` to pieces of ``arrays`` along axis 0 on the cluster, into ``out``.

        As ``parrun.Pool.map``, with these differences: the arrays are split into pieces of
        a few MiB (a few per worker thread), each sent to one worker; there ``fn`` runs on
        tiles of ``grain`` rows (default: about 256 KiB of input) and the piece's rows come
        back into ``out`` (a shared array if None). A worker that dies costs a re-run of its
        pieces (Dask reschedules them; lost inputs are sent again).

        Raises:
            TypeError / ValueError: bad arguments, or fn cannot be pickled.
            Exception: the first exception fn raised (Dask keeps the worker's traceback).
            parrun.BrokenPool: pieces kept failing because their workers died, or the
                scheduler was lost (the client closes itself after ``timeout`` seconds).
        """
        return self._run(fn, arrays, out=out, grain=grain, reduce=None)

    def map_reduce(self, fn: Callable[..., Any], reduce: Callable[[Any, Any], Any],
                   *arrays: Any, initial: Any = _NOTHING,
                   grain: int | None = None) -> Any:
        """Fold ``fn`` over pieces of ``arrays`` with ``reduce`` on the cluster.

        Each task folds its tiles' results; the caller folds the tasks' partials (and
        ``initial``) as they arrive. ``reduce`` must be associative and commutative. A worker
        lost mid-reduction costs a re-run of its pieces, not a failure.
        """
        return self._run(fn, arrays, out=None, grain=grain, reduce=reduce, initial=initial)

    def _run(self, fn: Any, arrays: tuple, *, out: Any, grain: Any, reduce: Any,
             initial: Any = _NOTHING) -> Any:
        with self._maps_done:
            self._check_open()
            self._maps += 1
        try:
            return self._run_open(fn, arrays, out=out, grain=grain, reduce=reduce,
                                  initial=initial)
        except Exception as e:
            if self._is_cluster_lost(e):
                raise self._cluster_lost(e) from e
            raise
        finally:
            with self._maps_done:
                self._maps -= 1
                self._maps_done.notify_all()

    def _run_open(self, fn: Any, arrays: tuple, *, out: Any, grain: Any, reduce: Any,
                  initial: Any) -> Any:
        since = time.perf_counter()
        check_fn(fn, reduce)
        arrs = check_arrays(arrays)
        n = arrs[0].shape[0]
        row_bytes = sum(a.itemsize * math.prod(a.shape[1:]) for a in arrs)
        if grain is not None:
            tile = check_grain(grain)
        else:
            tile = max(1, TILE_BYTES // max(1, row_bytes))
        if out is not None:
            out = check_out(out, n)
            check_ufunc_out(fn, arrs, out)
            _shm.check_not_released(out)  # (as the local pool refuses it)
            # Rows of out that overlap other rows of an input: the input as it was, copied
            # now (a piece sent again after a lost worker read rows already written).
            arrs = [np.array(a) if _overlaps_across_rows(a, out) else a for a in arrs]
        for a in arrs:
            _shm.check_not_released(a)
        if n == 0:  # nothing to split: learn the result's type from fn, as the local pool does
            self.last_stats = parrun.JobStats(0, 0, 0, time.perf_counter() - since, ())
            if reduce is not None:
                if initial is _NOTHING:
                    raise ValueError("map_reduce of empty arrays with no initial value")
                return initial
            if out is not None:
                return out
            res = check_first_result(self.submit(fn, *arrs).result(), 0, 0)  # on a worker
            return parrun.empty((0, *res.shape[1:]), res.dtype)
        fn_s = self._ship(fn, "fn")
        red_s = self._ship(reduce, "reduce") if reduce is not None else None
        takes_out = accepts_out(fn, len(arrs))
        spec = _MapSpec(tile=tile, takes_out=takes_out,
                        out_dtype=None if out is None else out.dtype,
                        out_trail=() if out is None else tuple(out.shape[1:]),
                        out_sent=out is not None and takes_out,
                        reduce=reduce is not None, blas_threads=self.blas_threads)
        self._threads = self._count_threads()
        bounds = _split(n, row_bytes, tile, self._threads, explicit=grain is not None)
        acc, allocated = initial, None
        early: dict[int, Any] = {}  # pieces that finished before rows 0:...
        per_worker: dict[str, list[int]] = {}
        resent = [0]  # pieces sent again after their workers were lost
        try:
            sent = [*arrs, out] if spec.out_sent else arrs
            def reship() -> tuple[_Shipped, _Shipped | None]:
                return (self._ship(fn, "fn"),
                        self._ship(reduce, "reduce") if reduce is not None else None)

            for r in self._run_pieces(spec, fn_s, red_s, sent, bounds, reship, resent):
                w = per_worker.setdefault(r.address, [r.pid, 0, 0, 0])
                w[1] += bounds[r.lo] - r.lo
                w[2] += 1
                w[3] += r.busy_ns
                _apply_changes(fn_s.arrays, r.fn_changes)
                value = _unpacked(r.value)
                if reduce is not None:
                    acc = value if acc is _NOTHING else reduce(acc, value)
                    continue
                if out is None:
                    # As on the local pool, the first rows' result decides out's dtype and
                    # shape: pieces that finish before it wait here.
                    early[r.lo] = value
                    if 0 not in early:
                        continue
                    first = early[0]
                    out = allocated = parrun.empty((n, *first.shape[1:]), first.dtype)
                for lo, v in (early.items() if early else ((r.lo, value),)):
                    # Each piece chose its dtype from its own first tile: check, never cast.
                    store_result(out[lo:bounds[lo]], v, lo, bounds[lo], allocated is not None)
                early.clear()
        except BaseException:
            if allocated is not None:
                allocated.release()
            raise
        finally:  # (a failed call's too, as on the local pool)
            wall = time.perf_counter() - since
            self.last_stats = parrun.JobStats(
                items=n, pieces=len(bounds), steals=0, wall_s=wall,
                workers=tuple(parrun.WorkerStats(k, w[0], w[1], w[2], 0, w[3] / 1e9,
                                                 max(0.0, wall - w[3] / 1e9))
                              for k, w in enumerate(per_worker.values())),
                recovered=resent[0])
        if reduce is not None:
            if acc is _NOTHING:
                raise ValueError("map_reduce of empty arrays with no initial value")
            return acc
        return out

    def _run_pieces(self, spec: _MapSpec, fn_s: _Shipped, red_s: _Shipped | None,
                    arrs: list[np.ndarray], bounds: dict[int, int],
                    reship: Callable[[], tuple[_Shipped, _Shipped | None]],
                    resent: list[int]) -> Iterator[_PieceResult]:
        """Scatter each piece, run a task on it, yield the results as they complete; send a
        piece again if its input was lost with a worker, with the functions shipped again
        (``reship``: their big arrays may have been lost with it too), counted in
        ``resent[0]``."""
        client = self._client
        red = (red_s.payload, red_s.external) if red_s is not None else (None, ())
        lost_rounds: dict[int, int] = {}

        def send(los: list[int]) -> list[Any]:
            data = [tuple(np.array(a[lo:bounds[lo]]) if self._in_process
                          else _plain(a[lo:bounds[lo]]) for a in arrs) for lo in los]
            pieces = client.scatter(data, direct=self.direct, hash=False,
                                    timeout=self.timeout)
            futs = []
            for lo, piece in zip(los, pieces):
                t = client.submit(_run_piece, spec, fn_s.payload, fn_s.external, *red, lo,
                                  piece, pure=False, key=f"parrun-piece-{lo}-{piece.key}")
                t.lo = lo
                futs.append(t)
            return futs

        futs = send(sorted(bounds))
        ac = distributed.as_completed(futs, loop=client.loop)
        try:
            for batch in ac.batches():
                done = [f for f in batch if f.status == "finished"]
                lost: list[Any] = []
                if done:
                    try:
                        yield from client.gather(done, direct=self.direct)
                    except (FutureCancelledError, cf.CancelledError):
                        # A result lost with its worker between its status and this gather
                        # (seen 1 run in 6 with the worker killed mid-map): the others one by
                        # one, the lost ones sent again below.
                        for f in done:
                            try:
                                got = client.gather(f, direct=self.direct)
                            except (FutureCancelledError, cf.CancelledError):
                                lost.append(f)
                            else:
                                yield got
                for f in batch:
                    if f.status == "finished" and f not in lost:
                        continue
                    if f not in lost and not _lost(f):
                        raise _remote_error(f)
                    if client.status != "running":
                        raise self._cluster_lost(None)
                    k = lost_rounds[f.lo] = lost_rounds.get(f.lo, 0) + 1
                    if k > RESEND_ROUNDS:
                        raise parrun.BrokenPool(
                            f"the piece of rows {f.lo}:{bounds[f.lo]} was lost with its Dask "
                            f"worker {k} times; giving up (is the cluster losing workers?)")
                    fn_s, red_s = reship()  # cached on the cluster unless lost
                    red = (red_s.payload, red_s.external) if red_s is not None else (None, ())
                    ac.update(send([f.lo]))
                    resent[0] += 1
        except distributed.KilledWorker as e:
            raise parrun.BrokenPool(f"Dask gave up on a piece whose workers kept dying: "
                                    f"{e}") from e
        finally:
            ac.clear()
            client.cancel([f for f in futs if not f.done()])

    # -- tasks ------------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        """Run ``fn(*args, **kwargs)`` on a Dask worker; return a
        ``concurrent.futures.Future``.

        ``fn`` and the objects in its arguments are shipped by value; their arrays of 1 MiB or
        more are put on the cluster once (keyed by content, kept across calls): broadcast to
        every worker when held inside an object (model weights), sent to one when passed
        directly. Exceptions end up on the future; a task whose worker died is re-run by
        Dask, and sent again if its input died with it.
        """
        self._check_open()
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        f = _TaskFuture(self._running_now)
        try:
            fn_s = self._ship(fn, "fn")
            local = frozenset(id(a) for a in (*args, *kwargs.values())
                              if isinstance(a, np.ndarray))
            args_s = self._ship((args, kwargs), "the task's arguments", local)
            self._tasks.add(f)
            self._submit_task(f, fn, args, kwargs, fn_s, args_s, 0)
        except Exception as e:
            self._tasks.discard(f)
            if self._is_cluster_lost(e):
                raise self._cluster_lost(e) from e
            raise
        return f

    def _submit_task(self, f: _TaskFuture, fn: Any, args: tuple, kwargs: dict,
                     fn_s: _Shipped, args_s: _Shipped, resent: int) -> None:
        d = self._client.submit(_run_task, self.blas_threads, fn_s.payload, fn_s.external,
                                args_s.payload, args_s.external, pure=False)
        f._dask = d

        def guarded(step: Callable[[Any], None]) -> Callable[[Any], None]:
            """``step``, unless the future is done; an exception in it fails the future: it
            is never left pending."""
            def run(arg: Any) -> None:
                _delivering.on = getattr(_delivering, "on", 0) + 1
                try:
                    if not f.done():
                        step(arg)
                except BaseException as e:
                    if not f.done() and f.set_running_or_notify_cancel():
                        f.set_exception(self._cluster_lost(e) if self._is_cluster_lost(e)
                                        else e)
                finally:
                    _delivering.on -= 1
                    if f.done():
                        self._tasks.discard(f)
                        # The Dask future would keep the result on its worker for as long
                        # as the caller keeps this future.
                        f._dask = None
            return run

        @guarded
        def deliver(result: Any) -> None:
            value, fn_changes, args_changes = result
            _apply_changes(fn_s.arrays, fn_changes)
            _apply_changes(args_s.arrays, args_changes)
            value = _unpacked(value)
            if f.set_running_or_notify_cancel():
                f.set_result(value)

        @guarded
        def done(d: Any) -> None:
            if d.status == "finished":
                deliver(d.result())
                return
            if _lost(d) and not self._closed and self._client.status != "running":
                # Cancelled by a client that lost its scheduler: sent again now, the task
                # could land after the client's close cancels its futures, and wait forever
                # (seen once in CI).
                raise self._cluster_lost(None)
            if _lost(d) and not self._closed and resent < RESEND_ROUNDS:
                s2 = self._ship((args, kwargs), "the task's arguments",
                                frozenset(id(a) for a in (*args, *kwargs.values())
                                          if isinstance(a, np.ndarray)))
                self._submit_task(f, fn, args, kwargs, self._ship(fn, "fn"), s2,
                                  resent + 1)
                return
            if d.status == "error" and isinstance(d.exception(), distributed.KilledWorker):
                exc: BaseException = parrun.BrokenPool(
                    f"Dask gave up on the task: the workers running it kept dying "
                    f"({d.exception()})")
                exc.__cause__ = d.exception()
            elif d.status == "error":
                exc = _remote_error(d)
            else:
                exc = cf.CancelledError(f"the Dask task was {d.status}")
            if f.set_running_or_notify_cancel():
                f.set_exception(exc)

        def on_done(d: Any) -> None:
            # With other tasks in flight, a finished task's result is fetched by the fetcher
            # thread, many per round trip. A task alone is fetched here: handing it to
            # another thread costs ~5 ms (measured: 16 ms a round trip instead of 11).
            # Anything else (an error, a lost worker) is settled here too.
            if d.status == "finished" and not f.done() and not self._closed and \
                    self._tasks.count() > 1:
                self._fetcher().fetch(d, deliver, done)
            else:
                done(d)

        d.add_done_callback(on_done)

    def _fetcher(self) -> _Fetcher:
        with self._cache_lock:
            if self._fetch is None:
                self._fetch = _Fetcher(self._client)
                self._fetch.start()
            return self._fetch


def _split(n: int, row_bytes: int, tile: int, threads: int, explicit: bool) -> dict[int, int]:
    """Pieces of whole tiles: ``{lo: hi}``. A few per worker thread; with no explicit grain
    (cheap rows, presumably) none under ``MIN_PIECE_BYTES``; none over ``MAX_PIECE_BYTES``."""
    tiles = -(-n // tile)
    count = min(tiles, threads * PIECES_PER_THREAD)
    if not explicit:
        count = min(count, max(threads, (n * row_bytes) // MIN_PIECE_BYTES))
    count = max(1, count, -(-(n * row_bytes) // MAX_PIECE_BYTES))
    count = min(count, tiles)
    rows = -(-tiles // count) * tile
    return {lo: min(n, lo + rows) for lo in range(0, n, rows)}
