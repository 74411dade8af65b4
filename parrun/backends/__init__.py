"""Other engines behind parrun's API. Built on parrun's public API only.

``parrun.Pool(backend="dask", client=... or address=...)`` returns a ``DaskPool``: ``map``,
``map_reduce``, ``submit``, ``parrun.Executor`` and the ``parrun.nn`` workloads on a Dask
distributed cluster. Importing this package does not import dask; ``DaskPool`` does.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DaskPool"]


def __getattr__(name: str) -> Any:
    if name == "DaskPool":
        from ._dask import DaskPool

        return DaskPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
