"""Shared arrays: creation, handles, cross-process visibility, lifetime and security."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap

import cloudpickle
import numpy as np
import pytest
from conftest import TIMEOUT, alive, shm_segments, wait_until

import parrun


def test_constructors_return_shared_arrays():
    a = parrun.empty((3, 4), np.float32)
    z = parrun.zeros(5, np.int16)
    f = parrun.full((2, 2), 7.5)
    s = parrun.asshared(np.arange(6).reshape(2, 3))
    for arr in (a, z, f, s):
        assert isinstance(arr, parrun.SharedArray) and isinstance(arr, np.ndarray)
        assert parrun.is_shared(arr)
    assert a.shape == (3, 4) and a.dtype == np.float32
    assert z.dtype == np.int16 and not z.any()
    assert f.dtype == np.float64 and (f == 7.5).all()
    np.testing.assert_array_equal(s, np.arange(6).reshape(2, 3))
    assert parrun.asshared(s) .segment == s.segment  # already shared: no copy
    assert not parrun.is_shared(np.arange(3))


def test_arithmetic_results_are_plain_arrays():
    a = parrun.full(4, 2.0)
    assert type(a + 1) is np.ndarray
    assert type(a[1:]) is parrun.SharedArray
    assert float(a.sum()) == 8.0


@pytest.mark.parametrize("dtype", [object, np.dtype([("a", "O")])])
def test_object_dtype_is_refused(dtype):
    with pytest.raises(TypeError, match="Python objects"):
        parrun.empty(3, dtype)
    with pytest.raises(TypeError, match="Python objects"):
        parrun.asshared(np.array([1, "x"], dtype=object))


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match="negative"):
        parrun.empty((2, -1))
    for shape in (2.5, (2, 3.0), "3"):  # as NumPy: not cut down to an int
        for make in (parrun.empty, parrun.zeros):
            with pytest.raises(TypeError, match="shape must be an int or a sequence"):
                make(shape)
    for shape in (np.array([2, 3]), range(2, 4), [2, 3]):
        a = parrun.zeros(shape)
        assert a.shape == tuple(shape)
        a.release()


def test_handle_of_512_mib_array_is_small():
    a = parrun.empty(2**27, np.float32)  # 512 MiB
    try:
        assert len(pickle.dumps(a)) < 1024
        assert len(cloudpickle.dumps(a)) < 1024
        assert len(pickle.dumps(a[::3])) < 1024
        assert len(cloudpickle.dumps(lambda: a[5:].sum())) < 4096
        assert len(parrun._shm.dumps(lambda: np.asarray(a)[:9].sum())) < 4096
    finally:
        a.release()


VIEWS = {
    "whole": lambda a: a,
    "slice": lambda a: a[3:17],
    "strided": lambda a: a[::3, 1::2],
    "negative": lambda a: a[::-1, ::-2],
    "transposed": lambda a: a.T,
    "reshaped": lambda a: a.reshape(-1)[5:95].reshape(9, 10),
    "fortran": lambda a: np.asfortranarray(a).view(parrun.SharedArray),  # a copy: not shared
    "readonly": lambda a: _readonly(a[2:]),
}


def _readonly(v):
    v.flags.writeable = False
    return v


@pytest.mark.parametrize("name", sorted(VIEWS))
@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps])
def test_views_round_trip(name, dumps):
    a = parrun.asshared(np.arange(20 * 30, dtype=np.float64).reshape(20, 30))
    v = VIEWS[name](a)
    data = dumps(v)
    w = pickle.loads(data)
    np.testing.assert_array_equal(w, v)
    assert w.strides == v.strides and w.dtype == v.dtype
    if parrun.is_shared(v):
        assert len(data) < 1024
        assert np.shares_memory(w, a)
        assert w.flags.writeable == v.flags.writeable
    else:
        assert len(data) > v.nbytes  # not shared: pickled by value
    a.release()


CHILD = textwrap.dedent("""
    import pickle, sys
    import numpy as np
    import parrun
    v = pickle.loads(sys.stdin.buffer.read())
    assert v.sum() == 0
    v[:] = 7
    print("ok", flush=True)
""")


def test_another_process_sees_and_writes_the_same_memory():
    a = parrun.zeros((100, 10), np.int64)
    view = a[10:20]
    r = subprocess.run([sys.executable, "-c", CHILD], input=pickle.dumps(view),
                       capture_output=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr.decode()
    assert (a[10:20] == 7).all() and a[:10].sum() == 0 and a[20:].sum() == 0
    # The child attached without registering the segment with its resource tracker: the
    # segment survives its exit (CPython 3.11's SharedMemory would have unlinked it).
    assert a.segment in shm_segments()
    assert b"leaked" not in r.stderr
    a.release()


def test_release_and_context_manager_unlink():
    a = parrun.empty(10)
    name = a.segment
    assert name in shm_segments()
    a.release()
    assert name not in shm_segments()
    a.release()  # idempotent
    with parrun.zeros(4) as b:
        name = b.segment
        assert name in shm_segments()
    assert name not in shm_segments()


def test_garbage_collection_of_last_view_unlinks():
    a = parrun.empty((10, 10))
    name = a.segment
    v = a[2:4]
    del a
    gc.collect()
    assert name in shm_segments()  # a view is still alive
    del v
    gc.collect()
    assert name not in shm_segments()


def test_segments_are_private_and_unguessable():
    arrays = [parrun.empty(8) for _ in range(20)]
    names = [a.segment for a in arrays]
    assert len(set(names)) == len(names)
    for name in names:
        assert name.startswith(f"parrun_{os.getpid()}_")
        token = name.rsplit("_", 1)[1]
        assert len(token) * 4 >= 64
        int(token, 16)
        mode = stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode)
        assert mode == 0o600, oct(mode)
    for a in arrays:
        a.release()


def test_unpickling_a_released_array_fails_clearly():
    a = parrun.empty(4)
    handle = parrun._shm.handle_of(a)
    a.release()
    with pytest.raises(parrun.SharedMemoryError, match="no longer exists"):
        parrun._shm.from_handle(handle)


def _fill(a, v):
    a[:] = v
    return float(a.sum())


def test_a_released_array_is_refused_not_sent_as_a_copy(pool):
    # Still mapped here after release(), it went to the workers by value: what a task wrote
    # into it was lost, with no error.
    a = parrun.zeros(1000)
    v = a[10:20]
    name = a.segment
    a.release()
    with pytest.raises(ValueError, match="was released"):  # (was a TypeError, "could not
        pool.submit(_fill, a, 2.0).result(timeout=TIMEOUT)  # be pickled", unlike map's)
    empty = parrun.zeros((0, 3))
    empty.release()
    with pytest.raises(ValueError, match="was released"):  # no rows: (was a TypeError)
        pool.map(np.sqrt, empty)
    for arr in (a, v):
        with pytest.raises(ValueError, match="was released"):
            pool.map(np.sqrt, arr)
        with pytest.raises(ValueError, match="was released"):
            pool.map(np.sqrt, np.ones(len(arr)), out=arr)
        with pytest.raises(ValueError, match="was released"):
            pickle.dumps(arr)
    a[:] = 1.0  # still an array here
    b = np.array(a)  # a copy goes as usual
    assert pool.submit(_fill, b, 2.0).result(timeout=TIMEOUT) == 2000.0
    del a, v, arr
    gc.collect()
    assert name not in parrun._shm._released  # forgotten with its last view


PARENT = textwrap.dedent("""
    import sys, time
    import numpy as np
    import parrun
    keep = [parrun.empty(1000) for _ in range(3)]
    pool = parrun.Pool(2)
    out = pool.map(np.sqrt, keep[0])
    print(" ".join(map(str, pool.pids)), flush=True)
    if sys.argv[1] == "busy":
        pool.map(lambda x: (time.sleep(30), x)[1], np.zeros(4), grain=1)
    time.sleep(60)
""")


@pytest.mark.parametrize("phase", ["idle", "busy"])
def test_sigkill_of_parent_leaves_no_segment_and_no_worker(phase):
    proc = subprocess.Popen([sys.executable, "-c", PARENT, phase], stdout=subprocess.PIPE)
    try:
        line = proc.stdout.readline().decode().split()
        pids = [int(p) for p in line]
        assert len(pids) == 2
        assert wait_until(lambda: len(shm_segments(proc.pid)) >= 4, timeout=5)
        if phase == "busy":
            import time

            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()

    def workers_gone():
        return not any(alive(p) for p in pids)

    assert wait_until(workers_gone, timeout=5), "workers outlived their parent"
    assert wait_until(lambda: not shm_segments(proc.pid), timeout=10), \
        f"segments left after SIGKILL: {shm_segments(proc.pid)}"


@pytest.mark.parametrize("shape", [2**62, (2**40, 2**40), (2**31, 2**31, 2**31)])
def test_shapes_too_big_for_any_process_are_refused(shape):
    with pytest.raises(ValueError, match="more than any process can map"):
        parrun.empty(shape)


MANY_ARRAYS_FEW_FILES = textwrap.dedent("""
    import resource, time, numpy as np, parrun
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    arrays = [parrun.full(10, float(i)) for i in range(2000)]
    with parrun.Pool(2) as pool:
        ys = [pool.map(np.negative, a) for a in arrays[:600]]
        assert all(np.array_equal(y, -a) for a, y in zip(arrays, ys))
        # tasks queued behind slow ones, each with arguments too big for an arena slot
        fs = [pool.submit(time.sleep, 0.2) for _ in range(2)]
        fs += [pool.submit(bytes.__len__, bytes(2000)) for _ in range(1000)]
        fs += [pool.submit(np.sum, a) for a in arrays]
        assert [f.result() for f in fs[2:1002]] == [2000] * 1000
        assert [f.result() for f in fs[1002:]] == [10.0 * i for i in range(2000)]
    for a in arrays + ys:
        a.release()
    print("ok")
""")


def test_thousands_of_shared_arrays_hold_no_open_files():
    # Each mapping held a duplicate of its segment's descriptor (mmap.mmap does): about
    # 1,000 live shared arrays, or queued tasks with big arguments, ran out of files
    # (OSError: Too many open files) under the usual limit of 1,024.
    r = subprocess.run([sys.executable, "-c", MANY_ARRAYS_FEW_FILES], capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 0 and r.stdout.split() == ["ok"], r.stderr[-3000:]


class _ThenCtrlC:
    """``fn``'s result, with Ctrl-C landing as it returns: SIGINT's handler raising
    ``KeyboardInterrupt`` there (``raised``), or a real SIGINT, whose handler runs at the
    interpreter's next check."""

    def __init__(self, fn, raised: bool = True):
        self.fn = fn
        self.raised = raised

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        if self.raised:
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGINT)
        return out


def test_ctrl_c_as_shm_open_returns_leaves_no_segment(monkeypatch):
    """The segment existed, unregistered from the tracker, with no one to unlink it: it
    outlived the process."""
    import types

    from parrun import _shm

    real = _shm._posixshmem
    before = shm_segments(os.getpid())
    monkeypatch.setattr(_shm, "_posixshmem", types.SimpleNamespace(
        shm_open=_ThenCtrlC(real.shm_open), shm_unlink=real.shm_unlink))
    with pytest.raises(KeyboardInterrupt):
        parrun.empty(10)
    monkeypatch.setattr(_shm, "_posixshmem", real)
    assert shm_segments(os.getpid()) == before


def test_ctrl_c_inside_release_still_unlinks_the_segment(monkeypatch):
    """Out of the owned table, the segment was left for the tracker at exit."""
    from parrun import _shm

    a = parrun.empty(1000)
    name = _shm.handle_of(a)[0]
    monkeypatch.setattr(_shm, "_index_remove", _ThenCtrlC(_shm._index_remove))
    with pytest.raises(KeyboardInterrupt):
        a.release()
    monkeypatch.undo()
    assert name not in shm_segments(os.getpid())


def test_ctrl_c_in_a_shared_array_s_finalizer_is_not_swallowed(monkeypatch):
    """Raised in ``__del__`` (unmapping) or the segment's finalizer, Python only printed
    "Exception ignored" and the program ran on: it is raised again just after."""
    import time

    from parrun import _shm

    class Libc:  # munmap, then Ctrl-C
        munmap = _ThenCtrlC(_shm._libc.munmap)
    for where in ("__del__", "finalizer"):
        a = parrun.asshared(np.ones(1000))
        name = _shm.handle_of(a)[0]
        if where == "__del__":
            monkeypatch.setattr(_shm, "_libc", Libc)
        else:
            monkeypatch.setattr(_shm, "_index_remove", _ThenCtrlC(_shm._index_remove))
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            del a  # (the last reference: no gc.collect(), whose other finalizers could
            time.sleep(5.0)  # take the signal sent again) (before: it ran to its end)
        # It cuts the sleep short, as a signal does (interrupt_main alone waited it out)
        assert time.monotonic() - t0 < 2.0, where
        monkeypatch.undo()
        assert name not in shm_segments(os.getpid()), where


def test_ctrl_c_as_the_task_thread_starts_leaves_no_thread_or_arena(monkeypatch):
    """The pool never saw them: the next submit made another of each, and close() left
    the first for the life of the process."""
    import threading

    real = threading.Thread.start
    before_segments = shm_segments(os.getpid())

    def start(self):  # a real SIGINT: the pool holds it while it makes the thread
        real(self)
        if self.name == "parrun-tasks":
            signal.raise_signal(signal.SIGINT)

    def task_threads():  # (other pools' too: this module's pool fixture has one)
        return {t for t in threading.enumerate() if t.name == "parrun-tasks"}
    before = task_threads()
    with parrun.Pool(1) as p:
        monkeypatch.setattr(threading.Thread, "start", start)
        with pytest.raises(KeyboardInterrupt):
            p.submit(pow, 2, 3)
        monkeypatch.undo()
        assert p.submit(pow, 2, 3).result(TIMEOUT) == 8
        assert len(task_threads() - before) == 1
    assert wait_until(lambda: task_threads() <= before)
    assert not shm_segments(os.getpid()) - before_segments
