"""Shared fixtures: pools that tests reuse, and checks that nothing leaks.

Every test is checked for leaked ``/dev/shm`` segments of this process; every module for
leftover worker processes once its pools are closed.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import signal
import time

import psutil
import pytest

import parrun

TIMEOUT = 30.0  # seconds any wait in a test may take before it counts as a hang

# Ctrl-C as at a terminal: a process started in the background by a non-interactive shell
# (`cmd &`, as some CI runners do) inherits SIGINT ignored, and Python then installs no
# KeyboardInterrupt handler.
AS_AT_A_TERMINAL = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"


def shm_segments(pid: int | None = None) -> set[str]:
    """parrun segment names in /dev/shm (of one creating pid, if given)."""
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:  # pragma: no cover - not Linux
        return set()
    prefix = "parrun_" if pid is None else f"parrun_{pid}_"
    return {n for n in names if n.startswith(prefix)}


def cmdline(p: psutil.Process) -> list[str]:
    """``p``'s command line, or [] if it is gone or a zombie by now (short-lived children)."""
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _is_helper(p: psutil.Process) -> bool:
    """multiprocessing's own long-lived helpers: the fork server and the resource tracker."""
    try:
        cmd = " ".join(p.cmdline())
    except psutil.NoSuchProcess:
        return True
    return "forkserver" in cmd or "resource_tracker" in cmd


def worker_processes() -> list[psutil.Process]:
    """Processes descending from this one other than multiprocessing's helpers (workers
    forked by the fork server are its children, not helpers)."""
    me = psutil.Process()
    helpers = {p.pid for p in me.children() if _is_helper(p)}
    out = []
    for p in me.children(recursive=True):
        if p.pid not in helpers and p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


def alive(pid: int) -> bool:
    """A process runs as ``pid`` (not a zombie). One that ends between two questions counts
    as gone (``pid_exists`` then ``Process(pid)`` raised NoSuchProcess once)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate, timeout: float = TIMEOUT, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def take_down_if_hung(p) -> None:
    """A subprocess (in a session of its own) still running: kill it and its whole process
    group, reap it and unlink its segments, so that the next test starts clean."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        for name in shm_segments(p.pid):
            os.unlink(f"/dev/shm/{name}")


class Counted:
    """A callable that counts its own unpicklings in a shared counter (``c[0]``): how many
    times it was shipped to a worker. Calling it adds ``add`` to its argument."""

    def __init__(self, c, add=0):
        self.c = c
        self.add = add

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.c[0] += 1

    def __call__(self, x):
        return x + self.add


@pytest.fixture(scope="module")
def pool():
    with parrun.Pool(2) as p:
        yield p


@pytest.fixture(scope="module")
def pool1():
    with parrun.Pool(1) as p:
        yield p


@pytest.fixture(autouse=True)
def long_runs_are_not_hangs(request):
    """A ``slow`` test runs for minutes on purpose; ``faulthandler_timeout`` (100 s) would dump
    every thread's stack in the middle of it, which reads like a hang (it was once taken for
    one). Its own ``pytest.mark.timeout`` still ends, and dumps, a slow test that hangs."""
    if request.node.get_closest_marker("slow"):
        faulthandler.cancel_dump_traceback_later()
    yield


@pytest.fixture(autouse=True)
def no_leaked_segments(request):
    """Fail a test that leaves a segment of this process behind (pools' own excepted)."""
    before = shm_segments(os.getpid())
    yield
    gc.collect()

    def leaked() -> set[str]:
        # The pools first: one closing in the background (Executor.shutdown(wait=False))
        # may leave the live set after its segments were listed, never before.
        live_pools = set().union(*[p._own_segments() for p in list(parrun._pool._live_pools)])
        return shm_segments(os.getpid()) - before - live_pools

    wait_until(lambda: not leaked(), timeout=5)
    left = leaked()
    assert not left, f"{request.node.name} leaked shared-memory segments: {sorted(left)}"


@pytest.fixture(autouse=True, scope="module")
def no_leaked_workers():
    """Fail a module that leaves worker processes running once its pools are closed, or
    segments kept by them."""
    yield
    default = parrun._api._default
    if default is not None:
        default.close()
    gc.collect()
    left = [] if wait_until(lambda: not worker_processes(), timeout=10) else worker_processes()
    assert not left, f"worker processes left: {[(p.pid, p.cmdline()[:4]) for p in left]}"
    # What pools keep for their next maps is excepted test by test; it must go with them.
    kept = set().union(*[r.names for r in list(parrun._shm._recyclers)])
    assert not kept, f"segments still kept by closed pools: {sorted(kept)}"
