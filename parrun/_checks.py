"""Checks of ``map``'s arguments, shared by the local pool and the backends."""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np


def check_arrays(arrays: tuple) -> list[np.ndarray]:
    """The arrays ``map`` splits along axis 0, as arrays of one length; else TypeError or
    ValueError naming the argument."""
    if not arrays:
        raise TypeError("map needs at least one array to split")
    out = []
    for i, a in enumerate(arrays):
        _check_not_masked(a, f"argument {i}")
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


def _check_not_masked(a: Any, what: str) -> None:
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{what} is a masked array; map splits plain arrays and would drop "
                        "the mask: pass a.filled(value), or the data and the mask as two "
                        "arrays")


def check_grain(grain: Any) -> int:
    """``grain``, rows per piece: a positive int."""
    if isinstance(grain, bool) or not isinstance(grain, (int, np.integer)):
        raise TypeError(f"grain must be an int, got {type(grain).__name__}")
    if grain < 1:
        raise ValueError(f"grain must be greater than 0, got {grain}")
    return int(grain)


def check_fn(fn: Any, reduce: Any) -> None:
    """``map``'s function: callable, and (for map) returning one array."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if reduce is None and isinstance(fn, np.ufunc) and fn.nout > 1:
        raise TypeError(f"{fn.__name__} returns {fn.nout} arrays; map fills one (map a "
                        "function that returns one of them)")
    if reduce is not None and not callable(reduce):
        raise TypeError(f"reduce must be callable, got {type(reduce).__name__}")


def check_first_result(res: Any, lo: int, hi: int) -> np.ndarray:
    """``fn``'s result for rows ``lo:hi`` when map allocates ``out`` from it: an array with a
    row per input row, not of objects; else TypeError or ValueError naming the rows."""
    if res is None:
        raise TypeError(f"fn returned None for rows {lo}:{hi}; map needs fn to return an "
                        "array with one row per input row (use map_reduce to reduce)")
    check_not_tuple(res)
    _check_not_masked(res, f"fn's result for rows {lo}:{hi}")
    res = np.asarray(res)
    if res.ndim == 0 or res.shape[0] != hi - lo:
        raise ValueError(f"fn returned shape {res.shape} for rows {lo}:{hi}; map needs one "
                         "result row per input row (use map_reduce to reduce)")
    if res.dtype.hasobject:
        raise TypeError(f"fn returned dtype {res.dtype} for rows {lo}:{hi}; results must be "
                        "numeric")
    return res


def check_out(out: Any, n: int) -> np.ndarray:
    """``map``'s ``out``: a writable array of ``n`` rows; else TypeError or ValueError."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    _check_not_masked(out, "out")
    if out.dtype.hasobject:
        raise TypeError(f"out has dtype {out.dtype}, which holds Python objects")
    if out.ndim == 0 or out.shape[0] != n:
        raise ValueError(f"out has shape {out.shape}; it needs {n} rows along axis 0 to match "
                         "the inputs")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    return out


def check_ufunc_out(fn: Any, arrays: list[np.ndarray], out: np.ndarray) -> None:
    """A ufunc broadcasts each piece against its slice of ``out``: (k,) into (k, 2) passes
    for k = 1 (found by fuzzing), and Dask's pieces broadcast whole. So check whole shapes:
    those of the ufunc of no rows of the inputs (so a gufunc's core dimensions count)."""
    if isinstance(fn, np.ufunc):
        try:
            with np.errstate(all="ignore"):
                row = np.shape(fn(*(a[:0] for a in arrays)))[1:]
        except Exception:  # the pieces will say what is wrong
            return
        want = (len(out), *row) if arrays else out.shape
        if out.shape != want:
            raise ValueError(f"out has shape {out.shape}, but {fn.__name__} of the inputs has "
                             f"shape {want}; pass an out of that shape")


def out_position(fn: Any) -> float | None:
    """Where ``fn`` takes an ``out`` argument: the index of that positional parameter
    (``inf`` if it is keyword-only), or None if it takes none."""
    if isinstance(fn, np.ufunc):
        return float(fn.nin) if fn.nout == 1 else None
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    p = params.get("out")
    if p is None:
        return None
    if p.kind == p.KEYWORD_ONLY:
        return math.inf
    return float(list(params).index("out")) if p.kind == p.POSITIONAL_OR_KEYWORD else None


def out_fits(position: float | None, nargs: int) -> bool:
    """True if ``out`` can go by keyword to a function whose ``out`` parameter is at
    ``position`` (``out_position``) when it is called with ``nargs`` arrays: not when the
    arrays already fill it (``def f(x, out)`` mapped over two arrays)."""
    return position is not None and nargs <= position


def accepts_out(fn: Any, nargs: int) -> bool:
    """True if ``fn``, called with ``nargs`` arrays, takes an ``out`` argument as NumPy ufuncs
    do: map then passes it the slice of ``out`` to fill in place (no temporary result, no
    copy)."""
    return out_fits(out_position(fn), nargs)


def store_result(dst: np.ndarray, res: Any, lo: int, hi: int, made_out: bool = False) -> None:
    """Write ``fn``'s result for rows ``lo:hi`` into ``dst`` (its slice of ``out``), checking
    shape and dtype: TypeError or ValueError naming the rows, never a silent cast.

    Casting is ``same_kind`` (NumPy's rule for ``out=``) into an out the caller gave, and
    ``safe`` into one map made with the first piece's dtype (``made_out``), so that a later
    piece's wider result (int64 after int8) is refused, not cut down."""
    if res is dst or (isinstance(res, np.ndarray) and res.base is dst.base
                      and res.__array_interface__ == dst.__array_interface__):
        return
    if not isinstance(res, np.ndarray):
        check_not_tuple(res)
        if res is None:
            raise TypeError(f"fn returned None for rows {lo}:{hi}; map needs fn to return an "
                            f"array of shape {dst.shape}")
        res = np.asarray(res)
    if isinstance(res, np.ma.MaskedArray):  # (the message is built only then: a hot path)
        _check_not_masked(res, f"fn's result for rows {lo}:{hi}")
    if res.shape != dst.shape:
        raise ValueError(f"fn returned shape {res.shape} for rows {lo}:{hi}, expected "
                         f"{dst.shape}: one result row per input row (use map_reduce to "
                         "reduce)")
    if ((dst.dtype.kind in "SU" and not np.can_cast(res.dtype, dst.dtype, "safe"))
            or (dst.dtype.kind == "V" and res.dtype.itemsize > dst.dtype.itemsize)):
        # same_kind lets NumPy cut strings short (and write 1000 as '10'): data lost silently.
        raise TypeError(f"fn returned dtype {res.dtype} for rows {lo}:{hi} but out has dtype "
                        f"{dst.dtype}, which would cut it short; pass an out wide enough "
                        "(when map allocates out, its dtype is that of the first piece)")
    if made_out and not np.can_cast(res.dtype, dst.dtype, "safe"):
        raise TypeError(f"fn returned dtype {res.dtype} for rows {lo}:{hi}, but the first rows "
                        f"gave {dst.dtype} (map made out with that dtype), which cannot hold "
                        "it; return one dtype for every piece, or pass out")
    try:
        np.copyto(dst, res, casting="same_kind")  # (made_out: a safe cast, checked above)
    except TypeError as e:
        raise TypeError(f"fn returned dtype {res.dtype} but out has dtype {dst.dtype}: {e}") \
            from None


def check_not_tuple(res: Any) -> None:
    """TypeError for a tuple result (``np.divmod``, ``np.frexp``): map fills one array, and
    NumPy would stack the tuple into one, silently, when its length matches the rows."""
    if isinstance(res, tuple):
        raise TypeError(f"fn returned a tuple of {len(res)}; map needs one array with a row "
                        "per input row (map each output separately, or stack them in fn)")
