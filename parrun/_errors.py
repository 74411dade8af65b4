"""The exception tree of parrun and the wrapper that carries a worker's traceback.

Every error parrun raises on purpose is a ``ParrunError``; each class also derives from the
standard exception a caller would already catch (``ValueError``, ``BrokenExecutor``...), so code
written for ``concurrent.futures`` or ``multiprocessing`` keeps working.
"""

from __future__ import annotations

import signal
import traceback
from concurrent.futures.process import BrokenProcessPool


class ParrunError(Exception):
    """Base class of every error parrun raises on purpose."""


class PoolClosedError(ParrunError, RuntimeError, ValueError):
    """A closed pool was asked to run work. The caller's fault: make a new pool.

    Also a ``RuntimeError`` (as ``concurrent.futures`` raises after shutdown) and a
    ``ValueError`` (as ``multiprocessing.Pool`` raises when not running).
    """


class SharedMemoryError(ParrunError, OSError):
    """A shared-memory segment could not be created or attached.

    Usually the machine's fault: ``/dev/shm`` is full or too small. The message names the
    sizes involved.
    """


class BrokenPool(ParrunError, BrokenProcessPool):
    """The pool lost a worker in a way it could not recover from. Not the caller's fault."""


class WorkerCrashed(BrokenPool):
    """A worker process died (killed by a signal, segfault, ``os._exit``) while running work.

    The pool starts a replacement, so the next call works. ``pid`` and ``exitcode`` name the
    worker and how it ended (a negative exit code is the signal number, as in
    ``multiprocessing``).
    """

    def __init__(self, message: str, pid: int | None = None, exitcode: int | None = None):
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode


def describe_exit(exitcode: int | None) -> str:
    """Say how a process ended: ``'SIGKILL(-9)'``, ``'exit code 3'`` or ``'unknown'``."""
    if exitcode is None:
        return "unknown"
    if exitcode < 0:
        try:
            return f"{signal.Signals(-exitcode).name}({exitcode})"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker (set as ``__cause__``)."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class _ExceptionWithTraceback:
    """An exception plus its formatted traceback, picklable across processes.

    Unpickling yields the original exception with a ``RemoteTraceback`` as its cause, the way
    ``concurrent.futures.process`` does it.
    """

    def __init__(self, exc: BaseException):
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.exc = exc
        self.tb = f'\n"""\n{tb}"""'

    def __reduce__(self):
        return _rebuild_exc, (self.exc, self.tb)


def _rebuild_exc(exc: BaseException, tb: str) -> BaseException:
    exc.__cause__ = RemoteTraceback(tb)
    return exc


def exception_for_transport(exc: BaseException) -> object:
    """Wrap ``exc`` so that it pickles (with cloudpickle: its class may be one the user's
    script defined) with its traceback; fall back to a plain copy.

    An exception that cannot be pickled (it holds a lock, say) is replaced by a
    ``ParrunError`` that keeps its type name, message and traceback.
    """
    import pickle

    import cloudpickle

    wrapped = _ExceptionWithTraceback(exc)
    try:
        pickle.loads(cloudpickle.dumps(wrapped))
    except Exception:
        substitute = ParrunError(f"{type(exc).__qualname__}: {exc} (the original exception "
                                 "could not be pickled)")
        wrapped = _ExceptionWithTraceback(substitute)
        wrapped.tb = _ExceptionWithTraceback(exc).tb
    return wrapped
