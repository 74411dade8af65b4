"""parrun.map / map_reduce on real worker processes: results, stats, errors, crashes."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import gc
import math
import operator
import os
import signal
import threading
import time
import weakref

import numpy as np
import psutil
import pytest
from conftest import TIMEOUT, Counted, alive, shm_segments, wait_until

import parrun


def chain(x):
    return np.tanh(1.7 * x + 0.3) ** 2 - 0.5 * x


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.complex128, bool])
def test_map_matches_numpy(pool, dtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(10_001) * 5).astype(dtype)
    fn = (lambda t: t * 2) if dtype is not bool else np.logical_not
    y = pool.map(fn, x)
    np.testing.assert_array_equal(y, fn(x))
    assert y.dtype == fn(x).dtype and parrun.is_shared(y)
    y.release()


def test_map_with_a_grain_runs_only_a_small_first_piece_alone(pool):
    # With no out, map runs a first piece alone to learn the output; a grain of n / workers
    # must not make that piece a worker's whole share (the map would take twice as long).
    x = parrun.asshared(np.arange(400.0))
    y = pool.map(np.sqrt, x, grain=200)
    np.testing.assert_allclose(y, np.sqrt(np.arange(400.0)))
    st = pool.last_stats
    assert st.probe_items == 8 * pool.workers, st  # up to 8 rows for each worker's piece
    assert sum(w.items for w in st.workers) == 400  # the probe's rows too
    y.release()
    x.release()


def _sleep_a_row(x):
    time.sleep(0.02 * len(x))
    return x * 2


def test_map_of_dear_rows_runs_few_rows_first(pool):
    # With no out, the first rows run before the rest: 8 rows of 20 ms doubled such a map.
    # Once the cost of a row is known, they are a row a worker.
    x = parrun.asshared(np.arange(16.0))
    try:
        for _ in range(2):
            y = pool.map(_sleep_a_row, x)
            np.testing.assert_array_equal(y, x * 2)
            y.release()
        assert pool.last_stats.probe_items == pool.workers, pool.last_stats
    finally:
        x.release()


def test_stats_of_a_map_with_no_out_cover_the_whole_call(pool):
    # The first rows (run first, to learn out's shape) were left out of the workers' counts,
    # busy times and the wall time: half of this map's work was missing from its stats.
    x = parrun.asshared(np.arange(16.0))
    try:
        t0 = time.perf_counter()
        y = pool.map(_sleep_a_row, x, grain=1)
        elapsed = time.perf_counter() - t0
        y.release()
        st = pool.last_stats
        assert st.probe_items >= pool.workers, st
        assert sum(w.items for w in st.workers) == st.items == 16, st
        assert sum(w.pieces for w in st.workers) == st.pieces == 16, st
        assert sum(st.busy_s) >= 16 * 0.02, st  # every row's sleep
        assert 0.8 * elapsed <= st.wall_s <= elapsed, (elapsed, st)
    finally:
        x.release()


def _pid_after_a_while(x):
    time.sleep(0.25 * len(x))
    return np.full(len(x), os.getpid())


def test_map_of_slow_rows_runs_its_first_rows_on_every_worker(pool):
    # The first rows, which give map's out its shape, ran in one worker while the others
    # waited: a map of as many slow rows as workers took two rows' time (or 8 on a first call).
    x = parrun.asshared(np.arange(2.0))
    try:
        for call in ("cost unknown", "cost known"):
            y = pool.map(_pid_after_a_while, x)
            pids = y.tolist()
            y.release()
            assert len(set(pids)) == 2, (call, pids, pool.last_stats)
            assert set(pids) <= set(pool.pids), (call, pids, pool.pids)
    finally:
        x.release()


def _cost_a_call(x, dear):
    if dear[0]:
        time.sleep(0.0005 * len(x))  # 0.5 ms a row
    else:
        time.sleep(0.002)  # 2 ms a call, whatever its rows
    return x * 2


def test_pieces_start_where_the_last_map_of_the_function_grew_them(pool):
    # For a function with a cost a call, pieces grow (Growth); each map grew them again from
    # one row, every small piece paying that cost (4000 rows: 35 pieces a map, 19 now).
    # If pieces that long then cost far more a row, they are sized again from one row.
    x, dear = parrun.asshared(np.arange(4000.0)), parrun.zeros(1, np.int8)
    fn = functools.partial(_cost_a_call, dear=dear)  # dear: shared, so fn stays the same
    try:
        pieces = []
        for _ in range(4):
            y = pool.map(fn, x)
            np.testing.assert_array_equal(y, x * 2)
            y.release()
            pieces.append(pool.last_stats.pieces)
        assert pieces[-1] <= 24, pieces
        dear[0] = 1
        y = pool.map(fn, x[:2000])  # 0.5 s on 2 workers
        np.testing.assert_array_equal(y, x[:2000] * 2)
        y.release()
        assert pool.last_stats.pieces >= 100, (pieces, pool.last_stats)
    finally:
        x.release()
        dear.release()


def _sleep_by_data(a):
    time.sleep(0.001 + a[:, 0].sum() * 1e-6)  # 1 ms a call, plus a[i, 0] us a row
    return a * 2


def test_a_recalled_piece_size_does_not_hold_dearer_rows_on_one_worker(pool):
    # Pieces recalled from cheap rows of the same function took a worker's whole range of
    # dearer rows in one piece, call after call, while the other worker idled (1.0 s
    # against 0.6 s).
    cheap = np.ones((20000, 2))
    dear = np.ones((2000, 2))
    dear[:1000, 0] = 1000  # the first half 1 ms a row
    for _ in range(2):
        pool.map(_sleep_by_data, cheap).release()
    for _ in range(3):
        y = pool.map(_sleep_by_data, dear)
        np.testing.assert_array_equal(y, dear * 2)
        y.release()
        st = pool.last_stats
        assert st.wall_s < 0.75 * sum(st.busy_s), st  # both workers busy most of the call


def _writes_whether_it_shares(x, out):
    # 1 where x is the column left of out in the same mapping (not a copy of it)
    out[...] = x.ctypes.data - out.ctypes.data == -x.itemsize


def test_map_between_columns_of_one_array_does_not_copy_the_input(pool):
    # Two columns of one array share their bounds, not an element: the input was copied
    # (np.may_share_memory) before every such map.
    a = parrun.zeros((1000, 2))
    try:
        pool.map(_writes_whether_it_shares, a[:, 0], out=a[:, 1])
        assert a[:, 1].all(), "the input column was copied"
        pool.map(np.add, a[:, 1], a[:, 1], out=a[:, 0])
        np.testing.assert_array_equal(a[:, 0], 2.0)
    finally:
        a.release()


def test_map_chain_several_inputs_and_rows(pool):
    rng = np.random.default_rng(2)
    a = parrun.asshared(rng.standard_normal((5000, 7)).astype(np.float32))
    b = rng.standard_normal((5000, 7)).astype(np.float32)  # not shared: copied once
    y = pool.map(lambda p, q: chain(p) + q, a, b)
    np.testing.assert_allclose(y, chain(a) + b, rtol=1e-6)
    st = pool.last_stats
    assert st.items == 5000
    assert sum(w.items for w in st.workers) == 5000  # the probe's rows too
    assert st.pieces >= 2 and len(st.workers) == 2
    assert all(w.busy_s >= 0 and w.idle_s >= 0 for w in st.workers)
    assert "pieces" in str(st)
    # no out: the first items ran first, to learn the output; the report says so
    assert st.probe_items > 0 and f"the first {st.probe_items} ran first" in str(st)
    y.release()
    a.release()


def test_map_into_out(pool):
    x = parrun.asshared(np.linspace(0, 1, 30_000))
    out = parrun.empty(30_000)
    assert pool.map(np.sqrt, x, out=out) is out  # a ufunc: it writes into out itself
    np.testing.assert_allclose(out, np.sqrt(x))
    plain = np.zeros(30_000)  # a plain out: filled through a shared temporary
    assert pool.map(chain, x, out=plain) is plain
    np.testing.assert_allclose(plain, chain(x))

    def kernel(x, out):
        np.multiply(x, 3, out=out)

    pool.map(kernel, x, out=out, grain=1000)
    np.testing.assert_allclose(out, 3 * x)
    assert pool.last_stats.pieces >= 30  # pieces of at most 1000 rows
    x.release()
    out.release()


def test_map_in_place(pool):
    x = parrun.asshared(np.arange(10_000, dtype=np.float64))
    pool.map(lambda t: t + 1, x, out=x)
    np.testing.assert_array_equal(x, np.arange(1, 10_001))
    x.release()


def test_map_reduce(pool):
    rng = np.random.default_rng(3)
    x = parrun.asshared(rng.standard_normal(100_000))
    assert np.isclose(pool.map_reduce(np.sum, operator.add, x), x.sum())
    bins = np.linspace(-4, 4, 17)
    hist = parrun.map_reduce(lambda t: np.histogram(t, bins)[0], operator.add, x, pool=pool)
    np.testing.assert_array_equal(hist, np.histogram(x, bins)[0])
    assert pool.map_reduce(np.max, max, x) == x.max()
    empty = np.zeros(0)
    assert pool.map_reduce(np.sum, operator.add, empty, initial=5.0) == 5.0
    with pytest.raises(ValueError, match="empty"):
        pool.map_reduce(np.sum, operator.add, empty)
    x.release()


def test_map_reduce_result_outlives_the_copy_of_a_plain_input(pool):
    # A partial that is a view of the input came back as a view of the call's temporary copy
    # of a plain input, which the call then freed: the result could not be used ("released").
    x = np.arange(1000.0)
    best = pool.map_reduce(lambda a: a[:1], lambda p, q: p if p[0] <= q[0] else q, x)
    np.testing.assert_array_equal(best, [0.0])
    y = pool.map(np.sqrt, best)
    np.testing.assert_array_equal(y, [0.0])
    y.release()


_scratch = np.empty(0)


def _double_into_scratch(a):
    """2 * a in one scratch buffer, reused call after call (no allocation a call)."""
    global _scratch
    if len(_scratch) < len(a):
        _scratch = np.empty(len(a))
    np.multiply(a, 2, out=_scratch[:len(a)])
    return _scratch[:len(a)]


def test_map_with_no_out_keeps_each_first_result_before_fn_runs_again(pool):
    # The first rows' results were held as fn returned them until the worker's share ended:
    # a function returning the buffer it reuses gave wrong first rows (2 runs in 3).
    x = parrun.asshared(np.arange(1000.0))
    try:
        for _ in range(5):
            y = pool.map(_double_into_scratch, x, grain=1)
            np.testing.assert_array_equal(y, 2 * x)
            y.release()
        y = pool.map(lambda a: memoryview(2 * a), x)  # as with out given (was "shape ()")
        np.testing.assert_array_equal(y, 2 * x)
        y.release()
    finally:
        x.release()


def _blend(inp, out):
    return 0.5 * inp + 0.5 * out


def _scaled(x, out=None, k=2.0):
    return np.multiply(x, k, out=out)


def test_a_parameter_named_out_filled_by_the_arrays_gets_no_out(pool):
    # map passed out= to a function whose parameter `out` the arrays already filled:
    # "got multiple values for argument 'out'", with or without an out.
    a, b = parrun.asshared(np.arange(100.0)), parrun.asshared(3 * np.arange(100.0))
    try:
        y = pool.map(_blend, a, b)
        np.testing.assert_array_equal(y, _blend(a, b))
        out = parrun.zeros(100)
        assert pool.map(_blend, a, b, out=out) is out
        np.testing.assert_array_equal(out, _blend(a, b))
        # one array: out is free, and map fills it in place; two: the second is out
        assert pool.map(_scaled, a, out=out) is out
        np.testing.assert_array_equal(out, 2 * a)
        y2 = pool.map(_scaled, a, b)
        np.testing.assert_array_equal(y2, 2 * a)
        for arr in (y, out, y2):
            arr.release()
    finally:
        a.release()
        b.release()


def test_empty_and_tiny_inputs(pool):
    y = pool.map(np.negative, np.zeros((0, 3)))
    assert y.shape == (0, 3)
    y.release()
    y = pool.map(np.negative, np.ones(1))
    assert y.tolist() == [-1.0]
    y.release()


def _uneven(idx):
    out = np.empty(len(idx))
    for j, i in enumerate(idx):
        out[j] = np.sqrt(np.arange(1 + int(i) * 100, dtype=np.float64)).sum()
    return out


def test_uneven_work_is_stolen(pool):
    idx = parrun.asshared(np.arange(400))
    y = pool.map(_uneven, idx, grain=1)
    np.testing.assert_allclose(y, _uneven(idx))
    st = pool.last_stats
    assert st.steals >= 1  # worker 0's half is cheap: it must steal from worker 1
    assert all(w.items > 0 for w in st.workers)
    y.release()
    idx.release()


def test_exception_carries_worker_traceback_and_pool_survives(pool):
    def boom(x):
        if x[0] >= 500:
            raise KeyError(f"bad row {x[0]}")
        return x

    x = parrun.asshared(np.arange(1000))
    out = parrun.empty(1000, np.int64)
    with pytest.raises(KeyError, match="bad row") as info:
        pool.map(boom, x, out=out, grain=10)
    cause = info.value.__cause__
    assert isinstance(cause, parrun.RemoteTraceback)
    assert "boom" in str(cause) and "KeyError" in str(cause)
    np.testing.assert_array_equal(pool.map(np.negative, x), -x)  # still usable
    x.release()
    out.release()


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("no pickling here")

    def __call__(self, x):
        return x


def test_bad_arguments_give_clear_errors(pool):
    x = np.arange(10.0)
    with pytest.raises(TypeError, match="Python objects"):
        pool.map(lambda t: t, np.array([1, "a"], dtype=object))
    with pytest.raises(ValueError, match="same length"):
        pool.map(np.add, x, np.arange(11.0))
    with pytest.raises(ValueError, match="out has shape"):
        pool.map(np.negative, x, out=np.zeros(9))
    with pytest.raises(TypeError, match="dtype"):
        pool.map(lambda t: t * 1.5, x, out=parrun.zeros(10, np.int64))
    with pytest.raises(TypeError, match="callable"):
        pool.map(42, x)
    with pytest.raises(TypeError, match="could not be pickled"):
        pool.map(Unpicklable(), x)
    lock = threading.Lock()
    with pytest.raises(TypeError, match="could not be pickled"):
        pool.map(lambda t: (lock, t)[1], x)
    with pytest.raises(ValueError, match="0-dimensional"):
        pool.map(np.negative, np.float64(3.0))
    with pytest.raises(ValueError, match="grain"):
        pool.map(np.negative, x, grain=0)
    with pytest.raises(TypeError, match="grain"):
        pool.map(np.negative, x, grain=2.5)
    with pytest.raises(TypeError, match="at least one array"):
        pool.map(np.negative)
    with pytest.raises(ValueError, match="shape"):
        pool.map(lambda t: t[:1], np.arange(100.0), grain=10)
    with pytest.raises(TypeError, match="None"):
        pool.map(lambda t: None, x)
    with pytest.raises(ValueError, match="read-only"):
        ro = np.zeros(10)
        ro.flags.writeable = False
        pool.map(np.negative, x, out=ro)
    np.testing.assert_array_equal(pool.map(np.negative, x), -x)


def test_pool_and_executor_arguments_are_checked_at_once():
    # A float retries was taken; a str blas_threads failed with "'<' not supported"; a
    # NumPy int worker count was refused; an Executor's bad options waited for a submit.
    for kwargs, err, text in [({"retries": 1.5}, TypeError, "retries must be an int"),
                              ({"retries": -1}, ValueError, "retries must be 0 or more"),
                              ({"blas_threads": "2"}, TypeError, "blas_threads must be an int"),
                              ({"blas_threads": 0}, ValueError, "blas_threads must be greater"),
                              ({"workers": True}, TypeError, "workers must be an int"),
                              ({"workers": 2.0}, TypeError, "workers must be an int")]:
        with pytest.raises(err, match=text):
            parrun.Pool(**kwargs)
    for args, kwargs, err, text in [((2.0,), {}, TypeError, "max_workers must be an int"),
                                    ((True,), {}, TypeError, "max_workers must be an int"),
                                    ((1,), {"retries": 0.5}, TypeError, "retries"),
                                    ((1,), {"pinned": True}, TypeError, "unknown option.*pinned")]:
        with pytest.raises(err, match=text):
            parrun.Executor(*args, **kwargs)
    with parrun.Pool(np.int64(1), blas_threads=np.int32(1), retries=np.int64(1)) as p:
        assert p.workers == 1 and type(p.workers) is int and p.retries == 1
        np.testing.assert_array_equal(p.map(np.negative, np.arange(3.0)), [0, -1, -2])


def test_full_and_asshared_take_what_numpy_takes_and_refuse_masks():
    for fill in ([1, 2], np.arange(3.0), 7.5):
        a = parrun.full((2, np.size(fill)), fill)
        np.testing.assert_array_equal(a, np.full((2, np.size(fill)), fill))
        assert a.dtype == np.full((2, np.size(fill)), fill).dtype
        a.release()
    a = parrun.full(3, [1, 2, 3], dtype=np.int8)
    assert a.dtype == np.int8 and a.tolist() == [1, 2, 3]
    a.release()
    with pytest.raises(TypeError, match="masked array cannot be shared"):
        parrun.asshared(np.ma.masked_array([1.0, 2.0], mask=[False, True]))


def _nested_stdlib_pool():
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("forkserver")) as ex:
        return sum(ex.map(abs, [-1, -2, -3]))


def test_a_task_may_start_processes_of_its_own(pool):
    # Workers were daemons, and multiprocessing refuses children to a daemon ("daemonic
    # processes are not allowed to have children"); ProcessPoolExecutor's workers are not.
    assert pool.submit(_nested_stdlib_pool).result(timeout=TIMEOUT) == 6


def test_closed_pool_refuses_work():
    p = parrun.Pool(1)
    p.close()
    p.close()
    with pytest.raises(parrun.PoolClosedError, match="closed"):
        p.map(np.negative, np.ones(3))
    with pytest.raises(RuntimeError):
        p.map(np.negative, np.ones(3))
    assert "closed" in repr(p)


def test_workers_drop_the_oldest_functions_beyond_a_budget_of_bytes(pool1, monkeypatch):
    # Each closure over a plain array holds a copy of it in every worker: 20 closures of a
    # 16 MB array took workers from 47 to 370 MB. Beyond FN_CACHE_BYTES of pickles the
    # oldest go (shipped again if used again); the one just used always stays.
    monkeypatch.setattr(parrun._pool, "FN_CACHE_BYTES", 600 * 1024)
    counters = [parrun.zeros(1, np.int64) for _ in range(3)]
    x, out = parrun.asshared(np.arange(100.0)), parrun.empty(100)
    try:
        fns = [Counted(c, add=k) for k, c in enumerate(counters)]
        for fn in fns:
            fn.payload = np.random.default_rng(0).random(32768)  # 256 KiB, pickled by value

        def run(fn):
            pool1.map(fn, x, out=out)
            np.testing.assert_array_equal(out, x + fn.add)

        for fn in fns + fns[:1]:  # the first is the oldest when the third comes: dropped
            run(fn)
        assert [int(c[0]) for c in counters] == [2, 1, 1]  # the first shipped again
        run(fns[0])  # the one just used stays, whatever its size
        monkeypatch.setattr(parrun._pool, "FN_CACHE_BYTES", 4 * 2**20)
        for fn in fns + fns:  # all fit now: the second (dropped when the first came back)
            run(fn)           # is shipped again, once; the others stayed
        assert [int(c[0]) for c in counters] == [2, 2, 1]
    finally:
        for a in (*counters, x, out):
            a.release()


def test_function_is_shipped_once_per_worker(pool):
    counter = parrun.zeros(1, np.int64)

    fn = Counted(counter, add=1)
    x = parrun.asshared(np.arange(20_000.0))
    out = parrun.empty(20_000)
    for _ in range(5):
        pool.map(fn, x, out=out, grain=100)
    assert 1 <= counter[0] <= pool.workers  # at most once per worker, not per call or piece
    np.testing.assert_array_equal(out, x + 1)
    for a in (counter, x, out):
        a.release()


class FirstCallMarks:
    """Gives 1 for the rows of a process's first call and 0 after, the first call slow (as a
    numba kernel's first call in a process loads it from the disk cache)."""

    called = False

    def __call__(self, x):
        first = not self.called
        if first:
            # Long, so that a worker woken late on a busy machine still finds rows of its own
            # range left: the others are in their own first row meanwhile.
            time.sleep(1.0)
            self.called = True
        return np.full(len(x), int(first))


def test_every_worker_loads_a_new_function_in_its_first_call(pool):
    """A function's first call that proves slow wakes every worker, each running a piece, so
    later calls do not wait while one more worker loads it (found: at 2 workers, Mandelbrot's
    third call on a fresh pool was the first one not slowed by a worker's first use of the
    kernel)."""
    fn, out = FirstCallMarks(), parrun.zeros(64, np.int64)
    try:
        pool.map(fn, np.zeros(64), out=out)
        assert out.sum() == pool.workers, out  # each worker's first piece is one row
        pool.map(fn, np.zeros(64), out=out)
        assert out.sum() == 0, out
    finally:
        out.release()


def _spin_for(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _fixed_cost_a_call(x):
    _spin_for(1e-3)  # as a lookup table built per call, or a @ W reading all of W
    return x * 2


def _cost_a_row(x):
    _spin_for(0.5e-3 * len(x))
    return x * 2


def test_pieces_grow_for_a_function_with_a_cost_a_call(pool):
    # Sized by the cost a row alone, a piece of one row took the whole target and pieces
    # stayed one row long: 4000 calls of 1 ms, where a few dozen do.
    x, out = parrun.asshared(np.arange(4000.0)), parrun.empty(4000)
    try:
        for _ in range(2):
            pool.map(_fixed_cost_a_call, x, out=out)
            np.testing.assert_array_equal(out, x * 2)
            assert pool.last_stats.pieces <= 200, pool.last_stats
    finally:
        x.release()
        out.release()


def test_pieces_stay_small_for_rows_that_cost_the_same_in_any_piece(pool):
    # ... and rows whose cost does not fall in longer pieces stay in pieces of a row or so,
    # which the work stealing balances (no long piece left for the end).
    x, out = parrun.asshared(np.arange(200.0)), parrun.empty(200)
    try:
        pool.map(_cost_a_row, x, out=out)
        np.testing.assert_array_equal(out, x * 2)
        # (pieces of 1-2 rows: growth tries a few doublings, more on a loaded machine,
        # where a doubled piece can look cheaper a row; 118 were seen there)
        assert pool.last_stats.pieces >= 100, pool.last_stats
    finally:
        x.release()
        out.release()


def test_a_quick_first_call_wakes_only_the_workers_it_has_pieces_for(pool, monkeypatch):
    monkeypatch.setattr(parrun._pool, "LATE_WAKE_S", 5.0)  # this call ends long before
    x, out = parrun.asshared(np.arange(64.0)), parrun.empty(64)
    try:
        pool.map(lambda t: t - 1, x, out=out)  # a new function; 64 rows make one piece
        np.testing.assert_array_equal(out, x - 1)
    finally:
        x.release()
        out.release()
    assert [w.pieces > 0 for w in pool.last_stats.workers] == [True, False]


def _rebuild_slowly_in(pid: int):
    if os.getpid() == pid:
        time.sleep(2.5)  # this worker imports the function's module (numba, torch...) slowly
    return _a_millisecond_a_row


def _a_millisecond_a_row(x):
    time.sleep(1e-3 * len(x))
    return x * 2


class SlowToLoadIn:
    def __init__(self, pid: int):
        self.pid = pid

    def __reduce__(self):
        return _rebuild_slowly_in, (self.pid,)

    def __call__(self, x):
        return _a_millisecond_a_row(x)


def test_a_worker_slow_to_load_a_function_still_runs_a_piece_of_its_first_call():
    """A worker claims a piece before it loads the function: thieves done with their own
    ranges cannot take all of its range while it loads, so that it loads the function in
    this call, not in the next one while the others wait for it."""
    with parrun.Pool(2) as p:
        x = parrun.asshared(np.arange(1000.0))
        try:
            y = p.map(SlowToLoadIn(p.pids[1]), x)
            np.testing.assert_array_equal(y, x * 2)
            y.release()
        finally:
            x.release()
        st = p.last_stats
        assert st.workers[1].items >= 1, st


def test_workers_use_one_blas_thread(pool):
    def blas_threads(x):
        from threadpoolctl import threadpool_info

        n = max([i["num_threads"] for i in threadpool_info()] or [1])
        return np.full(len(x), n)

    assert set(pool.map(blas_threads, np.zeros(8), grain=1).tolist()) == {1}


def test_a_new_pools_idle_workers_burn_no_cpu_in_blas_threads():
    # threadpool_limits(1) in a forked worker restarted OpenBLAS's thread pool, whose thread
    # then polled for ~0.1 s of CPU beside the worker: a map sent meanwhile waited a tick
    # (~4 ms) behind it, and a cheap map's calls took 13 pieces and 8 ms each.
    psutil = pytest.importorskip("psutil")
    with parrun.Pool(2) as p:
        np.testing.assert_array_equal(p.map(np.sqrt, np.arange(16.0), grain=1),
                                      np.sqrt(np.arange(16.0)))
        procs = [psutil.Process(w.pid) for w in p.last_stats.workers]
        before = [sum(q.cpu_times()[:2]) for q in procs]
        time.sleep(0.3)
        burnt = [sum(q.cpu_times()[:2]) - b for q, b in zip(procs, before)]
        assert [q.num_threads() for q in procs] == [1, 1]
        assert max(burnt) < 0.03, burnt


@pytest.mark.parametrize("threads", [1, 2])
def test_blas_threads_gives_blas_that_many_threads(threads):
    def blas(a):
        from threadpoolctl import threadpool_info

        n = max([i["num_threads"] for i in threadpool_info()] or [1])
        return np.full(len(a), float(n)) + (a @ a.T).sum(axis=1) * 0

    a = np.ones((64, 64))
    with parrun.Pool(1, blas_threads=threads) as p:
        assert set(p.map(blas, a, grain=64).tolist()) == {float(threads)}


def test_pinned_workers():
    with parrun.Pool(2, pin=True) as p:
        import psutil

        cpus = sorted(os.sched_getaffinity(0))
        for k, pid in enumerate(p.pids):
            assert psutil.Process(pid).cpu_affinity() == [cpus[k % len(cpus)]]
        assert p.map(np.negative, np.ones(4)).tolist() == [-1] * 4


def test_pool_starts_while_parent_has_threads():
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        with parrun.Pool(2) as p:
            assert p.startup_s < 30
            assert p.map(np.negative, np.ones(100)).sum() == -100
    finally:
        stop.set()
        t.join()


def test_default_pool_is_lazy_and_reused(monkeypatch):
    a = parrun.default_pool()
    assert parrun.default_pool() is a
    assert np.array_equal(parrun.map(np.negative, np.ones(5)), -np.ones(5))
    a.close()
    b = parrun.default_pool()
    assert b is not a and not b.closed


def test_worker_count_from_environment(monkeypatch):
    monkeypatch.setenv("PARRUN_NUM_WORKERS", "3")
    assert parrun.default_workers() == 3
    monkeypatch.setenv("PARRUN_NUM_WORKERS", "zero")
    with pytest.raises(ValueError, match="PARRUN_NUM_WORKERS"):
        parrun.default_workers()
    monkeypatch.delenv("PARRUN_NUM_WORKERS")
    assert parrun.default_workers() == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="greater than 0"):
        parrun.Pool(0)


def _kill_once(flag):
    def fn(x):
        if x[0] >= 3000 and flag[0] == 0:
            flag[0] = os.getpid()
            os.kill(os.getpid(), signal.SIGKILL)
        return x * 2
    return fn


def test_worker_killed_mid_map_is_recovered():
    with parrun.Pool(2) as p:
        flag = parrun.zeros(1, np.int64)
        x = parrun.asshared(np.arange(10_000, dtype=np.float64))
        before = set(p.pids)
        y = p.map(_kill_once(flag), x, grain=100)
        np.testing.assert_array_equal(y, 2 * x)  # every piece ran, lost ones again
        assert flag[0] in before
        assert p.last_stats.recovered >= 1
        assert flag[0] not in p.pids and len(p.pids) == 2  # replaced
        np.testing.assert_array_equal(p.map(np.negative, x), -x)
        for a in (flag, x, y):
            a.release()


def _die_leaving_a_forked_child(flag_dir: str):
    def fn(x):
        if x[0] >= 3000:
            try:  # the first worker here (an exclusive create), not both at once
                os.close(os.open(os.path.join(flag_dir, "claimed"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return x * 2
            child = os.fork()  # holds copies of the worker's pipes, long after it dies
            if child == 0:
                time.sleep(60)
                os._exit(0)
            with open(os.path.join(flag_dir, "pids"), "w") as f:
                f.write(f"{os.getpid()} {child}")
            os.kill(os.getpid(), signal.SIGKILL)
        return x * 2
    return fn


def test_worker_killed_while_its_pipes_live_on_is_recovered(tmp_path):
    """A dead worker whose status pipe never reaches EOF (a process it forked holds the
    write end) still counts as dead: the map completes instead of waiting for that pipe."""
    pids = tmp_path / "pids"
    with parrun.Pool(2) as p:
        x = parrun.asshared(np.arange(10_000, dtype=np.float64))
        try:
            t0 = time.monotonic()
            y = p.map(_die_leaving_a_forked_child(str(tmp_path)), x, grain=100)
            assert time.monotonic() - t0 < 20  # the child lives 60 s
            np.testing.assert_array_equal(y, 2 * x)
            worker, _child = map(int, pids.read_text().split())
            assert p.last_stats.recovered >= 1
            assert worker not in p.pids and len(p.pids) == 2
            y.release()
        finally:
            if pids.exists():
                try:
                    os.kill(int(pids.read_text().split()[1]), signal.SIGKILL)
                except (ProcessLookupError, IndexError, ValueError):
                    pass
            x.release()


def test_worker_killed_mid_reduce_raises_clearly():
    with parrun.Pool(2) as p:
        flag = parrun.zeros(1, np.int64)
        x = parrun.asshared(np.arange(10_000, dtype=np.float64))
        with pytest.raises(parrun.WorkerCrashed, match=r"SIGKILL\(-9\)") as info:
            p.map_reduce(lambda t: _kill_once(flag)(t).sum(), operator.add, x, grain=100)
        assert isinstance(info.value, parrun.BrokenPool)
        from concurrent.futures.process import BrokenProcessPool

        assert isinstance(info.value, BrokenProcessPool)
        assert info.value.pid == flag[0] and str(flag[0]) in str(info.value)
        assert p.map_reduce(np.sum, operator.add, x) == x.sum()
        flag.release()
        x.release()


def test_worker_segfault_is_recovered():
    with parrun.Pool(2) as p:
        flag = parrun.zeros(1, np.int64)

        def segv(x):
            if x[0] >= 50 and flag[0] == 0:
                flag[0] = 1
                import ctypes

                ctypes.string_at(0)  # SIGSEGV
            return x + 1

        y = p.map(segv, np.arange(200.0), grain=10)
        np.testing.assert_array_equal(y, np.arange(1.0, 201.0))
        assert flag[0] == 1
        flag.release()
        y.release()


def test_temporary_copies_are_kept_for_the_next_map_then_freed():
    with parrun.Pool(2) as p:
        before = shm_segments(os.getpid())
        p.map(np.negative, np.ones(1000), out=np.empty(1000))
        kept = shm_segments(os.getpid()) - before  # a copy of the input, one of out
        assert len(kept) == 2
        for _ in range(3):
            p.map(np.negative, np.ones(1000), out=np.empty(1000))
            assert shm_segments(os.getpid()) - before == kept
    assert not (shm_segments(os.getpid()) & kept)


def test_numba_kernel(pool):
    numba = pytest.importorskip("numba")

    @numba.njit(cache=False)
    def escape(c):
        out = np.empty(c.shape[0], np.int64)
        for i in range(c.shape[0]):
            z = 0j
            n = 0
            while n < 50 and abs(z) <= 2:
                z = z * z + c[i]
                n += 1
            out[i] = n
        return out

    c = np.linspace(-2, 1, 5000) + 0.5j
    np.testing.assert_array_equal(pool.map(escape, c), escape(c))


def test_public_api_is_sorted_and_complete():
    assert parrun.__all__ == sorted(parrun.__all__)
    public = {n for n in dir(parrun) if not n.startswith("_")} - {"annotations"}
    assert public <= set(parrun.__all__) | {"nn", "bench", "backends"}  # subpackages, on use
    assert parrun.Pool.__module__ == "parrun"
    assert repr(parrun.Pool).startswith("<class 'parrun.Pool'")


# -- what map returns, checked on both backends (test_dask.py runs these on Dask) ---------
def _sqrt_where(a, out=None):
    np.sqrt(a, out=out, where=a >= 0)
    return out


def _add_into(a, out):
    out += a


def _as_str(a):
    return np.array([str(v) for v in a])


def _first_rows_slow(t):
    if t[0] == 0:
        time.sleep(0.3)
        return t.astype(np.float32)
    return t.astype(np.int16)  # held exactly by float32: cast up


def _times_ten(t):
    return t * 10


def _same(t):
    return t


def _narrow_first(t):
    return t.astype(np.int8) if t[0] < 8 else t.astype(np.int64) * 1000


def _float32_first(t):
    return t.astype(np.float32) if t[0] < 8 else t * 1e300


def _masked_below_5(t):
    return np.ma.masked_less(t, 5)


def check_map_semantics(p):
    """What NumPy would give, or a clear error: never a silently wrong result."""
    # fn(..., out=) sees out's contents, and what it leaves stays (a plain out too).
    x = np.arange(-10.0, 10.0)
    want = np.full(20, -1.0)
    _sqrt_where(x, out=want)
    for out in (np.full(20, -1.0), parrun.full(20, -1.0)):
        p.map(_sqrt_where, x, out=out, grain=3)
        np.testing.assert_array_equal(out, want)
        out[:] = 1.0
        p.map(_add_into, x, out=out, grain=3)
        np.testing.assert_array_equal(out, 1.0 + x)
        if parrun.is_shared(out):
            out.release()
    # A tuple is not one array: NumPy would stack it when its length matches the rows.
    with pytest.raises(TypeError, match="divmod returns 2 arrays"):
        p.map(np.divmod, np.array([7.0, 9.0]), np.array([2.0, 4.0]))
    with pytest.raises(TypeError, match="returned a tuple of 2"):
        p.map(lambda a: np.divmod(a, 2.0), np.array([7.0, 9.0]))
    # Later pieces wider than the first: an error, not strings cut short.
    with pytest.raises(TypeError, match="would cut it short"):
        p.map(_as_str, np.arange(1000), grain=100)
    ok = np.empty(1000, "U3")
    p.map(_as_str, np.arange(1000), out=ok, grain=100)
    np.testing.assert_array_equal(ok, _as_str(np.arange(1000)))
    # Numbers into a string out: not written as '10' for 1000.
    for fn, x, dtype in ((_times_ten, np.arange(100, 110), "U2"),
                         (_times_ten, np.arange(100.0, 110.0), "U3"),
                         (_same, np.array([b"abcde"] * 10), "U2")):
        with pytest.raises(TypeError, match="would cut it short"):
            p.map(fn, x, out=np.zeros(10, dtype))
    wide = np.zeros(10, "U21")
    p.map(_same, np.arange(10), out=wide)
    np.testing.assert_array_equal(wide, np.arange(10).astype("U21"))
    # A later piece's result wider than the first piece's, which map made out with: refused.
    for fn in (_narrow_first, _float32_first):
        with pytest.raises(TypeError, match="cannot hold it"):
            p.map(fn, np.arange(20), grain=4)
    # Masked arrays would lose their mask, as inputs or as results.
    with pytest.raises(TypeError, match="masked array"):
        p.map(np.negative, np.ma.array([1.0, 2.0], mask=[0, 1]))
    with pytest.raises(TypeError, match="masked array"):
        p.map(_masked_below_5, np.arange(10.0))
    # A ufunc's out of the wrong shape would be filled by broadcasting.
    with pytest.raises(ValueError, match="out has shape"):
        p.map(np.negative, np.arange(2.0), out=np.zeros((2, 2)))
    # A gufunc's core dimensions count: matmul's out is (n, 2, 4), not (n, 2).
    a, b = np.arange(60.0).reshape(5, 2, 6), np.arange(120.0).reshape(5, 6, 4)
    for good in (np.empty((5, 2, 4)), parrun.empty((5, 2, 4))):
        p.map(np.matmul, a, b, out=good)
        np.testing.assert_array_equal(good, a @ b)
        if parrun.is_shared(good):
            good.release()
    with pytest.raises(ValueError, match="out has shape"):
        p.map(np.matmul, a, b, out=np.empty((5, 2)))
    # The first rows' result fixes out's dtype, even when other pieces finish first.
    y = p.map(_first_rows_slow, np.arange(400), grain=100)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.arange(400))
    # fn changes its piece in place and writes into a captured shared array.
    flag = parrun.zeros(1)

    def double_and_flag(t):
        t *= 2
        flag[0] = 1
        return t

    np.testing.assert_array_equal(p.map(double_and_flag, np.arange(4.0)), [0, 2, 4, 6])
    assert flag[0] == 1
    flag.release()
    # No rows: the result's type still comes from fn run in a worker, not in the caller.
    here = os.getpid()
    y = p.map(lambda a: a.astype(np.int8 if os.getpid() == here else np.int16),
              np.zeros((0, 3)))
    assert y.shape == (0, 3) and y.dtype == np.int16


def test_map_semantics(pool):
    check_map_semantics(pool)


def _wider_after_row_0(t):
    return t.astype(np.int8) if t[0] == 0 else t.astype(np.int64) * 1000


def _row_0_flat(t):
    return t if t[0] == 0 else t[:, None]


def test_map_checks_every_piece_of_its_first_rows(pool):
    # The first rows may come back in several pieces (a row a worker, when slow): each is
    # checked against the first, as the later pieces are.
    for _ in range(2):  # cost unknown, then known
        with pytest.raises(TypeError, match=r"for rows [1-9]\d*:\d+, but .* cannot hold it"):
            pool.map(_wider_after_row_0, np.arange(20))
        with pytest.raises(ValueError, match=r"shape \(\d+, 1\) for rows [1-9]\d*:\d+"):
            pool.map(_row_0_flat, np.arange(20))


def test_out_overlapping_an_input_gives_numpys_answer(pool):
    want = np.arange(1e5)
    np.negative(want, out=want[::-1])
    s = parrun.asshared(np.arange(1e5))
    pool.map(np.negative, s, out=s[::-1], grain=1000)
    np.testing.assert_array_equal(s, want)
    s[:] = np.arange(1e5)
    want = np.arange(1e5)
    want[1:] = want[:-1] * 2
    pool.map(lambda a: a * 2, s[:-1], out=s[1:], grain=1000)  # each row feeds the next
    np.testing.assert_array_equal(s, want)
    pool.map(np.negative, s, out=s, grain=1000)  # in place, row for row: no copy needed
    np.testing.assert_array_equal(s, -want)
    s.release()


def test_last_stats_describe_a_call_that_failed():
    with parrun.Pool(2) as p:
        x = parrun.asshared(np.arange(1000.0))
        p.map(np.negative, x[:5]).release()
        with pytest.raises(parrun.WorkerCrashed):
            p.map(lambda a: os._exit(3) if a[-1] >= 500 else a, x, grain=10)
        st = p.last_stats
        assert st.items == 1000 and st.recovered > 0  # this call's, not the one before
        x.release()


def test_a_worker_that_died_while_idle_does_not_fail_the_next_call():
    with parrun.Pool(2) as p:
        x = np.arange(100.0)
        assert p.map_reduce(np.sum, operator.add, x) == x.sum()
        pid = p.pids[0]
        os.kill(pid, signal.SIGKILL)
        # reaped: its fork server has then sent the pool its exit status (a zombie is not
        # yet known to the pool: this test once failed in CI waiting only for that)
        assert wait_until(lambda: not psutil.pid_exists(pid))
        assert p.map_reduce(np.sum, operator.add, x) == x.sum()  # the partial was not lost
        assert pid not in p.pids


def test_a_function_evicted_from_the_cache_and_used_again_runs(monkeypatch):
    monkeypatch.setattr(parrun._pool, "FN_CACHE_SIZE", 4)
    x = np.arange(4000.0)

    def slow_double(a):
        time.sleep(0.002)
        return a * 2.0

    with parrun.Pool(2) as p:
        for _ in range(2):
            p.map(slow_double, x, grain=1000).release()  # on both workers
            for i in range(6):  # evict it; one row each, so one worker runs them
                p.map(lambda a, i=i: a + i, x[:1]).release()
        y = p.map(slow_double, x, grain=1000)
        np.testing.assert_array_equal(y, x * 2)
        y.release()
        s = p.map_reduce(np.sum, operator.add, x, grain=1000)  # reduce evicted by fn's entry
        assert s == x.sum() and p.map_reduce(np.sum, operator.add, x, grain=1000) == s


def test_help_shows_the_pools_parameters():
    import inspect

    params = inspect.signature(parrun.Pool).parameters
    assert list(params)[:2] == ["workers", "blas_threads"] and "retries" in params


class _Model:
    def __init__(self):
        self.w = parrun.zeros(1 << 17)  # 1 MiB
        self.act = self.relu  # a cycle: the model holds a method that holds the model

    def relu(self, t):
        return np.maximum(t, 0.0) + self.w[0]

    def __call__(self, t):
        return self.act(t)


def test_the_function_cache_keeps_nothing_alive(pool):
    m = _Model()
    np.testing.assert_array_equal(pool.map(m, np.arange(-2.0, 2.0)), [0, 0, 0, 1])
    np.testing.assert_array_equal(pool.map(m.relu, np.arange(-2.0, 2.0)), [0, 0, 0, 1])
    ref, name = weakref.ref(m), m.w.segment
    del m
    gc.collect()
    assert ref() is None
    assert name not in shm_segments()


@dataclasses.dataclass(slots=True)
class _Affine:
    a: float


@dataclasses.dataclass(slots=True)
class _Shifted(_Affine):
    b: float = 0.0

    def __call__(self, t):
        return self.a * t + self.b


def test_rebound_tuples_dicts_and_signed_zeros_are_seen(pool):
    """What cannot be weakly referenced is compared by identity, held (an id alone was
    reused by the next tuple or dict: stale in 49 of 50 loops); floats by their bits; a
    slotted callable by the slots of its bases too."""
    ns = {}
    exec("def by_tuple(t):\n    return bounds[1]\n"
         "def by_dict(t):\n    return opts['lr']\n"
         "def by_zero(t):\n    return copysign(1.0, zero)\n", ns)
    ns["copysign"] = math.copysign
    for i in range(20):
        ns["bounds"], ns["opts"] = (i, i + 1), {"lr": i}
        assert pool.submit(ns["by_tuple"], 0).result(timeout=TIMEOUT) == i + 1
        assert pool.submit(ns["by_dict"], 0).result(timeout=TIMEOUT) == i
    for zero, sign in ((0.0, 1.0), (-0.0, -1.0), (0.0, 1.0)):
        ns["zero"] = zero
        assert pool.submit(ns["by_zero"], 0).result(timeout=TIMEOUT) == sign
    f = _Shifted(2.0, 1.0)
    assert pool.submit(f, 1.0).result(timeout=TIMEOUT) == 3.0
    f.a = 10.0
    assert pool.submit(f, 1.0).result(timeout=TIMEOUT) == 11.0


def _nested_map(t):
    return parrun.map(np.sqrt, t)


def test_pools_do_not_nest_and_say_so(pool):
    with pytest.raises(RuntimeError, match="pools do not nest"):
        pool.map(_nested_map, np.arange(10.0))
    with pytest.raises(RuntimeError, match="pools do not nest"):
        pool.submit(parrun.Pool, 1).result(timeout=TIMEOUT)
    np.testing.assert_array_equal(pool.map(np.negative, np.arange(4.0)), -np.arange(4.0))


class _Scale:
    def __init__(self, k):
        self.k = k

    def __call__(self, t):
        return t * self.k


class _Scaler:
    def __init__(self, k):
        self.k = k

    def scale(self, t):
        return t * self.k


class _Configured:
    def __init__(self):
        self.cfg = {"k": 2.0}

    def apply(self, t):
        return t * self.cfg["k"]


def test_a_bound_method_is_pickled_once_while_its_object_is_unchanged(pool, monkeypatch):
    """``obj.method`` and ``arr.sum`` are new objects at each access: their pickle is kept
    by function and object (each call took ~0.5 ms to pickle again), and still renewed
    when the object's attributes change."""
    import parrun._functions as F

    real, calls = F._shm.dumps_naming, []

    def dumps(fn):
        calls.append(fn)
        return real(fn)

    monkeypatch.setattr(F._shm, "dumps_naming", dumps)
    s, x, a = _Scaler(2.0), np.arange(6.0), np.arange(4.0)
    for _ in range(5):
        np.testing.assert_array_equal(pool.map(s.scale, x), x * 2)
        assert pool.submit(a.sum).result(timeout=TIMEOUT) == 6.0
    assert len(calls) == 2
    s.k = 3.0
    np.testing.assert_array_equal(pool.map(s.scale, x), x * 3)
    a[0] = 10.0  # a small array's bytes are compared
    assert pool.submit(a.sum).result(timeout=TIMEOUT) == 16.0
    assert len(calls) == 4
    t = _Scaler(5.0)  # another object of the class: its own entry
    np.testing.assert_array_equal(pool.map(t.scale, x), x * 5)
    np.testing.assert_array_equal(pool.map(s.scale, x), x * 3)
    assert len(calls) == 5
    # What the comparison cannot see (a big plain array's contents, a dict's items) is
    # pickled again at every call, as every bound method once was: never stale.
    big = np.zeros(100_000)
    assert pool.submit(big.sum).result(timeout=TIMEOUT) == 0.0
    big[:] = 1.0
    assert pool.submit(big.sum).result(timeout=TIMEOUT) == 100_000.0
    c = _Configured()
    assert pool.submit(c.apply, 1.0).result(timeout=TIMEOUT) == 2.0
    c.cfg["k"] = 10.0
    assert pool.submit(c.apply, 1.0).result(timeout=TIMEOUT) == 10.0


def test_a_function_is_sent_again_when_what_it_captures_changes():
    """Pickles are cached per function, but never stale: a rebound global, a callable's
    attribute, a small captured array changed in place, a partial's argument."""
    x = np.arange(8.0)
    ns = {"k": 2.0}
    exec("def by_global(t):\n    return t * k\n", ns)  # a script's function: by value
    w = np.array([2.0])
    v = np.array([2.0])
    obj = _Scale(2.0)
    fns = [ns["by_global"], obj, lambda t: t * w, functools.partial(np.multiply, v)]

    def change(k):
        ns["k"] = k
        obj.k = k
        w[0] = k
        v[0] = k

    with parrun.Pool(2) as p:
        for fn in fns:
            for k in (2.0, 3.0, 3.0, 5.0):
                change(k)
                np.testing.assert_array_equal(p.map(fn, x), x * k)
                assert p.submit(fn, 1.0).result(timeout=TIMEOUT) == k


def test_map_in_a_future_callback_is_refused_and_the_pool_lives_on():
    errors = []

    def cb(_f):
        try:
            p.map(np.negative, np.arange(10.0))
        except Exception as e:
            errors.append(e)

    with parrun.Pool(2) as p:
        fs = [p.submit(time.sleep, 0.01) for _ in range(6)]
        fs[0].add_done_callback(cb)
        assert [f.result(timeout=TIMEOUT) for f in fs] == [None] * 6
        assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
        assert "callback" in str(errors[0])
        np.testing.assert_array_equal(p.map(np.negative, np.arange(3.0)), [0, -1, -2])


def test_terminate_stops_a_map_running_in_another_thread():
    p = parrun.Pool(2)
    outcome = []

    def run():
        try:
            p.map(lambda a: (time.sleep(0.01), a)[1], np.arange(1000.0), grain=1)
            outcome.append("returned")
        except Exception as e:
            outcome.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    p.terminate()
    t.join(TIMEOUT)
    assert time.monotonic() - t0 < 3  # not the ~5 s the map had left
    assert len(outcome) == 1 and isinstance(outcome[0], parrun.BrokenPool)


def test_an_interrupt_anywhere_leaves_no_worker_on_the_next_call():
    """Ctrl-C (here SIGALRM raising KeyboardInterrupt) may land anywhere in map, even
    between sending the job and waiting for it: the next map must not share the workers
    with the old job's pieces (it once returned rows it never computed)."""
    import random

    def on_alarm(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, on_alarm)
    rng = random.Random(5)
    x = parrun.asshared(np.arange(64.0))
    out = parrun.empty(64)
    try:
        with parrun.Pool(2) as p:
            for i in range(150):
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(5e-5, 2e-3))
                try:
                    p.map(lambda a: (time.sleep(0.003), a * 0)[1], x, out=out, grain=8)
                except KeyboardInterrupt:
                    pass
                signal.setitimer(signal.ITIMER_REAL, 0)
                if i % 2:  # tasks next, on the same workers
                    assert p.submit(abs, -i).result(timeout=TIMEOUT) == i
                check = p.map(lambda a: a + 1, x, grain=8)
                np.testing.assert_array_equal(check, np.arange(64.0) + 1)
                check.release()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        x.release()
        out.release()


def test_ctrl_c_while_a_dead_worker_is_replaced_leaves_the_pool_usable(monkeypatch):
    """Ctrl-C landing while a worker that died mid-map is replaced: the interrupt is raised
    once the replacement is in place. It once left the old, closed handle in the pool, and
    every later call (close included) failed with 'process object is closed'."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal
    x = parrun.asshared(np.arange(1000.0))
    flag = parrun.zeros(1, np.int64)

    def dies_once(a):
        if a[0] >= 500 and flag[0] == 0:
            flag[0] = 1
            os._exit(1)
        return a * 2

    try:
        with parrun.Pool(2) as p:
            launch = p._launch

            def interrupted_launch(slot):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # delivered here, at the latest
                return launch(slot)

            monkeypatch.setattr(p, "_launch", interrupted_launch)
            with pytest.raises(KeyboardInterrupt):
                p.map(dies_once, x, grain=10)
            monkeypatch.setattr(p, "_launch", launch)
            assert flag[0] == 1
            for _ in range(2):
                np.testing.assert_array_equal(p.map(np.negative, x), -x)
            assert p.submit(sum, [1, 2]).result(timeout=TIMEOUT) == 3
    finally:
        signal.signal(signal.SIGINT, old)
        x.release()
        flag.release()


@pytest.mark.parametrize("how", ["close", "terminate"])
def test_closing_the_pool_in_a_done_callback(how):
    """close() or terminate() in a done-callback (the thread that runs the tasks) once
    failed the running tasks with 'process object is closed' and leaked the 4 MiB task
    arena; now a background thread closes the pool."""
    before = shm_segments(os.getpid())
    p = parrun.Pool(2)

    def t(i):
        time.sleep(0.02)
        return i

    fs = [p.submit(t, i) for i in range(20)]
    errors = []

    def cb(_f):
        try:
            getattr(p, how)()
        except BaseException as e:
            errors.append(e)

    fs[2].add_done_callback(cb)
    assert not cf.wait(fs, timeout=TIMEOUT).not_done
    assert not errors and p.closed
    assert wait_until(lambda: not p._tasks.thread.is_alive())
    assert wait_until(lambda: not shm_segments(os.getpid()) - before)
    for i, f in enumerate(fs):
        if not f.cancelled():
            if how == "close":
                assert f.result() == i  # those running finish
            else:
                assert f.exception() is None or isinstance(f.exception(), parrun.BrokenPool)
    assert sum(not f.cancelled() for f in fs) >= 3
    assert wait_until(lambda: not any(psutil.pid_exists(pid) for pid in p.pids))


def _exits(i):
    if i == 0:
        os._exit(1)
    return i


@pytest.mark.parametrize("workers", [1, 2])
def test_tasks_go_on_when_a_replacement_worker_fails_to_start(monkeypatch, workers):
    """A worker dies running a task and its replacement dies as it starts, every try: the
    slot is down for that round (with no worker left, its tasks fail), and the next round
    starts it again. This once ended the task collector: every later submit failed with
    BrokenPool."""
    with parrun.Pool(workers) as p:
        assert p.submit(int, 1).result(timeout=TIMEOUT) == 1  # the task service runs
        launch, killed = p._launch, []

        def dies_at_start(slot):
            w = launch(slot)
            if len(killed) < parrun._pool.START_TRIES:
                w.process.kill()
                killed.append(w.pid)
            return w

        monkeypatch.setattr(p, "_launch", dies_at_start)
        fs = [p.submit(_exits, 0)] + [p.submit(_exits, i) for i in range(1, 20)]
        assert isinstance(fs[0].exception(timeout=TIMEOUT), parrun.WorkerCrashed)
        if workers == 2:
            assert [f.result(timeout=TIMEOUT) for f in fs[1:]] == list(range(1, 20))
        else:
            for f in fs[1:]:
                e = f.exception(timeout=TIMEOUT)
                assert isinstance(e, parrun.WorkerCrashed) and "could be started" in str(e)
        # (The other worker may finish the rest while the collector still replaces.)
        assert wait_until(lambda: len(killed) == parrun._pool.START_TRIES)
        assert [p.submit(sum, [1, i]).result(timeout=TIMEOUT) for i in range(4)] == [1, 2, 3, 4]
        np.testing.assert_array_equal(p.map(np.negative, np.arange(3.0)), [0, -1, -2])
        assert all(psutil.pid_exists(pid) for pid in p.pids)


def _sleeps_by_value(a):
    time.sleep(float(a.sum()))
    return a * 2


def test_costs_learned_on_cheap_calls_do_not_leave_a_slow_call_on_one_worker():
    """What a function cost per row is learned per row size, and a call slower than it said
    wakes the other workers: after quick calls on 1-element rows, np.exp on rows of 3 MB,
    and a function whose cost depends on the data, once ran on one worker alone."""
    with parrun.Pool(2) as p:
        small, wide = parrun.asshared(np.random.rand(200)), parrun.zeros((8, 200_000))
        cheap, dear = parrun.zeros(64), parrun.full(64, 0.005)  # 5 ms a row
        try:
            for _ in range(3):
                p.map(np.exp, small, out=np.empty(200))
                p.map(_sleeps_by_value, cheap, out=np.empty(64))
            for x, fn in ((wide, np.exp), (dear, _sleeps_by_value)):
                p.map(fn, x, out=np.empty(x.shape))  # (no probe: its rows run on one worker)
                assert all(w.items > 0 for w in p.last_stats.workers), p.last_stats
        finally:
            for a in (small, wide, cheap, dear):
                a.release()


def _sleep_a(d):
    time.sleep(d)
    return "a"


def _sleep_c(d):
    time.sleep(d)
    return "c"


def test_tasks_waiting_while_their_function_leaves_the_cache_still_run(monkeypatch):
    """Tasks queued in a worker's range while newer functions push theirs out of the pool's
    function cache (or a segment it names is released): the worker is told to forget it,
    then gets it again. It once waited for it for ever (and the futures, and close())."""
    monkeypatch.setattr(parrun._pool, "FN_CACHE_SIZE", 8)
    with parrun.Pool(3) as p:
        busy = [p.submit(_sleep_a, 0.5), p.submit(time.sleep, 1.5), p.submit(time.sleep, 1.5)]
        time.sleep(0.25)
        # Behind the first task, in its worker's range; that worker has not read their
        # functions yet when the dispatch below (room after the first task) forgets them.
        queued = [p.submit(_sleep_a, 0.2), p.submit(_sleep_c, 0.01), p.submit(abs, -3)]
        time.sleep(0.1)
        later = [p.submit(functools.partial(operator.add, i), 1) for i in range(60)]
        assert not cf.wait(busy + queued + later, timeout=TIMEOUT).not_done
        assert [f.result() for f in queued] == ["a", "c", 3]
        assert [f.result() for f in later] == [i + 1 for i in range(60)]


def _exit_if_flag(path):
    if os.path.exists(path):
        os._exit(3)


def _flag_and_exit(path):
    open(path, "w").close()
    os._exit(1)


def test_a_task_submitted_while_every_worker_is_down_runs_later(tmp_path):
    """Every worker down (its replacement died as it started): the round's tasks fail, and a
    task submitted then (here a done-callback's retry) waits for the next round, which
    starts workers again. It once waited for ever, and so did later submits."""
    flag = str(tmp_path / "flag")
    with parrun.Pool(1, initializer=_exit_if_flag, initargs=(flag,)) as p:
        retries = []

        def retry(f):
            if isinstance(f.exception(), parrun.WorkerCrashed) and len(retries) < 2:
                g = p.submit(int, 7)
                retries.append(g)
                g.add_done_callback(retry)

        f = p.submit(_flag_and_exit, flag)
        f.add_done_callback(retry)
        assert isinstance(f.exception(timeout=TIMEOUT), parrun.WorkerCrashed)
        wait_until(lambda: len(retries) == 2 and retries[-1].done())  # (or the round ended)
        os.unlink(flag)  # replacements start again
        for g in retries:
            e = g.exception(timeout=TIMEOUT)
            assert e is None or isinstance(e, parrun.WorkerCrashed)
        assert p.submit(int, 5).result(timeout=TIMEOUT) == 5


def _big_result():
    time.sleep(0.3)
    return b"x" * 300_000


def test_tasks_submitted_while_a_round_replaces_a_worker_do_not_hang():
    """A round that starts by replacing a dead worker (slowly: its initializer sleeps) while
    other threads submit: a busy worker returning a big result, and a big function sent to
    it. The first dispatch once wrote to a blocking pipe there: a deadlock."""
    blob = np.random.default_rng(0).random(40_000)  # 320 KB, pickled with the function
    with parrun.Pool(2, initializer=time.sleep, initargs=(0.5,)) as p:
        assert p.submit(int).result(timeout=TIMEOUT) == 0
        os.kill(p.pids[1], signal.SIGKILL)
        time.sleep(0.3)
        z = p.submit(int)
        time.sleep(0.1)
        a = p.submit(_big_result)
        time.sleep(0.1)
        b = p.submit(lambda: float(blob[3]))
        assert not cf.wait([z, a, b], timeout=TIMEOUT).not_done
        assert (z.result(), len(a.result()), b.result()) == (0, 300_000, float(blob[3]))


@pytest.mark.parametrize("tasks", [False, True])
def test_terminate_after_close_and_twice_is_a_no_op(tasks):
    # terminate() on a closed pool once asked its closed process objects whether they were
    # alive (ValueError: process object is closed).
    p = parrun.Pool(2)
    if tasks:
        assert p.submit(int).result(timeout=TIMEOUT) == 0
    pids = p.pids
    p.close()
    p.terminate()
    p.terminate()
    p.close()
    assert p.closed
    assert wait_until(lambda: not any(alive(pid) for pid in pids))


def test_close_in_a_callback_then_terminate_closes_once():
    """close() in a done-callback (in a background thread) racing terminate(): both once
    closed the task service's pipe descriptors (EBADF, or another file's descriptor)."""
    errors = []
    hook = threading.excepthook
    threading.excepthook = lambda a: errors.append(a.exc_value)
    try:
        for _ in range(4):
            p = parrun.Pool(2)
            slow = p.submit(time.sleep, 0.3)
            q = p.submit(int)
            q.add_done_callback(lambda _f, p=p: p.close())
            q.result(timeout=TIMEOUT)
            time.sleep(0.05)
            p.terminate()
            assert slow.exception(timeout=TIMEOUT) is None or isinstance(
                slow.exception(), parrun.BrokenPool)
            assert wait_until(lambda p=p: not p._tasks.thread.is_alive())
            time.sleep(0.2)
    finally:
        threading.excepthook = hook
    assert not errors


def _deleted_parrun_mappings(pid):
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if "/parrun_" in line and "(deleted)" in line)


def test_released_arrays_leave_the_workers_memory():
    """A segment's memory is freed when no process maps it: workers drop their mappings of
    released segments, and the functions whose closures held them (args of tasks too)."""
    with parrun.Pool(2) as p:
        x = np.arange(1000.0)

        def step(i):
            w = parrun.full(1 << 17, float(i))  # 1 MiB, used by one call
            return p.map(lambda v: v * w[0], x, grain=100)

        for i in range(20):
            np.testing.assert_array_equal(step(i), x * i)
        for i in range(20):
            a = parrun.full(1 << 17, float(i))
            assert p.submit(np.sum, a).result(timeout=TIMEOUT) == (1 << 17) * i
            del a
        gc.collect()
        p.map(np.negative, x, grain=100).release()  # tells the workers
        p.submit(abs, 1).result(timeout=TIMEOUT)
        assert wait_until(lambda: all(_deleted_parrun_mappings(k) == 0 for k in p.pids)), \
            [_deleted_parrun_mappings(k) for k in p.pids]


def test_parrun_nn_loads_on_first_use():
    import subprocess
    import sys

    code = ("import sys, parrun\n"
            "assert 'parrun.nn' not in sys.modules\n"
            "assert parrun.nn.mlp is __import__('parrun.nn').nn.mlp\n"
            "assert 'dask' not in sys.modules\n"
            "try:\n    parrun.nope\nexcept AttributeError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "has no attribute 'nope'" in r.stdout


def test_a_big_function_sent_to_busy_workers_returning_big_results_does_not_hang(pool):
    """Workers busy sending 200 KB results (pickled into their status pipes) while a new
    function capturing a 200 KB array goes down their command pipes: the parent once
    waited for room in a command pipe that a worker, itself waiting for the parent to read
    its results, never emptied."""
    table = np.random.default_rng(0).random(25_000)  # plain: pickled with the function

    def embed(i):
        time.sleep(0.01)
        return np.full(25_000, float(i))

    def lookup(i):
        return table[i]

    fs = [pool.submit(embed, i) for i in range(50)]
    time.sleep(0.03)
    fs += [pool.submit(lookup, i) for i in range(4)]
    assert not cf.wait(fs, timeout=TIMEOUT).not_done
    assert [f.result()[0] for f in fs[:50]] == list(range(50))
    assert [f.result() for f in fs[50:]] == list(table[:4])
    np.testing.assert_array_equal(pool.map(np.negative, np.arange(3.0)), [0, -1, -2])


@pytest.mark.timeout(120)
def test_a_child_of_os_fork_that_exits_leaves_the_parents_workers_alone():
    # The child's exit hooks (multiprocessing's, parrun's) counted the parent's workers as
    # the child's own: they were terminated, and the parent's next map started new ones.
    import subprocess
    import sys

    code = ("import os, sys, numpy as np, parrun\n"
            "with parrun.Pool(2) as pool, parrun.Executor(2) as ex:\n"
            "    assert ex.submit(abs, -1).result() == 1\n"
            "    pids = pool.pids + ex.pool.pids\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        sys.exit(0)  # a normal exit: atexit hooks run\n"
            "    _, status = os.waitpid(pid, 0)\n"
            "    print('child', os.waitstatus_to_exitcode(status))\n"
            "    y = pool.map(np.sqrt, np.arange(4.0))\n"
            "    print('same workers', pool.pids + ex.pool.pids == pids,\n"
            "          pool.last_stats.recovered, ex.submit(abs, -2).result())\n"
            "    y.release()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["child", "0", "same", "workers", "True", "0", "2"], \
        (r.stdout, r.stderr[-2000:])
    assert "can only join a child process" not in r.stderr


FORKED_CHILD_USES_PARRUN = """
import os, signal, sys, numpy as np, parrun


def say(*words):  # a line in one write: the children print at once
    os.write(1, (' '.join(map(str, words)) + chr(10)).encode())


x = parrun.asshared(np.arange(10_000.0))
pool = parrun.Pool(2)
parrun.map(np.sqrt, x).release()  # the default pool, and the fork server, started here
kids = []
for k in range(2):
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)
        say('child closed', pool.closed)
        try:
            pool.map(np.sqrt, x)
        except parrun.PoolClosedError as e:
            say('child refused', 'belongs to process' in str(e))
        wrong = 0
        for _ in range(20):
            y = parrun.map(lambda a, k=k: a + k, x)  # a default pool of its own
            wrong += not np.array_equal(y, np.arange(10_000.0) + k)
            y.release()
        say('child wrong', wrong, parrun.default_pool().pids != pool.pids)
        sys.exit(0)
    kids.append(pid)
say('children', *sorted(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in kids))
y = pool.map(np.sqrt, x)
say('parent', np.array_equal(y, np.sqrt(np.arange(10_000.0))), pool.last_stats.recovered)
y.release()
pool.close()
x.release()
"""


@pytest.mark.timeout(120)
def test_a_child_of_os_fork_gets_pools_of_its_own():
    # A child forked after the parent's pools started (a fork-based multiprocessing worker,
    # say) drove the parent's workers through the inherited pipes: it hung, got the parent's
    # results or errors, once broke the parent's pool; and no pool could start there
    # (multiprocessing waited for the parent's fork server: ChildProcessError).
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", FORKED_CHILD_USES_PARRUN], capture_output=True,
                       text=True, timeout=100)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = sorted(r.stdout.splitlines())
    assert lines == ["child closed True"] * 2 + ["child refused True"] * 2 + \
        ["child wrong 0 True"] * 2 + ["children 0 0", "parent True 0"], \
        (r.stdout, r.stderr[-3000:])


def test_stats_read_as_english():
    st = parrun.JobStats(1, 1, 1, 0.002, (parrun.WorkerStats(0, 7, 1, 1, 1, 0.001, 0.001),
                                          parrun.WorkerStats(1, 8, 0, 0, 0, 0.0, 0.002)))
    first, w0, w1 = str(st).splitlines()
    assert first.startswith("1 item in 1 piece, 1 steal, 2.00 ms wall"), first
    assert "1 item, 1 piece, 1 steal" in w0 and "0 items, 0 pieces, 0 steals" in w1


def _slow_double(x):
    time.sleep(0.01)
    return x * 2


@pytest.mark.timeout(60)
def test_an_interrupt_inside_reading_a_worker_message_leaves_the_pool_usable(monkeypatch):
    # Ctrl-C after a message's length and before its body: the body stayed in the pipe and
    # the next reads took its bytes for lengths (EOFError, UnpicklingError, then a read that
    # never ended). The worker whose message was cut is now replaced.
    from multiprocessing import connection

    real = connection.Connection._recv
    armed = [0]

    def recv(self, size, *args):
        if armed[0] and size != 4:  # a body, after its 4-byte length
            armed[0] -= 1
            if armed[0] == 0:
                raise KeyboardInterrupt
        return real(self, size, *args)

    monkeypatch.setattr(connection.Connection, "_recv", recv)
    x = np.arange(100.0)
    with parrun.Pool(2) as p:
        for nth in (1, 2, 3):
            y = p.map(_slow_double, x)
            y.release()
            armed[0] = nth
            with pytest.raises(KeyboardInterrupt):
                p.map(_slow_double, x)
            armed[0] = 0
            for _ in range(3):
                y = p.map(_slow_double, x)
                np.testing.assert_array_equal(y, 2 * x)
                y.release()


def _sleep_the_values(x):
    for d in x[x > 0]:
        time.sleep(d)
    return x * 2


@pytest.mark.timeout(60)
def test_rows_dearer_than_their_known_cost_are_learned_from_the_first_rows():
    # A cost learned on cheap rows ran the first rows of a map as one piece in one worker,
    # untimed: a map of no more rows than that piece ran serially in every later call.
    with parrun.Pool(2) as p:
        y = p.map(_sleep_the_values, np.zeros(100_000))  # about a microsecond a row
        y.release()
        spread = []
        for _ in range(3):
            y = p.map(_sleep_the_values, np.full(2, 0.05))
            np.testing.assert_array_equal(y, [0.1, 0.1])
            y.release()
            spread.append(sorted(w.items for w in p.last_stats.workers))
        assert spread[1:] == [[1, 1], [1, 1]], spread


def _twenty_ms_a_row(x):
    time.sleep(0.02 * len(x))
    return x * 2


def test_a_grain_given_with_no_out_still_gives_every_worker_a_piece():
    # The first rows ran a row a worker, and the rest, one piece of the grain, ran in one
    # worker while the other waited: 16 rows in pieces of 8 went 12 + 4 (1.5x the time).
    with parrun.Pool(2) as p:
        for _ in range(2):
            y = p.map(_twenty_ms_a_row, np.arange(16.0), grain=8)
            np.testing.assert_array_equal(y, 2 * np.arange(16.0))
            y.release()
            assert max(w.items for w in p.last_stats.workers) <= 10, p.last_stats  # was 12


def _fixed_cost_and_rows(x):
    time.sleep(0.002 + float(x.sum()))  # 2 ms a call, plus x[i] seconds a row
    return x * 2


@pytest.mark.timeout(120)
def test_a_size_learned_on_dearer_rows_or_a_small_map_does_not_hold_later_maps():
    # A size learned on dearer rows (4 rows) held every later map of cheaper rows to pieces
    # that small, each paying the 2 ms a call: 110x slower, call after call. A small first
    # map (200 rows) stopped growing at 16 rows, and bigger maps kept that for good (35x).
    cheap = np.full(20000, 1e-6)
    for maps in ([np.full(200, 1e-6), cheap, cheap],
                 [np.full(2000, 1e-6), cheap, cheap],
                 [cheap, np.full(100, 1e-3), cheap, cheap]):
        with parrun.Pool(2) as p:
            for a in maps:
                y = p.map(_fixed_cost_and_rows, a)
                y.release()
            assert p.last_stats.pieces < 200, p.last_stats  # ~15-50; stuck: 1,250-5,000


def test_wall_s_covers_copying_plain_inputs_and_out(pool):
    # wall_s began after a plain input was copied into shared memory and ended before a
    # plain out was copied back: 170-220 ms of a 420-470 ms call, the rest missing.
    x = np.random.default_rng(0).standard_normal(2**23)  # 64 MiB, not shared
    out = np.empty_like(x)
    pool.map(np.negative, x[:1000], out=out[:1000])  # (the function pickled already)
    t0 = time.perf_counter()
    pool.map(np.negative, x, out=out)
    elapsed = time.perf_counter() - t0
    st = pool.last_stats
    assert 0.85 * elapsed <= st.wall_s <= elapsed, (elapsed, st)
    assert all(abs(w.busy_s + w.idle_s - st.wall_s) < 1e-6 for w in st.workers), st
    np.testing.assert_array_equal(out, -x)


def test_a_cheap_map_with_no_out_wakes_one_worker_and_steals_nothing():
    # Its first 8 rows cost mostly the call: taken as the cost a row, it woke both workers
    # for 30 us of work, one of them too late: ~10 steals and 14 pieces a call, 1.8x the time.
    # Once ~1 run in 3 after tests/test_recycling.py (each call 13 pieces, 8 ms): the
    # workers' idle spin yielded the core to OpenBLAS's polling thread (see limit_blas),
    # and Linux's EEVDF let the sent job wait a tick behind it.
    x = parrun.asshared(np.random.default_rng(0).random(2000))
    try:
        with parrun.Pool(2) as p:
            pieces = []
            for _ in range(6):
                y = p.map(np.sqrt, x)
                np.testing.assert_array_equal(y, np.sqrt(x))
                y.release()
                pieces.append(p.last_stats.pieces)
            assert min(pieces[1:]) <= 4, pieces
    finally:
        x.release()
