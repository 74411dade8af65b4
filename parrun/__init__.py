"""parrun: NumPy work in parallel on warm worker processes, over shared memory, by work
stealing. No GIL, no copies of arrays between processes.

    >>> import numpy as np, parrun
    >>> x = parrun.asshared(np.arange(1_000_000, dtype=np.float32))
    >>> y = parrun.map(lambda t: np.tanh(1.7 * t + 0.3) ** 2 - 0.5 * t, x)
"""

from __future__ import annotations

from ._api import default_pool, map, map_reduce
from ._errors import (
    BrokenPool,
    ParrunError,
    PoolClosedError,
    RemoteTraceback,
    SharedMemoryError,
    WorkerCrashed,
)
from ._futures import Executor
from ._pool import JobStats, Pool, WorkerStats, default_workers
from ._shm import SharedArray, asshared, empty, full, is_shared, zeros
from ._tasks import TaskStats

__version__ = "0.1.0"

__all__ = [
    "BrokenPool",
    "Executor",
    "JobStats",
    "ParrunError",
    "Pool",
    "PoolClosedError",
    "RemoteTraceback",
    "SharedArray",
    "SharedMemoryError",
    "TaskStats",
    "WorkerCrashed",
    "WorkerStats",
    "__version__",
    "asshared",
    "default_pool",
    "default_workers",
    "empty",
    "full",
    "is_shared",
    "map",
    "map_reduce",
    "zeros",
]

def __getattr__(name: str) -> object:
    """``parrun.nn`` on first use: ``import parrun`` stays light."""
    if name == "nn":
        import importlib

        return importlib.import_module("parrun.nn")
    raise AttributeError(f"module 'parrun' has no attribute {name!r}")


for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("parrun."):
        try:
            _obj.__module__ = "parrun"
        except (AttributeError, TypeError):  # pragma: no cover
            pass
del _name, _obj
