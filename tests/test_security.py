"""What a local attacker or a full /dev/shm can do to a pool: segment permissions and names,
listening sockets, descriptors leaking into programs that tasks start, and clear errors
(with nothing half-created left) when /dev/shm has no room."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import TIMEOUT, shm_segments, wait_until

import parrun

# 96 random bits, after a worker's 32-bit tag (the pool's, to find a dead worker's segments)
NAME = re.compile(r"^parrun_(\d+)_(?:[0-9a-f]{8})?([0-9a-f]{24})$")


def _segments_of(pids) -> list[str]:
    return sorted(n for pid in pids for n in shm_segments(pid))


def test_every_segment_the_runtime_makes_is_private_and_unguessable(pool):
    """Control block, task arena, temporary copies, map outputs, task payloads that overflow
    a slot and results a worker hands over: all mode 0600, ours, 96 random bits."""
    big = np.ones(1 << 18)  # 2 MiB, plain: a temporary segment per task
    hold = parrun.zeros(1, np.int64)
    seen: set[str] = set()
    pool_pids = [os.getpid(), *pool.pids]
    y = pool.map(np.negative, np.ones((1000, 3)))  # temporary input copy, allocated out
    f = pool.submit(lambda a, pad: (np.asarray(a) * 2, _segments_of(pool_pids)), big,
                    b"x" * 5000)  # argument temp, overflow payload, result segment
    r, inside = f.result(timeout=TIMEOUT)
    seen.update(inside)
    seen.update(_segments_of(pool_pids))
    assert len(seen) >= 5, seen
    for name in seen:
        m = NAME.match(name)
        assert m, name
        try:
            st = os.stat(f"/dev/shm/{name}")
        except FileNotFoundError:  # a temporary, released since
            continue
        assert stat.S_IMODE(st.st_mode) == 0o600, (name, oct(st.st_mode))
        assert st.st_uid == os.getuid()
    for a in (y, r, hold):
        a.release()


POOL_PROCESSES = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import psutil
    import parrun

    def unix_listeners():
        out = set()
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if int(parts[3], 16) & 0x10000:  # __SO_ACCEPTCON: a listening socket
                    out.add(int(parts[6]))
        return out

    def sockets(pid):
        inodes = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.append(int(target[8:-1]))
        return inodes

    with parrun.Pool(2) as pool:
        pool.map(np.sqrt, np.ones((10_000, 4)))
        assert pool.submit(pow, 2, 5).result() == 32
        listening = unix_listeners()
        report = {"processes": {}}
        for role, pid in [("parent", os.getpid())] + [("worker", p) for p in pool.pids]:
            p = psutil.Process(pid)
            report["processes"][pid] = {
                "role": role,
                "inet": [list(c[:6]) for c in p.net_connections(kind="inet")],
                "unix_listening": [i for i in sockets(pid) if i in listening],
                "sockets": len(sockets(pid)),
            }
        # The pool's own descriptors in the parent: none may leak into a child program.
        fds = [pool._cb.fd]
        for w in pool._workers:
            fds += [w.cmd.fileno(), w.status.fileno(), w.process.sentinel]
        report["parent_inheritable"] = [fd for fd in fds if os.get_inheritable(fd)]
        # multiprocessing's fork server listens on a Unix socket: where, and who may connect.
        for child in psutil.Process().children():
            if "forkserver" in " ".join(child.cmdline()):
                for c in child.net_connections(kind="unix"):
                    path = c.laddr
                    report["forkserver_socket"] = {
                        "path": path,
                        "mode": oct(os.stat(path).st_mode & 0o777) if path else None,
                        "dir_mode": oct(os.stat(os.path.dirname(path)).st_mode & 0o777)
                        if path else None,
                        "uid_ok": os.stat(path).st_uid == os.getuid() if path else None}
    print(json.dumps(report))
""")


def test_no_listening_socket_and_no_inheritable_pool_descriptor():
    r = subprocess.run([sys.executable, "-c", POOL_PROCESSES], capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert len(report["processes"]) == 3
    for pid, p in report["processes"].items():
        assert p["inet"] == [], (pid, p)  # no TCP/UDP socket at all, listening or not
        assert p["unix_listening"] == [], (pid, p)
        if p["role"] == "worker":
            assert p["sockets"] == 0, (pid, p)  # workers talk over anonymous pipes only
    assert report["parent_inheritable"] == []
    # The one listener of the runtime is multiprocessing's fork server: a filesystem socket
    # (not the abstract namespace, which any local user could reach) that only we may open.
    fs = report["forkserver_socket"]
    assert fs["path"].startswith("/") and fs["mode"] == "0o600" and fs["uid_ok"], fs
    assert fs["dir_mode"] == "0o700", fs


def _child_fds(how: str) -> list[int]:
    """Inside a task: start a program that lists the descriptors it got."""
    lister = "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))"
    if how == "subprocess":  # the most permissive call: keep every inheritable descriptor
        out = subprocess.run([sys.executable, "-c", lister], close_fds=False,
                             stdout=subprocess.PIPE, text=True, check=True).stdout
    else:  # os.system: fork + exec of a shell, no closing of descriptors at all
        import tempfile

        with tempfile.NamedTemporaryFile("r", suffix=".txt") as f:
            os.system(f"{sys.executable} -c \"{lister}\" > {f.name}")
            out = f.read()
    return json.loads(out)


@pytest.mark.parametrize("how", ["subprocess", "os.system"])
def test_programs_started_by_tasks_get_no_pool_descriptor(pool, how):
    """Regression: a worker's command and status pipes and its resource-tracker pipe arrived
    inheritable (through the fork server), so any program a task started held them."""
    got = pool.submit(_child_fds, how).result(timeout=TIMEOUT)
    # 0-2, plus the descriptor the lister's listdir opens (3); os.system's redirect adds
    # nothing new (it replaces 1).
    assert got == [0, 1, 2, 3], got
    got = pool.map(lambda x: np.full(len(x), len(_child_fds(how))), np.zeros(2), grain=1)
    assert got.tolist() == [4, 4]
    got.release()


# -- /dev/shm full -----------------------------------------------------------------------------
def _shm_total() -> int:
    st = os.statvfs("/dev/shm")
    return st.f_blocks * st.f_frsize


def test_an_array_larger_than_dev_shm_fails_clearly_and_leaves_nothing():
    # Larger than all of /dev/shm: tmpfs refuses at once, without filling anything.
    n = _shm_total() + (1 << 30)
    before = shm_segments(os.getpid())
    with pytest.raises(parrun.SharedMemoryError) as info:
        parrun.empty(n, np.uint8)
    msg = str(info.value)
    assert "/dev/shm" in msg and "GiB" in msg and "free of" in msg, msg
    assert "No space left" in msg and "leaked segments" in msg, msg
    assert isinstance(info.value, OSError)
    # (what pools kept for their next maps was freed first, to make room)
    assert shm_segments(os.getpid()) <= before


@pytest.fixture
def full_shm(monkeypatch):
    """/dev/shm 'full' for this process (workers are unaffected) from the n-th segment on:
    ``full_shm(n)``."""
    calls = [0]
    limit = [10**9]
    real = os.posix_fallocate

    def fallocate(fd, offset, length):
        calls[0] += 1
        if calls[0] > limit[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)

    def set_limit(n):
        calls[0], limit[0] = 0, n
    return set_limit


@pytest.mark.parametrize("fails", ["input copy", "output", "output temporary"])
def test_map_when_a_segment_cannot_be_created(full_shm, fails):
    shared = parrun.asshared(np.arange(3000.0))
    plain = np.arange(3000.0)
    try:
        # A new pool: one that kept segments from earlier maps would need no new one
        with parrun.Pool(1) as pool:
            full_shm(0)
            with pytest.raises(parrun.SharedMemoryError, match="/dev/shm"):
                if fails == "input copy":
                    pool.map(np.negative, plain)
                elif fails == "output":
                    pool.map(np.negative, shared)
                else:
                    pool.map(np.negative, shared, out=np.empty(3000))
            full_shm(10**9)
            y = pool.map(np.negative, plain)
            np.testing.assert_array_equal(y, -plain)
            y.release()
    finally:
        shared.release()


def test_submit_when_a_segment_cannot_be_created(pool, full_shm):
    """A big argument, or a payload too big for a slot, fails its own future with
    SharedMemoryError (the payload once ended the collector thread: later tasks hung)."""
    full_shm(0)
    f = pool.submit(np.sum, np.ones(1 << 18))  # 2 MiB argument: a temporary segment
    with pytest.raises(parrun.SharedMemoryError, match="/dev/shm"):
        f.result(timeout=TIMEOUT)
    f = pool.submit(len, b"x" * 5000)  # pickled, but bigger than an arena slot
    with pytest.raises(parrun.SharedMemoryError, match="/dev/shm"):
        f.result(timeout=TIMEOUT)
    full_shm(10**9)
    assert pool.submit(len, b"x" * 5000).result(timeout=TIMEOUT) == 5000
    assert pool.submit(np.sum, np.ones(1 << 18)).result(timeout=TIMEOUT) == 1 << 18


KILLED_WHILE_CREATING = textwrap.dedent("""
    import json, os, signal
    import parrun
    parrun.empty(1)  # the resource tracker runs
    def fallocate(fd, offset, length):  # SIGKILL after shm_open, before anything else
        print(json.dumps([os.getpid(), os.listdir("/dev/shm")]), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    os.posix_fallocate = fallocate
    parrun.empty(1000)
""")


def test_killed_between_creating_and_reserving_a_segment_leaves_nothing():
    """Regression: the segment was registered with the resource tracker after shm_open, so a
    SIGKILL in between leaked it until reboot."""
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_CREATING], capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    pid, names = json.loads(proc.stdout)
    assert [n for n in names if n.startswith(f"parrun_{pid}_")]  # it existed at the kill
    assert wait_until(lambda: not shm_segments(pid), timeout=10), shm_segments(pid)
