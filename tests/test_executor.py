"""Pool.submit and parrun.Executor against what ProcessPoolExecutor promises, with real
processes: results, map, shutdown, cancellation, exceptions, crashes, data movement."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import psutil
import pytest
from conftest import AS_AT_A_TERMINAL, TIMEOUT, Counted, alive, shm_segments, wait_until

import parrun


@pytest.fixture(scope="module")
def ex():
    with parrun.Executor(2) as e:
        yield e


def test_submit_returns_real_futures(pool):
    f = pool.submit(pow, 2, 10)
    assert isinstance(f, cf.Future)
    assert f.result(timeout=TIMEOUT) == 1024
    fs = [pool.submit(lambda i, k=3: i * k, i, k=2) for i in range(200)]
    _done, not_done = cf.wait(fs, timeout=TIMEOUT)
    assert not not_done
    assert sorted(f.result() for f in cf.as_completed(fs, timeout=TIMEOUT)) == \
        [2 * i for i in range(200)]
    st = pool.task_stats
    assert st.completed >= 201 and sum(st.tasks_per_worker) >= 201


def test_executor_is_a_concurrent_futures_executor(ex):
    assert isinstance(ex, cf.Executor)
    assert ex.submit(sum, [1, 2, 3]).result(timeout=TIMEOUT) == 6
    assert list(ex.map(pow, [2, 3], [5, 2])) == [32, 9]
    assert list(ex.map(abs, range(-500, 500), chunksize=1)) == list(range(500, 0, -1)) + \
        list(range(500))
    assert list(ex.map(abs, range(-5000, 5000))) == [abs(i) for i in range(-5000, 5000)]
    assert list(ex.map(abs, [], chunksize=7)) == []


def _sleep_then(i):
    time.sleep(0.2)
    return i


@pytest.mark.parametrize("make", [parrun.Executor, parrun.Pool])
def test_tasks_of_a_dropped_executor_still_run_then_it_closes(make):
    # As with ProcessPoolExecutor: an executor nobody keeps runs what was submitted. It was
    # collected at once, and its close cancelled the tasks.
    def submit_and_forget():
        ex = make(2)
        pids = (ex.pool if isinstance(ex, parrun.Executor) else ex).pids
        return [ex.submit(_sleep_then, i) for i in range(6)], pids

    fs, pids = submit_and_forget()
    gc.collect()
    assert [f.result(timeout=TIMEOUT) for f in fs] == list(range(6))
    assert wait_until(lambda: not any(alive(p) for p in pids))


def test_a_shared_array_made_in_the_call_lives_until_its_task_ran(ex):
    # Nothing but the task referred to it: it was collected, and its segment unlinked, as
    # submit returned, before a worker could map it.
    x = np.arange(1000.0)
    fs = [ex.submit(np.sum, parrun.asshared(x)) for _ in range(20)]
    assert [f.result(timeout=TIMEOUT) for f in fs] == [x.sum()] * 20
    chunks = [np.full(100, float(k)) for k in range(8)]
    got = list(ex.map(np.sum, [parrun.asshared(c) for c in chunks], timeout=TIMEOUT))
    assert got == [100.0 * k for k in range(8)]


def _quick_or_waits_for_flag(x, flag=None):
    if flag is None:
        return x
    t0 = time.monotonic()
    while flag[0] == 0 and time.monotonic() - t0 < 10:
        time.sleep(0.001)
    return bool(flag[0])


def test_a_quick_result_is_not_held_by_a_slow_task_of_its_piece(pool1):
    # Results went back a piece at a time: a quick task batched with a slow call of the same
    # function was reported when that call ended, and a call waiting for the caller to see
    # the quick result waited for ever (ProcessPoolExecutor reports each task as it ends).
    flag = parrun.zeros(1, np.int64)
    try:
        for _ in range(300):  # the function is quick: tasks of it are batched
            pool1.submit(_quick_or_waits_for_flag, 1).result(timeout=TIMEOUT)
        quick = pool1.submit(_quick_or_waits_for_flag, 2)
        slow = pool1.submit(_quick_or_waits_for_flag, 3, flag)
        assert quick.result(timeout=3) == 2
        flag[0] = 1
        assert slow.result(timeout=TIMEOUT) is True
        stats = pool1.task_stats
        assert stats.completed == stats.submitted - stats.failed
    finally:
        flag.release()


class _FailsToUnpickle:
    def __reduce__(self):  # pickles in the worker; unpickling raises in the parent
        return (int, ("not a number",))


def _result_that_fails_to_unpickle(i):
    return _FailsToUnpickle(), np.full(300_000, float(i))  # 2.4 MB: in its own segment


def test_a_result_that_fails_to_unpickle_leaves_no_segment(ex):
    # Its big array's segment, made by the worker for the parent to adopt, stayed in
    # /dev/shm until the pool closed.
    for i in range(5):
        with pytest.raises(TypeError, match="could not be unpickled"):
            ex.submit(_result_that_fails_to_unpickle, i).result(timeout=TIMEOUT)
    assert not any(shm_segments(pid) for pid in ex.pool.pids)


def test_map_ships_fn_once_a_worker_not_once_a_chunk(ex):
    # fn went with each chunk's arguments: unpickled (and what it captures copied) once a
    # chunk, 40 times here.
    counter = parrun.zeros(1, np.int64)
    try:
        fn = Counted(counter, add=1)
        assert list(ex.map(fn, range(200), chunksize=5)) == list(range(1, 201))
        assert 1 <= counter[0] <= ex.pool.workers, counter[0]
    finally:
        counter.release()


def test_map_is_lazy_and_times_out(ex):
    it = ex.map(time.sleep, [0.01, 2.0], timeout=0.5, chunksize=1)
    assert next(it) is None
    with pytest.raises(cf.TimeoutError):
        next(it)


def _fail_on_three(i):
    if i == 3:
        raise ValueError("three")
    return i


@pytest.mark.parametrize("chunksize", [1, 2, None])
def test_map_raises_at_the_failing_item(ex, chunksize):
    it = ex.map(_fail_on_three, range(6), chunksize=chunksize)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="three") as info:
        next(it)
    assert isinstance(info.value.__cause__, parrun.RemoteTraceback)


def test_exception_has_worker_traceback(ex):
    def inner():
        raise KeyError("deep")

    f = ex.submit(lambda: inner())
    with pytest.raises(KeyError) as info:
        f.result(timeout=TIMEOUT)
    assert "inner" in str(info.value.__cause__)
    assert ex.submit(int, "7").result(timeout=TIMEOUT) == 7


def test_an_exception_class_made_by_the_caller_comes_back_as_itself(ex, pool):
    class MyError(Exception):  # cloudpickled by value: plain pickle fails in the worker
        pass

    def fail(*_):
        raise MyError("bad")

    with pytest.raises(MyError, match="bad"):
        ex.submit(fail).result(timeout=TIMEOUT)
    with pytest.raises(MyError, match="bad"):
        list(ex.map(fail, range(100)))  # batched
    with pytest.raises(MyError, match="bad"):
        pool.map(fail, np.arange(10.0))


SCRIPT_OBJECTS = textwrap.dedent("""
    import dataclasses, numpy as np, parrun

    def square(x):
        return x * x

    @dataclasses.dataclass
    class Box:
        v: int

    class MyError(Exception):
        pass

    def fail(*_):
        raise MyError("bad")

    # An executor nobody holds: it lives until its map's results are read.
    assert list(parrun.Executor(2).map(square, range(100))) == [i * i for i in range(100)]
    with parrun.Executor(2) as ex:
        assert list(ex.map(square, range(200))) == [i * i for i in range(200)]  # fn as an arg
        assert ex.submit(lambda b: b.v, Box(5)).result() == 5
        assert ex.submit(lambda: Box(6)).result() == Box(6)
        try:
            ex.submit(fail).result()
        except MyError:
            pass
    with parrun.Pool(2) as p:
        try:
            p.map(fail, np.arange(10.0))
        except MyError:
            print("ok")
""")


def test_a_scripts_functions_classes_and_exceptions_travel(tmp_path):
    """Workers do not import the user's script: what it defines goes by value, as
    arguments, results and exceptions too."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT_OBJECTS)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_shutdown_semantics():
    e = parrun.Executor(1)
    f = e.submit(time.sleep, 0.2)
    e.shutdown(wait=True)
    assert f.done() and f.result() is None
    with pytest.raises(RuntimeError, match="after shutdown"):
        e.submit(int)
    e.shutdown()  # idempotent
    with parrun.Executor(2) as e2:
        fs = [e2.submit(time.sleep, 0.05) for _ in range(4)]
    assert all(f.done() for f in fs)


def test_cancel_pending_and_shutdown_without_waiting():
    e = parrun.Executor(1)
    blocker = e.submit(time.sleep, 1.0)
    assert wait_until(blocker.running, timeout=5)
    queued = [e.submit(time.sleep, 1.0) for _ in range(5)]
    time.sleep(0.05)
    assert queued[-1].cancel()
    assert queued[-1].cancelled()
    with pytest.raises(cf.CancelledError):
        queued[-1].result()
    t0 = time.monotonic()
    e.shutdown(wait=False, cancel_futures=True)
    assert time.monotonic() - t0 < 0.5
    assert blocker.result(timeout=TIMEOUT) is None  # started: it finishes
    assert not cf.wait(queued, timeout=TIMEOUT).not_done
    # The background shutdown finishes: workers gone, segments freed.
    assert wait_until(lambda: e._pool not in parrun._pool._live_pools, timeout=TIMEOUT)
    assert sum(f.cancelled() for f in queued) >= 4


def test_shutdown_without_waiting_still_runs_what_was_submitted():
    e = parrun.Executor(2)
    fs = [e.submit(time.sleep, 0.1) for _ in range(8)]
    e.shutdown(wait=False)
    assert not cf.wait(fs, timeout=TIMEOUT).not_done
    assert not any(f.cancelled() for f in fs)
    e2 = parrun.Executor(1)
    e2.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        e2.pool  # noqa: B018 - would start a pool nobody closes


EXIT_WITH_PENDING = textwrap.dedent("""
    import os, sys, time, parrun

    def work(i):
        time.sleep(0.1)
        open(os.path.join(sys.argv[1], str(i)), "w").close()

    {make}
    fs = [ex.submit(work, i) for i in range(8)]
    {then}
""")


@pytest.mark.parametrize("then", ["", "ex.shutdown(wait=False)", "del ex, fs"])
def test_a_program_that_exits_runs_its_submitted_tasks_first(tmp_path, then):
    """As concurrent.futures promises: no shutdown, or one that does not wait, and the
    program still exits only after the tasks submitted have run."""
    script = tmp_path / "script.py"
    script.write_text(EXIT_WITH_PENDING.format(make="ex = parrun.Executor(2)", then=then))
    done = tmp_path / "done"
    done.mkdir()
    r = subprocess.run([sys.executable, str(script), str(done)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(int(p.name) for p in done.iterdir()) == list(range(8)), r.stderr


EXIT_AFTER_CANCEL = textwrap.dedent("""
    import os, sys, time, parrun

    def work(i, t):
        time.sleep(t)
        open(os.path.join(sys.argv[1], str(i)), "w").close()

    ex = parrun.Executor(2)
    fs = [ex.submit(work, i, 6.0 if i < 2 else 0.1) for i in range(6)]
    while not (fs[0].running() and fs[1].running()):
        time.sleep(0.01)
    ex.shutdown(wait=False, cancel_futures=True)
    print(*[i for i, f in enumerate(fs) if f.cancelled()])
""")


@pytest.mark.timeout(120)
def test_a_program_that_exits_after_cancelling_still_finishes_the_running_tasks(tmp_path):
    """shutdown(wait=False, cancel_futures=True), then the end of the program: the tasks
    running go on to their end, longer than the pools' 5 s at exit (they were killed)."""
    script = tmp_path / "script.py"
    script.write_text(EXIT_AFTER_CANCEL)
    done = tmp_path / "done"
    done.mkdir()
    r = subprocess.run([sys.executable, str(script), str(done)], capture_output=True,
                       text=True, timeout=100)
    assert r.returncode == 0, r.stderr
    cancelled = [int(w) for w in r.stdout.split()]
    assert cancelled and min(cancelled) >= 2, r.stdout  # those handed out are not
    ran = sorted(int(p.name) for p in done.iterdir())
    assert ran == [i for i in range(6) if i not in cancelled], (ran, r.stderr)


def test_shutdown_in_a_done_callback_does_not_wait_for_itself():
    e = parrun.Executor(2)
    errors = []

    def cb(_f):
        try:
            e.shutdown(wait=True)
        except RuntimeError as err:
            errors.append(err)

    fs = [e.submit(time.sleep, t) for t in (0.05, 0.3, 0.3)]
    fs[0].add_done_callback(cb)
    assert not cf.wait(fs, timeout=TIMEOUT).not_done
    assert len(errors) == 1 and "callback" in str(errors[0])
    assert wait_until(lambda: e._pool not in parrun._pool._live_pools, timeout=TIMEOUT)


def test_shutdown_in_a_done_callback_while_another_thread_submits():
    """The callback runs in the thread that holds the task lock, which the submit under way
    waits for: shutdown must not wait for that submit (it once deadlocked here)."""
    e = parrun.Executor(2)
    e.submit(abs, 0).result(timeout=TIMEOUT)
    e.submit(time.sleep, 0.2).add_done_callback(lambda _f: e.shutdown(wait=False))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError):
        while time.monotonic() - t0 < TIMEOUT:
            e.submit(abs, 1)
    assert time.monotonic() - t0 < TIMEOUT
    assert wait_until(lambda: e._pool not in parrun._pool._live_pools, timeout=TIMEOUT)


class SlowToPickle:
    def __reduce__(self):
        time.sleep(0.5)
        return (int, (7,))


def test_shutdown_in_a_done_callback_keeps_a_submit_under_way():
    e = parrun.Executor(2)
    e.submit(abs, 0).result(timeout=TIMEOUT)
    out = {}

    def submitter():
        out["f"] = e.submit(abs, SlowToPickle())  # past the shutdown check, pickling

    blocker = e.submit(time.sleep, 0.2)
    th = threading.Thread(target=submitter)
    th.start()
    blocker.add_done_callback(lambda _f: e.shutdown(wait=False))
    th.join(TIMEOUT)
    assert out["f"].result(timeout=TIMEOUT) == 7
    assert wait_until(lambda: e._pool not in parrun._pool._live_pools, timeout=TIMEOUT)


def test_shutdown_waits_for_a_submit_already_under_way():
    e = parrun.Executor(2)
    e.submit(abs, 0).result(timeout=TIMEOUT)
    out = {}

    def submitter():
        out["f"] = e.submit(abs, SlowToPickle())

    th = threading.Thread(target=submitter)
    th.start()
    time.sleep(0.1)  # pickling its argument
    e.shutdown(wait=True)
    th.join(TIMEOUT)
    assert out["f"].done() and out["f"].result() == 7


def _sleep_pid(t):
    time.sleep(t)
    return os.getpid()


def test_slow_tasks_after_quick_ones_stay_cancellable_and_spread():
    """Costs are timed per function: a burst of quick tasks does not make the next
    function's slow tasks look quick (all handed out at once, so none could be cancelled,
    and two run one after the other on one worker while the other idled)."""
    with parrun.Executor(2) as e:
        for _ in range(3):
            cf.wait([e.submit(abs, i) for i in range(300)], timeout=TIMEOUT)
            pids = [e.submit(_sleep_pid, 0.4) for _ in range(2)]
            assert len({f.result(timeout=TIMEOUT) for f in pids}) == 2
        cf.wait([e.submit(abs, i) for i in range(300)], timeout=TIMEOUT)
        fs = [e.submit(time.sleep, 0.3) for _ in range(20)]
        time.sleep(0.1)
        assert sum(f.cancel() for f in fs) >= 12  # all but about two per worker


class NoUnpickle:
    def __reduce__(self):
        return (_explode, ())


def _explode():
    raise RuntimeError("cannot rebuild")


class NoPickle:
    def __reduce__(self):
        raise RuntimeError("cannot pickle me")


def test_unpicklable_arguments_and_results_fail_only_their_future(ex):
    f = ex.submit(len, [NoPickle()])
    with pytest.raises(TypeError, match="could not be pickled"):
        f.result(timeout=TIMEOUT)
    f = ex.submit(lambda: NoPickle())
    with pytest.raises(TypeError, match="result of the task could not be pickled"):
        f.result(timeout=TIMEOUT)
    f = ex.submit(id, NoUnpickle())
    with pytest.raises(TypeError, match="could not be unpickled"):
        f.result(timeout=TIMEOUT)
    lock = threading.Lock()
    with pytest.raises(TypeError, match="could not be pickled"):
        ex.submit(lambda: lock)
    assert ex.submit(max, 3, 4).result(timeout=TIMEOUT) == 4


def _die(how):
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "exit":
        os._exit(3)
    elif how == "segv":
        import ctypes

        ctypes.string_at(0)


@pytest.mark.parametrize("how,text", [("kill", r"SIGKILL\(-9\)"), ("exit", "exit code 3"),
                                      ("segv", r"SIGSEGV\(-11\)")])
def test_worker_death_fails_only_its_task(how, text):
    with parrun.Executor(2) as e:
        slow = [e.submit(time.sleep, 0.3) for _ in range(2)]
        bad = e.submit(_die, how)
        with pytest.raises(parrun.WorkerCrashed, match=text) as info:
            bad.result(timeout=TIMEOUT)
        assert isinstance(info.value, BrokenProcessPool)
        assert str(info.value.pid) in str(info.value)
        assert [f.result(timeout=TIMEOUT) for f in slow] == [None, None]
        assert list(e.map(abs, range(-20, 0))) == list(range(20, 0, -1))
        assert e.pool.task_stats.crashed == 1
        assert len(e.pool.pids) == 2


def test_retries_rerun_a_crashed_task():
    flag = parrun.zeros(1, np.int64)

    def once(flag):
        if flag[0] == 0:
            flag[0] = 1
            os.kill(os.getpid(), signal.SIGKILL)
        return "second time lucky"

    with parrun.Executor(2, retries=1) as e:
        assert e.submit(once, flag).result(timeout=TIMEOUT) == "second time lucky"
        assert e.pool.task_stats.retried == 1
    flag.release()


def _set_global(v):
    global INITIALIZED
    INITIALIZED = v


def _get_global():
    return INITIALIZED


def _bad_init():
    raise OSError("no database")


def test_initializer():
    with parrun.Executor(2, initializer=_set_global, initargs=(42,)) as e:
        assert e.submit(_get_global).result(timeout=TIMEOUT) == 42
    e = parrun.Executor(2, initializer=_bad_init)
    f = e.submit(int)
    with pytest.raises(BrokenProcessPool):
        f.result(timeout=TIMEOUT)
    with pytest.raises(BrokenProcessPool):
        e.submit(int)
    e.shutdown()


def test_large_arrays_travel_through_shared_memory(ex):
    a = np.arange(2**20, dtype=np.float64)  # 8 MiB, plain
    before = shm_segments(os.getpid())
    r = ex.submit(lambda x: x * 2, a).result(timeout=TIMEOUT)
    assert isinstance(r, parrun.SharedArray)
    np.testing.assert_array_equal(r, 2 * a)
    small = ex.submit(lambda x: x + 1, np.ones(10)).result(timeout=TIMEOUT)
    assert type(small) is np.ndarray and small.sum() == 20
    del r
    import gc

    gc.collect()
    assert wait_until(lambda: shm_segments(os.getpid()) <= before, timeout=5)


def test_shared_array_arguments_are_not_copied(ex):
    s = parrun.zeros(1000, np.int64)

    def fill(arr, lo, hi):
        arr[lo:hi] = np.arange(lo, hi)
        return len(pickle.dumps(arr))

    sizes = [f.result(timeout=TIMEOUT) for f in
             [ex.submit(fill, s, lo, lo + 100) for lo in range(0, 1000, 100)]]
    np.testing.assert_array_equal(s, np.arange(1000))
    assert max(sizes) < 1024  # the workers hold handles, not copies
    s.release()


def test_function_shipped_once_per_worker(ex):
    counter = parrun.zeros(1, np.int64)

    fn = Counted(counter, add=0)
    assert [f.result(timeout=TIMEOUT) for f in [ex.submit(fn, i) for i in range(300)]] == \
        list(range(300))
    assert 1 <= counter[0] <= 2
    counter.release()


def test_map_and_submit_share_the_pool(pool):
    x = parrun.asshared(np.arange(100_000.0))
    fs = [pool.submit(time.sleep, 0.01) for _ in range(20)]
    y = pool.map(np.negative, x)
    np.testing.assert_array_equal(y, -x)
    assert all(f.result(timeout=TIMEOUT) is None for f in fs)
    y.release()
    x.release()


CTRL_C = textwrap.dedent("""
    import time, parrun
    e = parrun.Executor(2)
    fs = [e.submit(time.sleep, 30) for _ in range(6)]
    print(" ".join(map(str, e.pool.pids)), flush=True)
    try:
        e.shutdown(wait=True)
    except KeyboardInterrupt:
        print("interrupted", sum(f.cancelled() for f in fs), sum(f.done() for f in fs),
              flush=True)
""")


def test_ctrl_c_while_waiting_cancels_and_cleans_up():
    proc = subprocess.Popen([sys.executable, "-c", AS_AT_A_TERMINAL + CTRL_C],
                            stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=TIMEOUT)
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out.startswith("interrupted")
    cancelled, done = map(int, out.split()[1:3])
    assert cancelled >= 1 and done == 6  # not started: cancelled; running: failed
    assert wait_until(lambda: not any(alive(p) for p in pids), timeout=5)
    assert wait_until(lambda: not shm_segments(proc.pid), timeout=5)


def test_maps_right_after_task_bursts_see_no_stale_task_mode(pool):
    """A map that starts the moment the tasks before it are done must not have its pieces
    taken for tasks by a worker still leaving task mode (a race once seen as a map of
    zeros)."""
    x = parrun.asshared(np.arange(1, 5001, dtype=np.float64))
    for i in range(200):
        fs = [pool.submit(abs, -j) for j in range(i % 7 + 1)]
        assert [f.result(timeout=TIMEOUT) for f in fs] == list(range(i % 7 + 1))
        y = pool.map(np.negative, x)
        np.testing.assert_array_equal(y, -x)
        y.release()
    x.release()


def test_a_failed_task_collector_fails_futures_instead_of_hanging(monkeypatch):
    """If the thread that serves tasks dies of a bug, the futures it held fail, and later
    submits raise BrokenPool at once; map still works and the pool closes cleanly."""
    from parrun import _tasks

    def broken_serve(self):
        raise RuntimeError("injected collector bug")

    monkeypatch.setattr(_tasks.TaskService, "_serve", broken_serve)
    with parrun.Pool(2) as p:
        f = p.submit(pow, 2, 10)
        with pytest.raises((RuntimeError, parrun.BrokenPool), match="injected collector bug"):
            f.result(timeout=TIMEOUT)
        assert wait_until(lambda: not p._tasks.thread.is_alive())
        with pytest.raises(parrun.BrokenPool, match="task collector failed"):
            p.submit(pow, 2, 3)
        x = parrun.asshared(np.arange(1000.0))
        y = p.map(np.negative, x)
        np.testing.assert_array_equal(y, -x)
        x.release()
        y.release()


def _big_and_local():
    class Local:  # only cloudpickle can pickle it: the fast pickler fails after the array
        pass
    return np.ones(1 << 18), Local()


def _big_and_unpicklable():
    return np.ones(1 << 18), threading.Lock()


def test_results_that_fail_to_pickle_leave_no_segment(pool):
    for _ in range(2):
        big, local = pool.submit(_big_and_local).result(timeout=TIMEOUT)
        assert big.sum() == 1 << 18 and type(local).__name__ == "Local"
        del big
        with pytest.raises(TypeError, match="could not be pickled"):
            pool.submit(_big_and_unpicklable).result(timeout=TIMEOUT)
    # A worker's segments are named after it; the parent adopted (and released) the rest.
    assert wait_until(lambda: not any(shm_segments(pid) for pid in pool.pids)), \
        [shm_segments(pid) for pid in pool.pids]


def test_shared_arrays_made_in_a_worker_come_back_as_values(pool):
    attached = set(parrun._shm._attached)
    small = pool.submit(lambda: parrun.full(10, 3.0)).result(timeout=TIMEOUT)
    np.testing.assert_array_equal(small, np.full(10, 3.0))
    big = pool.submit(lambda: parrun.full(1 << 18, 2.0)[::2]).result(timeout=TIMEOUT)
    assert big.shape == (1 << 17,) and (big == 2.0).all()
    x = np.arange(4000.0)
    total = pool.map_reduce(lambda a: parrun.full(1 << 18, a.sum()), np.add, x, grain=500)
    np.testing.assert_array_equal(total, np.full(1 << 18, x.sum()))
    assert set(parrun._shm._attached) <= attached  # the parent mapped no worker's segment


def test_array_subclasses_keep_what_they_add(pool):
    m = np.ma.array(np.arange(200_000.0), mask=np.arange(200_000) % 2 == 0)
    want = m.sum()
    # A lambda among the arguments sends them all through cloudpickle: the mask stays too.
    assert pool.submit(lambda a, scale: a.sum() * scale(1), m, abs).result() == want
    assert pool.submit(lambda a, scale: a.sum() * scale(1), m, lambda s: s).result() == want


def test_a_pool_that_ran_tasks_is_garbage_collected():
    p = parrun.Pool(2)
    assert p.submit(abs, -1).result(timeout=TIMEOUT) == 1
    pids, ref = p.pids, weakref.ref(p)
    del p
    gc.collect()
    assert ref() is None  # the task collector thread does not keep it alive
    assert wait_until(lambda: not any(_alive(pid) for pid in pids))


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_map_right_after_a_task_counts_only_its_own_items():
    """A task's worker once counted its last piece in the control block after saying it was
    idle: the next map's last_stats got the task's item and busy time (and its cost
    estimate with them)."""
    with parrun.Pool(4) as p:
        x = parrun.asshared(np.arange(15, dtype=np.int64))
        out = parrun.zeros(15, np.int64)
        for _ in range(300):
            p.submit(int, 1).result(timeout=TIMEOUT)
            p.map(np.negative, x, out=out)
            st = p.last_stats
            assert sum(w.items for w in st.workers) == st.items == 15, st
        p.submit(time.sleep, 0.05).result(timeout=TIMEOUT)
        p.map(np.negative, x, out=out)
        assert max(p.last_stats.busy_s) < 0.04, p.last_stats  # not the task's 50 ms
        x.release()
        out.release()


def _raise_with_a_shared_array(n):
    a = parrun.full(n, 7.0)  # made in the worker: gone with the task's end
    raise ValueError("bad", a)


class _PicklesBadly(Exception):
    def __reduce__(self):
        raise SystemExit("no pickling")


def _raise_unpicklable():
    raise _PicklesBadly("x")


def test_an_exception_holding_a_shared_array_the_task_made_arrives(ex):
    # It went as a handle to the worker's segment, unlinked before the caller read it:
    # "the task's result could not be unpickled: SharedMemoryError".
    for n in (10, 300_000):  # in the pickle, and through a segment of its own
        e = ex.submit(_raise_with_a_shared_array, n).exception(timeout=TIMEOUT)
        assert isinstance(e, ValueError) and e.args[0] == "bad", repr(e)
        np.testing.assert_array_equal(e.args[1], np.full(n, 7.0))


def test_an_exception_whose_pickling_raises_systemexit_fails_the_future_only(ex):
    # SystemExit out of the exception's pickling ended the worker: WorkerCrashed.
    pids = list(ex.pool.pids)
    with pytest.raises(parrun.ParrunError, match=r"_PicklesBadly: x .*SystemExit"):
        ex.submit(_raise_unpicklable).result(timeout=TIMEOUT)
    assert ex.submit(abs, -5).result(timeout=TIMEOUT) == 5
    assert ex.pool.pids == pids


def _nap(t):
    time.sleep(t)
    return t


@pytest.mark.timeout(120)
def test_a_map_is_not_held_up_by_a_steady_stream_of_tasks():
    # The task collector kept the pool for as long as any task was pending or running: a
    # producer keeping tasks outstanding held a map back until it stopped.
    with parrun.Executor(2) as e:
        pool = e.pool
        x = parrun.asshared(np.arange(1000.0))
        mapped = threading.Event()
        results: list = []

        def stream():
            fs: list = []
            end = time.monotonic() + 30
            while time.monotonic() < end and not (mapped.is_set() and len(results) > 50):
                fs.append(e.submit(_nap, 0.005))
                if len(fs) > 8:
                    results.append(fs.pop(0).result(timeout=TIMEOUT))
            results.extend(f.result(timeout=TIMEOUT) for f in fs)

        t = threading.Thread(target=stream)
        t.start()
        try:
            assert wait_until(lambda: len(results) > 20)
            for _ in range(3):
                t0 = time.monotonic()
                y = pool.map(np.sqrt, x)
                waited = time.monotonic() - t0
                np.testing.assert_array_equal(y, np.sqrt(x))
                y.release()
                assert waited < 5, waited  # the tasks in flight, not the whole stream
                time.sleep(0.1)
        finally:
            mapped.set()
            t.join(60)
            x.release()
        assert results and all(r == 0.005 for r in results)


def _init_fails_once_flagged(flag):
    if os.path.exists(flag):
        raise RuntimeError("the initializer fails from now on")


def _exit_now():
    os._exit(1)


def test_a_crash_whose_replacement_cannot_start_says_so(tmp_path):
    # The dead task's error said "a replacement worker has started" when the replacement's
    # initializer had failed (and the executor was broken).
    flag = str(tmp_path / "flag")
    with parrun.Executor(2, initializer=_init_fails_once_flagged, initargs=(flag,)) as e:
        assert e.submit(pow, 2, 3).result(timeout=TIMEOUT) == 8
        open(flag, "w").close()
        with pytest.raises(parrun.WorkerCrashed, match="its replacement failed to start"):
            e.submit(_exit_now).result(timeout=TIMEOUT)
        with pytest.raises(BrokenProcessPool, match="initializer failed"):
            e.submit(pow, 2, 4).result(timeout=TIMEOUT)
