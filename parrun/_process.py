"""How worker processes are started: the multiprocessing context and its one adjustment.

parrun starts workers with ``forkserver`` where it exists: a small server process, started
once, imports numpy and parrun and forks each worker from itself. That is safe when the
parent has threads (plain ``fork`` is not) and quick after the first start (measured: about
0.2 s for the first pool on a 2-core machine, mostly the server importing numpy; a few ms per
worker after that). ``spawn`` is the fallback.

The adjustment: ``multiprocessing`` makes every forkserver or spawn child re-import the
parent's ``__main__`` script before running its target. parrun ships task functions with
cloudpickle, so workers never need ``__main__``; importing it would re-run an unguarded script
(and fail without ``if __name__ == "__main__"``) and slow every start. ``_Popen`` below drops
that step for forkserver workers.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import threading
import time
from typing import Any

# Keys of multiprocessing's preparation data that make a child import the parent's __main__.
_MAIN_KEYS = ("init_main_from_path", "init_main_from_name")


def default_start_method() -> str:
    """'forkserver' where available, else 'spawn'."""
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def process_class(start_method: str) -> Any:
    """The Process class to start workers with under ``start_method``."""
    ctx = mp.get_context(start_method)
    if start_method != "forkserver" or _ForkserverWorkerProcess is None:
        return ctx.Process  # type: ignore[attr-defined]
    # Workers fork from a server that has imported numpy and parrun already; leaving out
    # '__main__' keeps the user's script from being imported by the server too.
    ctx.set_forkserver_preload(["parrun._worker"])
    return _ForkserverWorkerProcess


try:
    from multiprocessing import popen_forkserver
except ImportError:  # pragma: no cover - no fd passing on this platform
    _ForkserverWorkerProcess = None
else:

    class _Popen(popen_forkserver.Popen):
        def _launch(self, process_obj):  # CPython 3.10-3.13 popen_forkserver, minus __main__
            from multiprocessing import forkserver, reduction, spawn, util
            from multiprocessing.context import set_spawning_popen

            prep_data = spawn.get_preparation_data(process_obj._name)
            for key in _MAIN_KEYS:
                prep_data.pop(key, None)
            buf = io.BytesIO()
            set_spawning_popen(self)
            try:
                reduction.dump(prep_data, buf)
                reduction.dump(process_obj, buf)
            finally:
                set_spawning_popen(None)
            self.sentinel, w = forkserver.connect_to_new_process(self._fds)
            _parent_w = os.dup(w)
            self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
            with open(w, "wb", closefd=True) as f:
                f.write(buf.getbuffer())
            self.pid = forkserver.read_signed(self.sentinel)

    class _ForkserverWorkerProcess(mp.get_context("forkserver").Process):  # type: ignore[no-redef, misc]
        @staticmethod
        def _Popen(process_obj):
            return _Popen(process_obj)


def detach_from_forkserver() -> None:
    """In a worker: close its copy of the fork server's 'parent alive' pipe.

    Every forkserver child inherits the write end of that pipe (so that it could start
    processes of its own), and the server exits only when all copies are closed. A worker that
    keeps it would keep the server alive after the parent dies, and with it the worker itself
    (it asks to be killed when the server exits).
    """
    try:
        from multiprocessing import forkserver

        fs = forkserver._forkserver
        fd = getattr(fs, "_forkserver_alive_fd", None)
        if fd is not None:
            os.close(fd)
            fs._forkserver_alive_fd = None  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - internals differ: the ppid check still applies
        pass


def forget_forkserver() -> None:
    """After ``os.fork()``, in the child: forget the parent's fork server.

    The child inherits the parent's record of it, but the server is not the child's to wait
    for: ``multiprocessing`` calls ``os.waitpid`` on it before every start and raised
    ``ChildProcessError`` in the child, so no pool could start there. The child starts a
    server of its own when it needs one; its copy of the parent's 'alive' pipe is closed,
    so that the parent's server still ends with the parent.
    """
    try:
        from multiprocessing import forkserver

        fs = forkserver._forkserver
        if fs._forkserver_pid is None:  # type: ignore[attr-defined]
            return
        _forget(fs)
        fs._lock = threading.Lock()  # type: ignore[attr-defined]  # held by another thread?
    except Exception:  # pragma: no cover - internals differ: a pool there fails as before
        pass


def _forget(fs: Any) -> None:
    """Clear multiprocessing's record of fork server ``fs`` and close our end of its 'alive'
    pipe: the next start launches a new server."""
    fd = fs._forkserver_alive_fd
    fs._forkserver_pid = fs._forkserver_address = fs._forkserver_alive_fd = None
    if fd is not None:
        os.close(fd)


def forkserver_pid() -> int | None:
    """The pid of this process's fork server, if it has one running (or not yet waited for)."""
    try:
        from multiprocessing import forkserver

        return forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - internals differ
        return None


# Seconds a start that failed talking to the fork server waits for it to exit.
FORKSERVER_EXIT_S = 2.0


def drop_dead_forkserver(pid: int | None) -> bool:
    """A start failed talking to the fork server ``pid`` (its pid as the start began): True
    if a start may be tried again, because that server has been replaced meanwhile (another
    thread's start did it), or it has exited (within ``FORKSERVER_EXIT_S``) and is now
    forgotten, so that the next start launches a new one. A terminal's Ctrl-C reaches the
    server too while it still imports numpy (before it ignores SIGINT), and multiprocessing
    notices a dead server only once it has exited: the start right after the Ctrl-C met the
    dying one (``EOFError: unexpected EOF``). False if it still runs: the failure was
    something else, and a working server (other pools' workers fork from it) is left be."""
    if pid is None:
        return False
    try:
        from multiprocessing import forkserver

        fs = forkserver._forkserver
        deadline = time.monotonic() + FORKSERVER_EXIT_S
        while True:
            with fs._lock:  # type: ignore[attr-defined]
                if fs._forkserver_pid != pid:  # type: ignore[attr-defined]
                    return True
                try:
                    gone = os.waitpid(pid, os.WNOHANG)[0] != 0
                except ChildProcessError:
                    gone = True
                if gone:
                    _forget(fs)
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
    except Exception:  # pragma: no cover - internals differ: the start fails as before
        return False
