"""Checks of ``map``'s arguments, shared by the local pool and the backends."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np


def check_arrays(arrays: tuple) -> list[np.ndarray]:
    """The arrays ``map`` splits along axis 0, as arrays of one length; else TypeError or
    ValueError naming the argument."""
    if not arrays:
        raise TypeError("map needs at least one array to split")
    out = []
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray):
            try:
                a = np.asarray(a)
            except Exception as e:
                raise TypeError(f"argument {i} is not an array: {type(a).__name__}") from e
        if a.dtype.hasobject:
            raise TypeError(f"argument {i} has dtype {a.dtype}, which holds Python objects; "
                            "parrun moves numeric arrays only")
        if a.ndim == 0:
            raise ValueError(f"argument {i} is 0-dimensional; map splits arrays along axis 0")
        out.append(a)
    n = out[0].shape[0]
    for i, a in enumerate(out[1:], 1):
        if a.shape[0] != n:
            raise ValueError(f"arrays must have the same length along axis 0: argument 0 has "
                             f"{n} rows and argument {i} has {a.shape[0]}")
    return out


def check_out(out: Any, n: int) -> np.ndarray:
    """``map``'s ``out``: a writable array of ``n`` rows; else TypeError or ValueError."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.dtype.hasobject:
        raise TypeError(f"out has dtype {out.dtype}, which holds Python objects")
    if out.ndim == 0 or out.shape[0] != n:
        raise ValueError(f"out has shape {out.shape}; it needs {n} rows along axis 0 to match "
                         "the inputs")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    return out


def accepts_out(fn: Any) -> bool:
    """True if ``fn`` takes an ``out`` argument, as NumPy ufuncs do: map then passes it the
    slice of ``out`` to fill in place (no temporary result, no copy)."""
    if isinstance(fn, np.ufunc):
        return fn.nout == 1
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    p = params.get("out")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def store_result(dst: np.ndarray, res: Any, lo: int, hi: int) -> None:
    """Write ``fn``'s result for rows ``lo:hi`` into ``dst`` (its slice of ``out``), checking
    shape and dtype: TypeError or ValueError naming the rows, never a silent cast."""
    if res is dst or (isinstance(res, np.ndarray) and res.base is dst.base
                      and res.__array_interface__ == dst.__array_interface__):
        return
    if not isinstance(res, np.ndarray):
        if res is None:
            raise TypeError(f"fn returned None for rows {lo}:{hi}; map needs fn to return an "
                            f"array of shape {dst.shape}")
        res = np.asarray(res)
    if res.shape != dst.shape:
        raise ValueError(f"fn returned shape {res.shape} for rows {lo}:{hi}, expected "
                         f"{dst.shape}: one result row per input row (use map_reduce to "
                         "reduce)")
    try:
        np.copyto(dst, res, casting="same_kind")
    except TypeError as e:
        raise TypeError(f"fn returned dtype {res.dtype} but out has dtype {dst.dtype}: {e}") \
            from None
