"""A pool's maps reuse the segments they made for themselves (outputs, shared copies of
plain inputs) once no view of them is left, and free them when the pool closes; a segment
whose handle was pickled is never reused (``parrun._shm``, Recycling)."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import time

import numpy as np
import pytest
from conftest import shm_segments, wait_until

import parrun
from parrun import _shm
from parrun._errors import SharedMemoryError

pytestmark = pytest.mark.timeout(60)

N = 100_000


def mine() -> set[str]:
    return shm_segments(os.getpid())


def _fill_where(a, out=None):
    """sqrt where a >= 0; elsewhere ``out`` is left as it was (zeros when fn made it)."""
    if out is None:
        out = np.zeros_like(a)
    np.sqrt(a, out=out, where=a >= 0)
    return out


def _sum_when_told(a, flag):
    flag[0] = 1
    deadline = time.monotonic() + 20
    while flag[1] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    return float(a.sum())


def _fail_late(t):
    if t[-1] >= N - 10:
        raise ValueError("row near the end")
    return t * 2


def test_a_loop_of_maps_without_out_reuses_its_segments_and_gets_every_answer():
    x = np.random.default_rng(0).random(N)
    with parrun.Pool(2) as pool:
        before = mine()
        seen = []
        y = None
        for k in range(6):
            # x + k is a plain array: copied into a segment, as the output is made, each call
            y = pool.map(np.sqrt, x + k)
            np.testing.assert_array_equal(y, np.sqrt(x + k))
            seen.append(mine() - before)
        assert seen[2] == seen[3] == seen[4] == seen[5], seen  # nothing new after 2 calls
        assert len(seen[5]) <= 3
        kept = seen[5]
        del y
    gc.collect()
    assert not (mine() & kept), "the pool closed with segments it kept still in /dev/shm"


def _column_major(a, out=None):
    """1 where this row block is laid out column by column (F order), in ``out`` if given."""
    flag = float(a.strides[0] < a.strides[1]) + (2 * (out.strides[0] < out.strides[1])
                                                  if out is not None and out.ndim == 2 else 0)
    if out is None:
        return np.full(len(a), flag)
    out[:] = flag
    return out


def test_plain_f_ordered_arrays_reach_fn_in_f_order():
    # Copied into C-ordered segments once segments were reused (asshared, before, kept F
    # order): fn saw another layout than it was given.
    a = np.asfortranarray(np.arange(600.0).reshape(200, 3))
    out = np.asfortranarray(np.zeros((200, 3)))
    with parrun.Pool(2) as pool:
        for _ in range(2):  # a new segment, then a kept one
            np.testing.assert_array_equal(pool.map(_column_major, a), np.ones(200))
            got = pool.map(_column_major, a, out=out)
            assert got is out and (out == 3).all(), out[:3]


def test_holes_that_fn_leaves_in_a_reused_output_read_as_zeros():
    a = parrun.asshared(np.where(np.arange(N) % 3 == 0, -1.0, 4.0))
    with parrun.Pool(2) as pool:
        y = pool.map(np.sqrt, parrun.asshared(np.full(N, 49.0)))
        first = y.segment
        del y  # kept: every element 7.0
        z = pool.map(_fill_where, a)
        assert z.segment == first  # the test means nothing unless the segment came back
        np.testing.assert_array_equal(z, np.where(a < 0, 0.0, 2.0))


def test_an_array_whose_handle_went_elsewhere_is_not_reused():
    with parrun.Pool(1) as a_pool, parrun.Pool(1) as other:
        flag = parrun.zeros(2, np.int64)
        y = a_pool.map(np.sqrt, parrun.asshared(np.full(N, 4.0)))
        name = y.segment
        fut = other.submit(_sum_when_told, y, flag)  # the handle, pickled to another pool
        assert wait_until(lambda: flag[0] == 1)
        del y
        gc.collect()
        z = a_pool.map(np.sqrt, parrun.asshared(np.full(N, 9.0)))
        assert z.segment != name
        flag[1] = 1
        assert fut.result(timeout=30) == 2.0 * N  # its memory still holds y's values
        del fut
        gc.collect()
        assert wait_until(lambda: name not in mine())  # unlinked as before, never kept
        flag.release()


def test_a_pickled_output_is_unlinked_when_dropped():
    with parrun.Pool(2) as pool:
        y = pool.map(np.sqrt, parrun.asshared(np.full(N, 4.0)))
        name = y.segment
        pickle.dumps(y)
        del y
        gc.collect()
        assert name not in mine()


def test_release_still_frees_a_map_output_at_once():
    with parrun.Pool(2) as pool:
        y = pool.map(np.sqrt, parrun.asshared(np.full(N, 4.0)))
        name = y.segment
        y.release()
        assert name not in mine()


def test_a_failed_map_keeps_nothing_it_made():
    x = np.arange(float(N))
    with parrun.Pool(2) as pool:
        pool.map(np.sqrt, x)  # (a copy and an output kept)
        before = mine()
        with pytest.raises(ValueError, match="near the end"):
            pool.map(_fail_late, x)
        gc.collect()
        # it took the two segments kept (a copy of x, an output) and unlinked them
        assert mine() < before


def test_the_recycler_keeps_at_most_its_limit_the_oldest_dropped():
    seg = _shm.RECYCLE_SLACK_BYTES
    rec = _shm.Recycler(limit=3 * seg)
    try:
        arrays = [_shm.scratch((seg,), np.dtype(np.uint8), rec) for _ in range(4)]
        names = [a.segment for a in arrays]
        while arrays:
            arrays.pop(0)  # dropped first to last
        gc.collect()
        assert rec.names == set(names[1:])  # the first went to make room for the fourth
        assert names[0] not in mine()
        big = _shm.scratch((4 * seg,), np.dtype(np.uint8), rec)
        big_name = big.segment
        del big
        gc.collect()
        assert big_name not in mine() and big_name not in rec.names  # over the limit
        again = _shm.scratch((seg,), np.dtype(np.uint8), rec)
        assert again.segment == names[1]  # the oldest kept, taken back
        del again
    finally:
        rec.close()
    assert not (set(names) & mine())


def test_no_room_in_dev_shm_frees_what_the_pools_keep(monkeypatch):
    rec = _shm.Recycler(limit=1 << 30)
    try:
        kept = _shm.scratch((1 << 20,), np.dtype(np.uint8), rec)
        name = kept.segment
        del kept
        assert rec.names == {name}
        real = _shm._create_fd
        calls = []

        def full_once(nbytes):
            calls.append(nbytes)
            if len(calls) == 1:
                raise SharedMemoryError("no room (a test)")
            return real(nbytes)

        monkeypatch.setattr(_shm, "_create_fd", full_once)
        fd = os.open(f"/dev/shm/{name}", os.O_RDONLY)  # as a worker's mapping holds it
        try:
            a = parrun.empty(4 << 20, np.uint8)  # bigger than what is kept: a new segment
            assert len(calls) == 2 and not rec.names and name not in mine()
            assert os.fstat(fd).st_size == 0  # its pages freed, though still open
        finally:
            os.close(fd)
        a.release()
    finally:
        rec.close()


def test_a_child_of_os_fork_leaves_the_segments_its_parent_keeps():
    with parrun.Pool(1) as pool:
        pool.map(np.sqrt, parrun.asshared(np.full(N, 4.0)))  # its output, kept
        kept = pool._own_segments() & mine()
        pid = os.fork()
        if pid == 0:  # the child: no room in /dev/shm frees what *its* pools keep: none
            try:
                _shm._clear_recyclers()
                pool._recycler.clear()
            finally:
                os._exit(0)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert kept <= mine()
        y = pool.map(np.sqrt, parrun.asshared(np.full(N, 9.0)))  # takes it back, intact
        assert y.segment in kept
        np.testing.assert_array_equal(y, np.full(N, 3.0))


def test_a_child_of_os_fork_reads_what_it_inherited_while_the_parent_maps_on():
    with parrun.Pool(1) as pool:
        y = pool.map(np.sqrt, parrun.asshared(np.full(N, 4.0)))  # 2.0 everywhere
        go_r, go_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: waits for the parent's next map, then reads y
            try:
                signal.alarm(30)
                os.read(go_r, 1)
                os.write(res_w, repr(float(y.sum())).encode())
            finally:
                os._exit(0)
        os.close(go_r)
        os.close(res_w)
        try:
            name = y.segment
            del y
            gc.collect()
            z = pool.map(np.sqrt, parrun.asshared(np.full(N, 9.0)))  # y's segment, if kept
            os.write(go_w, b"x")
            got = os.read(res_r, 100)
            assert z.segment != name
            assert float(got) == 2.0 * N
        finally:
            os.close(go_w)  # (the child's read ends, whatever happened)
            os.close(res_r)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_a_child_of_os_fork_does_not_map_what_the_pool_keeps():
    with parrun.Pool(1) as pool:
        pool.map(np.sqrt, parrun.asshared(np.full(N, 4.0)))
        kept = pool._recycler.names
        assert kept
        r, w = os.pipe()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(ready_w, b"x")  # (past os.fork(), its hooks run)
                os.read(r, 1)  # (until the parent has looked)
            finally:
                os._exit(0)
        try:
            os.read(ready_r, 1)
            os.close(ready_r)
            os.close(ready_w)
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
            assert not [n for n in kept if n in maps]  # it held their space for its life
        finally:
            os.write(w, b"x")
            os.waitpid(pid, 0)
            os.close(r)
            os.close(w)


def test_the_recycler_counts_pages_and_keeps_at_most_64_segments():
    rec = _shm.Recycler(limit=1 << 30)
    small = _shm.Recycler(limit=3 * mmap_page())
    try:
        arrays = [_shm.scratch((8,), np.dtype(np.uint8), rec) for _ in range(70)]
        names = [a.segment for a in arrays]
        while arrays:
            arrays.pop(0)
        assert rec.names == set(names[6:])  # 64: the first 6 dropped, unlinked
        assert not (set(names[:6]) & mine())
        arrays = [_shm.scratch((1,), np.dtype(np.uint8), small) for _ in range(4)]
        while arrays:
            arrays.pop(0)
        assert len(small.names) == 3  # a byte takes a page of /dev/shm
    finally:
        rec.close()
        small.close()


def mmap_page() -> int:
    import mmap
    return mmap.PAGESIZE


def test_nothing_is_kept_while_dev_shm_is_short_of_room(monkeypatch):
    monkeypatch.setattr(_shm, "_shm_short", lambda: True)
    with parrun.Pool(1) as pool:
        y = pool.map(np.sqrt, parrun.asshared(np.full(N, 4.0)))
        name = y.segment
        del y
        gc.collect()
        assert name not in mine() and not pool._own_segments() & {name}


def test_ctrl_c_as_a_kept_segment_is_taken_back_leaves_nothing(monkeypatch):
    rec = _shm.Recycler(limit=1 << 30)
    try:
        a = _shm.scratch((1000,), np.dtype(np.float64), rec)
        name = a.segment
        del a
        assert rec.names == {name}
        real = _shm._index_add

        def interrupted(*args):
            raise KeyboardInterrupt

        monkeypatch.setattr(_shm, "_index_add", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _shm.scratch((1000,), np.dtype(np.float64), rec)
        monkeypatch.setattr(_shm, "_index_add", real)
        assert name not in mine() and not rec.names and name not in _shm._owned
    finally:
        rec.close()
