"""Module-level functions that run on one lazily created default pool."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _protocol as P
from ._pool import Pool

_default: Pool | None = None
_default_lock = threading.Lock()


def default_pool() -> Pool:
    """The process-wide pool that ``parrun.map`` and friends use, created on first use
    (``PARRUN_NUM_WORKERS`` workers, else one per usable core) and closed at interpreter exit.
    A closed default pool is replaced by a new one."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = Pool()
        return _default


def map(fn: Callable[..., Any], *arrays: Any, out: np.ndarray | None = None,
        grain: int | None = None, pool: Pool | None = None) -> np.ndarray:
    """``pool.map(fn, *arrays, out=out, grain=grain)`` on ``pool`` or the default pool.

    See ``Pool.map``.
    """
    return (pool or default_pool()).map(fn, *arrays, out=out, grain=grain)


def map_reduce(fn: Callable[..., Any], reduce: Callable[[Any, Any], Any], *arrays: Any,
               initial: Any = P.NOTHING, grain: int | None = None,
               pool: Pool | None = None) -> Any:
    """``pool.map_reduce(fn, reduce, *arrays)`` on ``pool`` or the default pool.

    See ``Pool.map_reduce``.
    """
    return (pool or default_pool()).map_reduce(fn, reduce, *arrays, initial=initial,
                                                grain=grain)
