"""Fault injection with real processes, checked against serial references.

* Crash table: a worker dies (SIGKILL, segfault, ``os._exit``, abort) or runs out of memory
  in each phase of map, map_reduce and submit (unpickling the function or the arguments, the
  probe piece, running, pickling the result).
* Chaos: a thread SIGKILLs a random worker at a random moment of a random call (map, map
  with ``out``, map_reduce, submitted tasks, ``parrun.nn.mlp``); every result is compared with
  the serial one, and a call may only fail with ``WorkerCrashed`` where the docs say so
  (map_reduce).
* Parent death: the parent (a subprocess) is SIGKILLed at random points; its workers must
  exit within 2 s and its segments must go.
* Ctrl-C during a long map and while waiting on futures.

CI runs short versions (about 30 s in all); ``python -m pytest -m slow`` runs the long ones.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import operator
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest
from conftest import AS_AT_A_TERMINAL, TIMEOUT, shm_segments, take_down_if_hung, wait_until

import parrun


def chain(x):
    return np.tanh(1.7 * x + 0.3) ** 2 - 0.5 * x


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- the crash table ------------------------------------------------------------------------
class Once:
    """A token file: ``take()`` is True in exactly one process, ever (O_EXCL is atomic)."""

    def __init__(self) -> None:
        self.path = os.path.join(tempfile.mkdtemp(prefix="parrun-chaos-"), "token")

    def take(self) -> bool:
        try:
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    @property
    def taken(self) -> bool:
        return os.path.exists(self.path)

    def remove(self) -> None:
        if self.taken:
            os.unlink(self.path)
        os.rmdir(os.path.dirname(self.path))


def crash(how: str) -> None:
    """End this process the way ``how`` says (no core file)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "segv":
        import ctypes

        ctypes.string_at(0)
    elif how == "exit":
        os._exit(7)
    elif how == "abort":
        os.abort()
    raise AssertionError(f"unknown crash {how!r}")


def exhaust_memory() -> None:
    """Allocate far more than this process may map: under the RLIMIT_AS the memory pool's
    initializer set, this raises MemoryError without touching the machine's memory."""
    np.ones(8 << 30, np.uint8)


def limit_address_space(extra: int) -> None:
    """Pool initializer: cap the worker's address space at what it maps now plus ``extra``."""
    vms = psutil.Process().memory_info().vms
    resource.setrlimit(resource.RLIMIT_AS, (vms + extra, vms + extra))


class DiesWhenUnpickled:
    """Unpickling this (a function or an argument) kills the worker, once."""

    def __init__(self, once: Once, how: str):
        self.once, self.how = once, how

    def __reduce__(self):
        return _rebuild_dying, (self.once, self.how)

    def __call__(self, *args):
        return args[0] * 2 if args else "ran"


def _rebuild_dying(once, how):
    if once.take():
        crash(how)
    return DiesWhenUnpickled(once, how)


class DiesWhenPickled:
    """A task result whose pickling kills the worker, once (then it pickles as 'pickled')."""

    def __init__(self, once: Once, how: str):
        self.once, self.how = once, how

    def __reduce__(self):
        if self.once.take():
            crash(self.how)
        return str, ("pickled",)


def dies_on_value(once: Once, how: str, value: int):
    """A map function that kills its worker, once, on the piece holding ``value``."""
    def fn(x):
        if value in x[:, 0] and once.take():
            crash(how)
        return x * 2
    return fn


HOWS = ["sigkill", "segv", "exit", "abort"]
EXIT_TEXT = {"sigkill": r"SIGKILL\(-9\)", "segv": r"SIGSEGV\(-11\)", "exit": "exit code 7",
             "abort": r"SIGABRT\(-6\)"}


@pytest.fixture(scope="module")
def retry_pool():
    """Tasks whose worker dies run once more: every future of the table must succeed."""
    with parrun.Pool(2, retries=1) as p:
        yield p


@pytest.fixture
def once():
    o = Once()
    yield o
    o.remove()


def _x():
    return np.arange(4000, dtype=np.float64).reshape(2000, 2)


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("phase", ["unpickle_fn", "probe", "run"])
def test_map_survives_a_crash_in_each_phase(retry_pool, once, phase, how):
    x = _x()
    if phase == "unpickle_fn":
        fn = DiesWhenUnpickled(once, how)
    else:
        fn = dies_on_value(once, how, 0 if phase == "probe" else 3000)
    before = set(retry_pool.pids)
    y = retry_pool.map(fn, x, grain=50)
    assert once.taken  # it did crash
    np.testing.assert_array_equal(y, 2 * x)
    assert len(set(retry_pool.pids) - before) == 1  # one worker replaced
    y.release()
    z = retry_pool.map(np.negative, x)  # the next job is right
    np.testing.assert_array_equal(z, -x)
    z.release()


def adds_one_and_dies(once: Once):
    """A map function taking ``out`` that writes its piece, then kills its worker, once."""
    def fn(a, out):
        np.add(a, 1.0, out=out)
        if (a >= 3000).any() and once.take():
            crash("sigkill")
        return out
    return fn


def accumulates_and_dies(once: Once):
    def fn(a, out):
        out += a
        if (a >= 3000).any() and once.take():
            crash("sigkill")
        return out
    return fn


@pytest.mark.parametrize("case", ["in_place", "accumulate", "plain_out"])
def test_a_crash_in_a_map_that_reads_out_is_an_error_not_a_piece_applied_twice(
        retry_pool, once, case):
    """A dead worker's piece is run again only where that is harmless: not when out is also
    an input (out=x), nor when fn takes out and may read it (out += a). Those once gave
    wrong rows, silently (each applied twice)."""
    x = parrun.asshared(np.arange(4000.0))
    want = x + 1 if case == "in_place" else 2 * x
    if case == "in_place":
        fn, out = adds_one_and_dies(once), x
    else:
        fn = accumulates_and_dies(once)
        out = parrun.asshared(x.copy()) if case == "accumulate" else x.copy()
    before = out.copy()
    with pytest.raises(parrun.WorkerCrashed, match="not run again") as e:
        retry_pool.map(fn, x, out=out, grain=100)
    assert once.taken
    if case == "plain_out":  # worked on a shared copy: left as it was
        np.testing.assert_array_equal(out, before)
    else:
        lost = np.zeros(len(x), bool)
        for a, b in re.findall(r"(\d+):(\d+)", str(e.value).split("Rows ")[1].split(" may")[0]):
            lost[int(a):int(b)] = True
        assert lost.sum() >= 100
        np.testing.assert_array_equal(out[~lost], want[~lost])  # the rest is done, once
    np.testing.assert_array_equal(retry_pool.map(np.negative, x), -x)  # the pool lives on
    x.release()
    if case == "accumulate":
        out.release()


@pytest.mark.parametrize("how", HOWS)
def test_map_reduce_crash_raises_worker_crashed(retry_pool, once, how):
    x = _x()
    fn = dies_on_value(once, how, 3000)
    with pytest.raises(parrun.WorkerCrashed, match=EXIT_TEXT[how]):
        retry_pool.map_reduce(lambda t: fn(t).sum(), operator.add, x, grain=50)
    assert retry_pool.map_reduce(np.sum, operator.add, x) == x.sum()


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("phase", ["unpickle_fn", "unpickle_args", "run", "pickle_result"])
def test_submit_survives_a_crash_in_each_phase(retry_pool, once, phase, how):
    if phase == "unpickle_fn":
        f = retry_pool.submit(DiesWhenUnpickled(once, how), 21)
        want = 42
    elif phase == "unpickle_args":
        f = retry_pool.submit(type, DiesWhenUnpickled(once, how))
        want = DiesWhenUnpickled
    elif phase == "run":
        f = retry_pool.submit(lambda: (once.take() and crash(how)) or "ran")
        want = "ran"
    else:
        f = retry_pool.submit(DiesWhenPickled, once, how)
        want = "pickled"
    others = [retry_pool.submit(pow, i, 2) for i in range(50)]
    assert f.result(timeout=TIMEOUT) == want
    assert once.taken
    assert [g.result(timeout=TIMEOUT) for g in others] == [i * i for i in range(50)]
    assert retry_pool.submit(operator.add, 2, 3).result(timeout=TIMEOUT) == 5


def _big_result_then_death(once: Once):
    # The array goes first, into a segment made for the parent; then pickling kills.
    return np.ones(1 << 18), DiesWhenPickled(once, "sigkill")


def test_a_worker_killed_while_sending_a_big_result_leaves_no_segment(pool, once):
    before = set(pool.pids)
    with pytest.raises(parrun.WorkerCrashed, match="SIGKILL"):
        pool.submit(_big_result_then_death, once).result(timeout=TIMEOUT)
    assert once.taken
    assert wait_until(lambda: before - set(pool.pids))  # replaced
    (dead,) = before - set(pool.pids)
    assert wait_until(lambda: not shm_segments(dead)), shm_segments(dead)
    assert pool.submit(operator.add, 2, 3).result(timeout=TIMEOUT) == 5


def always_crash(x):
    crash("segv")


@pytest.mark.parametrize("with_out", [False, True], ids=["probe", "pieces"])
def test_a_function_that_always_crashes_fails_clearly(retry_pool, with_out):
    """Lost pieces are re-run, but not forever: a call gives up after a few deaths."""
    x = np.arange(1000.0)
    out = parrun.empty(1000) if with_out else None
    t0 = time.monotonic()
    with pytest.raises(parrun.WorkerCrashed, match=r"workers died .*SIGSEGV\(-11\)"):
        retry_pool.map(always_crash, x, out=out, grain=10)
    assert time.monotonic() - t0 < TIMEOUT
    with pytest.raises(parrun.WorkerCrashed, match=r"SIGSEGV\(-11\)"):
        retry_pool.submit(always_crash, 1).result(timeout=TIMEOUT)  # retried once, then failed
    y = retry_pool.map(np.negative, x)
    np.testing.assert_array_equal(y, -x)
    y.release()
    if out is not None:
        out.release()


def test_submit_crash_without_retries_fails_only_that_future(pool, once):
    f = pool.submit(lambda: (once.take() and crash("abort")) or "ran")
    others = [pool.submit(pow, i, 2) for i in range(50)]
    with pytest.raises(parrun.WorkerCrashed, match=r"SIGABRT\(-6\)"):
        f.result(timeout=TIMEOUT)
    assert [g.result(timeout=TIMEOUT) for g in others] == [i * i for i in range(50)]


def _exit_at(x, k):
    if x == k:
        os._exit(1)
    return x


@pytest.mark.timeout(120)
@pytest.mark.parametrize("retries", [0, 1])
def test_a_task_that_kills_its_worker_fails_alone_among_batched_tasks(retries):
    # Quick tasks run many to a piece. The one that killed its worker failed every task of
    # the piece: those after it, which never started, and those before it, which had run
    # (their results not sent yet), all "died while running this task"; with retries, the
    # innocent ones used up theirs.
    with parrun.Pool(2, retries=retries) as pool:
        lost = 0
        for _ in range(3):
            for i in range(5):
                pool.submit(_exit_at, i, -1).result(timeout=TIMEOUT)  # timed as quick
            fs = [pool.submit(_exit_at, i, 50) for i in range(100)]
            assert not cf.wait(fs, timeout=TIMEOUT).not_done
            failed = [i for i, f in enumerate(fs) if f.exception() is not None]
            assert failed and max(failed) == 50, failed  # none that had not started
            assert [f.result() for f in fs[51:]] == list(range(51, 100))
            with pytest.raises(parrun.WorkerCrashed, match="died while running this task"):
                fs[50].result()
            for i in failed[:-1]:  # ran, but the worker died before sending their results
                with pytest.raises(parrun.WorkerCrashed, match="after this task ran"):
                    fs[i].result()
            if retries:
                assert failed == [50], failed  # the others ran again
            lost += len(failed)
        assert pool.task_stats.crashed == lost, pool.task_stats


@pytest.fixture(scope="module")
def small_memory_pool():
    with parrun.Pool(2, initializer=limit_address_space, initargs=(512 << 20,)) as p:
        yield p


def test_a_task_that_exhausts_memory_fails_clearly(small_memory_pool):
    p = small_memory_pool
    pids = p.pids
    x = np.arange(1000.0)
    with pytest.raises(MemoryError) as info:
        p.map(lambda t: (exhaust_memory(), t)[1], x, grain=10)
    assert isinstance(info.value.__cause__, parrun.RemoteTraceback)
    with pytest.raises(MemoryError):
        p.map_reduce(lambda t: (exhaust_memory(), t.sum())[1], operator.add, x)
    with pytest.raises(MemoryError):
        p.submit(exhaust_memory).result(timeout=TIMEOUT)
    assert p.pids == pids  # the workers survived it
    y = p.map(np.negative, x)
    np.testing.assert_array_equal(y, -x)
    assert p.submit(sum, [1, 2]).result(timeout=TIMEOUT) == 3
    y.release()


# -- chaos: random kills from outside ------------------------------------------------------
class Killer:
    """Sends SIGKILL to one of ``pool``'s current workers after ``delay`` seconds."""

    def __init__(self, pool: parrun.Pool, delay: float, rng: random.Random):
        self.pool, self.delay, self.rng = pool, delay, rng
        self.victim: int | None = None
        self.sent_at = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        time.sleep(self.delay)
        victim = self.rng.choice(self.pool.pids)
        if victim in self.pool.pids:  # still a worker of this pool (never a reused pid)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                return
            self.victim, self.sent_at = victim, time.monotonic()

    def join(self) -> None:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


class ChaosWorkload:
    """Calls of each kind with their serial references."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.x = parrun.asshared(rng.standard_normal(300_000))
        self.x_ref = chain(self.x)
        self.plain = rng.standard_normal((150_000, 2))  # not shared: copied per call
        self.out = parrun.empty((150_000, 2))
        self.ints = parrun.asshared(rng.integers(0, 1000, 400_000))
        self.mx = rng.standard_normal((1024, 128))
        self.w = (rng.standard_normal((128, 256)) * 0.1, rng.standard_normal(256),
                  rng.standard_normal((256, 64)) * 0.1, rng.standard_normal(64))
        from parrun import nn

        self.nn = nn
        self.mlp_ref = nn.mlp_reference(self.mx, *self.w)

    def release(self) -> None:
        for a in (self.x, self.out, self.ints):
            a.release()

    def run(self, kind: str, pool: parrun.Pool, rng: random.Random) -> str:
        """Run one call; check it; return 'ok' or 'crashed' (an allowed WorkerCrashed)."""
        if kind == "map":
            y = pool.map(chain, self.x, grain=rng.choice([None, 64, 1000, 20_000]))
            np.testing.assert_array_equal(y, self.x_ref)
            y.release()
        elif kind == "map_out":
            self.out[:] = np.nan
            r = pool.map(chain, self.plain, out=self.out, grain=rng.choice([None, 500]))
            assert r is self.out
            np.testing.assert_array_equal(self.out, chain(self.plain))
        elif kind == "reduce":
            try:
                s = pool.map_reduce(np.sum, operator.add, self.ints, grain=2000)
            except parrun.WorkerCrashed as e:  # documented: a lost partial is an error
                assert "died during map_reduce" in str(e) and e.pid is not None
                return "crashed"
            assert s == int(self.ints.sum())
        elif kind == "submit":
            n = rng.randint(20, 200)
            fs = [pool.submit(_task, i) for i in range(n)]
            assert [f.result(timeout=TIMEOUT) for f in fs] == [_task(i) for i in range(n)]
        elif kind == "mlp":
            y = self.nn.mlp(self.mx, *self.w, pool=pool)
            np.testing.assert_allclose(y, self.mlp_ref, rtol=1e-10, atol=1e-10)
            y.release()
        else:  # pragma: no cover
            raise AssertionError(kind)
        return "ok"


def _task(i: int) -> int:
    time.sleep(0.0002 * (i % 7))
    return i * i + 1


KINDS = ["map", "map_out", "reduce", "submit", "mlp"]


def run_chaos(rounds: int, seed: int) -> dict:
    """``rounds`` calls on one pool, each with one worker SIGKILLed at a random moment."""
    rng = random.Random(seed)
    work = ChaosWorkload(seed)
    stats = {"rounds": 0, "kills": 0, "kills_mid_call": 0, "recovered_pieces": 0,
             "allowed_errors": 0, "replaced": 0, "victims": []}
    with parrun.Pool(2, retries=1) as pool:
        try:
            _chaos_rounds(pool, work, rounds, rng, stats)
        finally:
            work.release()
    return stats


def _chaos_rounds(pool, work, rounds, rng, stats) -> None:
    """Run the rounds; ``stats`` counts what happened."""
    durations = {}
    for kind in KINDS:  # warm up and time each kind
        t0 = time.monotonic()
        work.run(kind, pool, rng)
        durations[kind] = time.monotonic() - t0
    for _ in range(rounds):
        kind = rng.choice(KINDS)
        killer = Killer(pool, rng.uniform(0, 1.2 * durations[kind]),
                        random.Random(rng.random()))
        t0 = time.monotonic()
        outcome = work.run(kind, pool, rng)
        t1 = time.monotonic()
        killer.join()
        stats["rounds"] += 1
        stats["allowed_errors"] += outcome == "crashed"
        if kind != "submit" and pool.last_stats is not None:
            stats["recovered_pieces"] += pool.last_stats.recovered
        if killer.victim is not None:
            stats["kills"] += 1
            stats["victims"].append(killer.victim)
            stats["kills_mid_call"] += t0 <= killer.sent_at <= t1
            assert wait_until(lambda v=killer.victim: not _alive(v), timeout=5)
    # A kill after the last call is seen by the next one: it must be right too.
    assert work.run("map", pool, rng) == "ok"
    stats["replaced"] = pool._generation
    assert len(pool.pids) == 2 and all(_alive(p) for p in pool.pids)
    assert not set(stats["victims"]) & set(pool.pids)  # every victim was replaced
    stats["victims"] = len(set(stats["victims"]))


def test_chaos_random_kills_ci():
    stats = run_chaos(rounds=60, seed=1234)
    print(f"\nchaos (CI): {stats}")
    assert stats["rounds"] == 60
    assert stats["kills"] >= 50 and stats["kills_mid_call"] >= 25, stats


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_random_kills_long():
    totals: dict = {}
    for seed in range(5):
        stats = run_chaos(rounds=200, seed=seed)
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v
    print(f"\nchaos (long): {totals}")
    assert totals["kills"] >= 900 and totals["kills_mid_call"] >= 450, totals


# -- parent death ----------------------------------------------------------------------------
VICTIM = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    import parrun
    phase = sys.argv[1]
    if phase == "startup":  # killed while the pool starts (fork server, workers)
        print("ready", flush=True)
        pool = parrun.Pool(2)
        time.sleep(60)
    pool = parrun.Pool(2)
    print("ready", flush=True)
    x = parrun.asshared(np.random.default_rng(0).standard_normal(400_000))
    rng = np.random.default_rng(1)
    while True:
        if phase == "segments":  # creating (and reserving) segments all the time
            keep = [parrun.empty(int(rng.integers(1, 32 << 20)), np.uint8) for _ in range(4)]
            keep[0].release()
        elif phase == "map":
            pool.map(lambda t: np.tanh(t) ** 2, x, grain=1000).release()
            pool.map(lambda t: np.sin(t), np.ones((50_000, 8)))  # temporary copies
        elif phase == "tasks":
            fs = [pool.submit(np.multiply, np.ones(1 << 18), 2) for _ in range(20)]
            [f.result() for f in fs]
""")

HARNESS = textwrap.dedent("""
    # Runs each victim as a child of a subreaper (this process), so that its fork server,
    # resource tracker and workers are reparented here when it dies and can be watched.
    import ctypes, json, os, signal, subprocess, sys, time
    import psutil
    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1)
    victim_src = sys.argv[1]
    me = psutil.Process()

    def descendants():
        while True:  # reap what was reparented to us and died
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        out = []
        for p in me.children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append((p.pid, "tracker" if "resource_tracker" in " ".join(
                        p.cmdline()) else "worker"))
            except psutil.NoSuchProcess:
                pass
        return out

    for arg in sys.argv[2:]:
        phase, delay = arg.split(":")
        p = subprocess.Popen([sys.executable, "-c", victim_src, phase], stdout=subprocess.PIPE)
        assert p.stdout.readline().strip() == b"ready"
        time.sleep(float(delay))
        seen = len([d for d in descendants() if d[1] == "worker"])
        os.kill(p.pid, signal.SIGKILL)
        t0 = time.monotonic()
        p.wait()
        p.stdout.close()
        workers_gone = everything_gone = None
        while time.monotonic() - t0 < 10:
            left = descendants()
            if workers_gone is None and not [d for d in left if d[1] == "worker"]:
                workers_gone = time.monotonic() - t0
            if not left:
                everything_gone = time.monotonic() - t0
                break
            time.sleep(0.01)
        print(json.dumps({"phase": phase, "delay": float(delay), "pid": p.pid,
                          "helpers_and_workers_seen": seen, "workers_gone_s": workers_gone,
                          "all_gone_s": everything_gone, "left": descendants()}), flush=True)
""")


def kill_parents(points: list[tuple[str, float]]) -> list[dict]:
    r = subprocess.run([sys.executable, "-c", HARNESS, VICTIM,
                        *[f"{phase}:{delay:.3f}" for phase, delay in points]],
                       capture_output=True, text=True, timeout=30 + 15 * len(points))
    assert r.returncode == 0, r.stderr
    reports = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(reports) == len(points)
    for rep in reports:
        assert rep["workers_gone_s"] is not None and rep["workers_gone_s"] < 2.0, rep
        assert rep["all_gone_s"] is not None, rep
        assert wait_until(lambda pid=rep["pid"]: not shm_segments(pid), timeout=10), \
            f"segments left after SIGKILL of the parent: {shm_segments(rep['pid'])} ({rep})"
    return reports


PHASES = ["startup", "segments", "map", "tasks"]


def test_parent_killed_at_random_points_ci():
    rng = random.Random(7)
    points = [(phase, rng.uniform(0.0, 0.6)) for phase in PHASES]
    reports = kill_parents(points)
    print("\nparent death (CI):", [(r["phase"], round(r["delay"], 3),
                                    round(r["workers_gone_s"], 3)) for r in reports])
    # Each point after start-up had a live pool (fork server + 2 workers) to kill.
    assert all(r["helpers_and_workers_seen"] >= 3 for r in reports if r["phase"] != "startup")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_parent_killed_at_random_points_long():
    rng = random.Random(8)
    points = [(phase, rng.uniform(0.0, 1.5)) for phase in PHASES for _ in range(8)]
    rng.shuffle(points)
    reports = kill_parents(points)
    worst = max(r["workers_gone_s"] for r in reports)
    print(f"\nparent death (long): {len(reports)} kills, workers gone within {worst:.3f} s")


# -- Ctrl-C ----------------------------------------------------------------------------------
def test_cancelled_tasks_do_not_block_the_ones_behind_them():
    """Regression: cancelled tasks used to take room in the dispatch window; with a queue of
    them and nothing in flight, no worker reported, and later tasks waited forever."""
    with parrun.Pool(1) as pool:  # a new pool: slow tasks, a window of two in flight
        fs = [pool.submit(time.sleep, 0.05) for _ in range(100)]
        assert wait_until(lambda: fs[0].done(), timeout=TIMEOUT)
        assert sum(f.cancel() for f in fs) >= 90
        assert pool.submit(pow, 2, 9).result(timeout=TIMEOUT) == 512
        assert not cf.wait(fs, timeout=TIMEOUT).not_done


INTERRUPT_MAP = textwrap.dedent("""
    import sys, time
    import numpy as np
    import parrun
    counter = parrun.zeros(1, np.int64)

    def slow(t):
        counter[0] += 1
        time.sleep(0.05)
        return t + 1

    with parrun.Pool(2) as pool:
        x = np.arange(2000.0)
        print("pids", *pool.pids, flush=True)
        try:
            pool.map(slow, x, grain=1)   # 2000 pieces of 50 ms: 50 s
        except KeyboardInterrupt:
            t = time.monotonic()
            print("interrupted", t, flush=True)
        pieces = counter[0]
        time.sleep(0.5)
        stopped = counter[0] == pieces   # no worker runs the job any more
        y = pool.map(np.negative, x)
        ok = bool((y == -x).all())
        print("after", stopped, ok, counter[0], flush=True)
""")

INTERRUPT_FUTURES = textwrap.dedent("""
    import concurrent.futures as cf, sys, time
    import parrun
    pool = parrun.Pool(2)
    print("pids", *pool.pids, flush=True)
    try:
        with pool:
            fs = [pool.submit(time.sleep, 0.5) for _ in range(200)]
            cf.wait(fs)
    except KeyboardInterrupt:
        print("interrupted", time.monotonic(), flush=True)
    print("after", pool.closed, sum(f.cancelled() for f in fs),
          sum(f.done() for f in fs), flush=True)
""")


def _interrupt(script: str, after: float) -> tuple[list[int], float, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", AS_AT_A_TERMINAL + script],
                            stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()[1:]]
        time.sleep(after)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = out.splitlines()
    assert lines and lines[0].startswith("interrupted"), out
    latency = float(lines[0].split()[1]) - sent
    return pids, latency, lines[1].split()


def test_ctrl_c_during_a_long_map_stops_it_and_the_pool_is_usable():
    pids, latency, after = _interrupt(INTERRUPT_MAP, 1.0)
    assert latency < 1.0, latency
    assert after[:3] == ["after", "True", "True"], after  # job stopped; next map right
    assert int(after[3]) < 2000  # it did not run to the end
    assert wait_until(lambda: not any(_alive(p) for p in pids), timeout=5)


def test_ctrl_c_while_waiting_on_futures_closes_the_pool_promptly():
    pids, latency, after = _interrupt(INTERRUPT_FUTURES, 1.0)
    # Leaving ``with pool`` on KeyboardInterrupt terminates: it does not wait for the tasks.
    assert latency < 1.0, latency
    assert after[:2] == ["after", "True"], after
    assert int(after[2]) >= 150 and int(after[3]) == 200, after  # queued ones cancelled
    assert wait_until(lambda: not any(_alive(p) for p in pids), timeout=2)


INTERRUPT_WAIT = textwrap.dedent("""
    import concurrent.futures as cf, sys, time
    import parrun
    pool = parrun.Pool(2)
    print("pids", *pool.pids, flush=True)
    fs = [pool.submit(time.sleep, 0.5) for _ in range(200)]
    try:
        fs[-1].result()
    except KeyboardInterrupt:
        print("interrupted", time.monotonic(), flush=True)
    cancelled = sum(f.cancel() for f in fs)
    print("after", pool.submit(pow, 2, 9).result(timeout=30), cancelled, flush=True)
    pool.close()
""")


def test_ctrl_c_while_waiting_on_a_future_leaves_the_pool_usable():
    pids, latency, after = _interrupt(INTERRUPT_WAIT, 1.0)
    assert latency < 1.0, latency
    assert after[:2] == ["after", "512"] and int(after[2]) >= 150, after
    assert wait_until(lambda: not any(_alive(p) for p in pids), timeout=5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL])
def test_a_signal_to_the_whole_process_group_leaves_no_segment(sig):
    """A terminal hanging up (SIGHUP to the job's process group) or ``kill -9 -PGID`` also
    hit multiprocessing's resource tracker, in the same group: every segment stayed in
    /dev/shm until reboot. parrun starts the tracker in a session of its own."""
    src = ("import numpy as np, parrun, time; x = parrun.asshared(np.ones(10**6)); "
           "parrun.map(np.sqrt, x); print('ready', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", src], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == b"ready"
        assert shm_segments(p.pid)
        os.killpg(p.pid, sig)
        p.wait(TIMEOUT)
        assert wait_until(lambda: not shm_segments(p.pid), timeout=10), shm_segments(p.pid)
    finally:
        take_down_if_hung(p)
        p.stdout.close()
        for name in shm_segments(p.pid):  # (a failure's: not left to the next test)
            os.unlink(f"/dev/shm/{name}")


CTRL_C_AT_THE_FIRST_START = textwrap.dedent("""
    import os, signal, sys, threading, numpy as np, parrun
    from multiprocessing import forkserver
    if sys.argv[1] == "terminal":  # Ctrl-C at a terminal: SIGINT to the whole group, as
        # the fork server is still importing numpy (it dies of it)
        threading.Timer(0.1, os.killpg, (os.getpgid(0), signal.SIGINT)).start()
        try:
            parrun.map(np.sqrt, np.arange(10.0))
        except KeyboardInterrupt:
            pass
    else:  # the same, made certain: the server dies as the first start talks to it
        real = forkserver.connect_to_new_process

        def dropped(fds):
            forkserver.connect_to_new_process = real
            forkserver.ensure_running()
            os.kill(forkserver._forkserver._forkserver_pid, signal.SIGKILL)
            raise EOFError("unexpected EOF")
        forkserver.connect_to_new_process = dropped
    print("retry", parrun.map(np.sqrt, np.arange(4.0)).tolist(), flush=True)
""")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["terminal", "dropped"])
def test_a_start_after_the_fork_server_died_starts_a_new_one(how):
    """The retry right after a terminal's Ctrl-C met the dying server: ``EOFError:
    unexpected EOF``, or ``ConnectionRefusedError``."""
    p = subprocess.Popen([sys.executable, "-c", AS_AT_A_TERMINAL + CTRL_C_AT_THE_FIRST_START,
                          how], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    finally:
        take_down_if_hung(p)
    assert "retry [0.0, 1.0, 1.4142135623730951, 1.7320508075688772]" in out, err[-2000:]
    assert p.returncode == 0, err[-2000:]


INTERRUPT_SLOW_REPLACEMENT = textwrap.dedent("""
    import os, signal, tempfile, threading, time
    import numpy as np, parrun
    flag = tempfile.mktemp()

    def init(flag):  # slow in replacement workers only
        if os.path.exists(flag):
            time.sleep(20)

    def slow(t):
        time.sleep(0.02)
        return t + 1
    pool = parrun.Pool(2, initializer=init, initargs=(flag,))
    open(flag, "w").close()
    print("pids", *pool.pids, flush=True)
    threading.Timer(0.2, os.kill, (pool.pids[0], signal.SIGKILL)).start()
    x = np.arange(1000.0)
    try:
        pool.map(slow, x, grain=1)
    except KeyboardInterrupt:
        print("interrupted", time.monotonic(), flush=True)
    os.remove(flag)
    y = pool.map(slow, x[:20])
    print("after", bool((y == x[:20] + 1).all()), len(set(pool.pids)), flush=True)
    pool.close()
""")


@pytest.mark.timeout(60)
def test_ctrl_c_is_not_held_back_by_a_replacement_that_starts_slowly():
    """A worker died mid-map and its replacement's initializer took 20 s: Ctrl-C waited
    for it (up to 3 x 60 s for one that hangs). The replacement waits for the next call."""
    _pids, latency, after = _interrupt(INTERRUPT_SLOW_REPLACEMENT, 1.0)
    assert latency < 1.0, latency
    assert after == ["after", "True", "2"], after


HUNG_INITIALIZER = textwrap.dedent("""
    import os, signal, sys, tempfile, time
    import numpy as np, parrun, psutil
    import parrun._pool
    parrun._pool.START_TIMEOUT = 1.0  # (60 s by default)
    flag = tempfile.mktemp()

    def init(flag):  # hangs, in replacement workers only
        if os.path.exists(flag):
            time.sleep(1000)
    pool = parrun.Pool(2, initializer=init, initargs=(flag,))
    open(flag, "w").close()
    os.kill(pool.pids[0], signal.SIGKILL)
    time.sleep(0.2)
    try:
        pool.map(np.negative, np.arange(100.0))
    except parrun.WorkerCrashed as e:
        print("error:", e, flush=True)
    pool.close()
    os.remove(flag)
    time.sleep(0.5)
    me = psutil.Process()
    print("left:", [c.pid for c in me.children(recursive=True) if c.ppid() != me.pid
                    and c.status() != psutil.STATUS_ZOMBIE], flush=True)
""")


@pytest.mark.timeout(60)
def test_a_replacement_whose_initializer_hangs_fails_clearly_and_is_killed():
    """It said "4 workers died running the first piece of map ... fn probably ends its
    process" (no worker ran fn) after 4 x 3 tries, and close() left the hung workers."""
    r = subprocess.run([sys.executable, "-c", HUNG_INITIALIZER], capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert "not ready after 1 s (a hung initializer?); killed" in r.stdout, r.stdout + r.stderr
    assert "fn probably" not in r.stdout
    assert "left: []" in r.stdout, r.stdout


@pytest.mark.timeout(60)
def test_a_start_failing_for_another_reason_leaves_the_working_fork_server_be():
    """A start's EOFError or broken pipe with the server alive (a worker killed as it read
    its start data, say) killed the server, and with it the other pools' workers."""
    from multiprocessing import forkserver

    real = forkserver.connect_to_new_process

    def dropped(fds):
        forkserver.connect_to_new_process = real
        raise EOFError("unexpected EOF")
    with parrun.Pool(1) as a:
        pids, server = a.pids, forkserver._forkserver._forkserver_pid
        forkserver.connect_to_new_process = dropped
        try:
            with pytest.raises(EOFError):
                parrun.Pool(1)
        finally:
            forkserver.connect_to_new_process = real
        assert forkserver._forkserver._forkserver_pid == server
        assert a.map(np.sqrt, np.arange(4.0)).tolist() == [0.0, 1.0, 2.0 ** 0.5, 3.0 ** 0.5]
        assert a.pids == pids
