"""The Mandelbrot set: the classic "Python is slow" kernel, per pixel, in plain Python.

``escape_rows`` is written as ordinary loops; with numba installed it is compiled (once per
machine: numba caches it on disk, and each worker loads it) and parrun runs it over rows of a
shared image. Row costs are very uneven (rows through the set take ``max_iter`` steps a
pixel, rows outside a handful), which is where work stealing earns its keep.
"""

from __future__ import annotations

import numpy as np

import parrun

# The classic view of the set.
VIEW = (-2.0, 0.6, -1.2, 1.2)


def escape_rows_py(rows, out, width, height, max_iter, x0, x1, y0, y1):
    """Escape times of image rows ``rows`` into ``out`` (len(rows), width): plain Python."""
    for r in range(rows.shape[0]):
        y = y0 + (y1 - y0) * rows[r] / max(height - 1, 1)  # (one row: y0, as linspace)
        for c in range(width):
            x = x0 + (x1 - x0) * c / max(width - 1, 1)
            zr = 0.0
            zi = 0.0
            n = 0
            while n < max_iter and zr * zr + zi * zi <= 4.0:
                zr, zi = zr * zr - zi * zi + x, 2.0 * zr * zi + y
                n += 1
            out[r, c] = n
    return out


def _compile():
    try:
        import numba
    except ImportError:
        return None, None
    from ._ops import jit

    serial = jit(nogil=True)(escape_rows_py)

    # The peer parrun is measured against: escape_rows_py's loop, written out again with
    # prange over the rows, so that numba compiles the same per-pixel code both ways.
    def escape_prange(out, width, height, max_iter, x0, x1, y0, y1):
        for r in numba.prange(height):
            y = y0 + (y1 - y0) * r / max(height - 1, 1)
            for c in range(width):
                x = x0 + (x1 - x0) * c / max(width - 1, 1)
                zr = 0.0
                zi = 0.0
                n = 0
                while n < max_iter and zr * zr + zi * zi <= 4.0:
                    zr, zi = zr * zr - zi * zi + x, 2.0 * zr * zi + y
                    n += 1
                out[r, c] = n
        return out

    return serial, jit(parallel=True)(escape_prange)


escape_rows, escape_prange = _compile()
HAVE_NUMBA = escape_rows is not None


def mandelbrot_numpy(width: int, height: int, max_iter: int, view=VIEW) -> np.ndarray:
    """Vectorised NumPy reference: iterate the whole grid, masking escaped points."""
    x0, x1, y0, y1 = view
    c = (np.linspace(x0, x1, width)[None, :] + 1j * np.linspace(y0, y1, height)[:, None])
    z = np.zeros_like(c)
    out = np.zeros(c.shape, np.int32)
    alive = np.ones(c.shape, bool)
    for n in range(max_iter):
        z[alive] = z[alive] ** 2 + c[alive]
        esc = alive & (z.real ** 2 + z.imag ** 2 > 4.0)
        out[esc] = n + 1
        alive &= ~esc
    out[alive] = max_iter
    return out


class _Rows:
    """map's fn: escape times for a piece of row indices, written into its rows of out."""

    __parrun_rerun_safe__ = True  # out is only written: a dead worker's piece may run again

    def __init__(self, width, height, max_iter, view, kernel):
        self.args = (width, height, max_iter, *view)
        self.kernel = kernel

    def __call__(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        return self.kernel(rows, out, *self.args)


def mandelbrot(width: int, height: int, max_iter: int = 256, view=VIEW,
               pool: parrun.Pool | None = None, out: np.ndarray | None = None,
               grain: int | None = None) -> np.ndarray:
    """Escape-time image (height, width) int32 (int64 if max_iter needs it), rows computed
    in parallel by ``pool``.

    The kernel is ``escape_rows`` compiled by numba when installed (``pip install
    parrun[numba]``), else the plain-Python ``escape_rows_py`` (correct, and slow).
    """
    for name, v in (("width", width), ("height", height), ("max_iter", max_iter)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    try:
        view = tuple(float(v) for v in view)
    except (TypeError, ValueError):
        view = ()
    if len(view) != 4 or not all(np.isfinite(view)):
        raise ValueError("view must be 4 finite numbers (x0, x1, y0, y1)")
    if out is not None:
        # The compiled kernel writes out[r, c] for every c < width with no bounds check: a
        # narrower out was overrun (a worker's SIGSEGV), a wider one left half unwritten.
        if not isinstance(out, np.ndarray) or out.shape != (height, width) \
                or not np.issubdtype(out.dtype, np.integer) or not out.flags.writeable:
            raise ValueError(f"out must be a writeable integer array of shape "
                             f"{(height, width)}, got "
                             f"{getattr(out, 'shape', type(out).__name__)} "
                             f"{getattr(out, 'dtype', '')}".rstrip())
        if np.iinfo(out.dtype).max < max_iter:
            raise ValueError(f"out's dtype {out.dtype} cannot hold max_iter={max_iter}")
    pool = pool or parrun.default_pool()
    dtype = np.int32 if max_iter <= np.iinfo(np.int32).max else np.int64  # (int32 wrapped)
    mine = parrun.empty((height, width), dtype) if out is None else None
    if mine is not None:
        out = mine
    rows = parrun.asshared(np.arange(height, dtype=np.int64))
    try:
        kernel = escape_rows if HAVE_NUMBA else escape_rows_py
        return pool.map(_Rows(width, height, max_iter, view, kernel), rows, out=out,
                        grain=grain)
    except BaseException:
        if mine is not None:  # made here: not left to the garbage collector
            mine.release()
        raise
    finally:
        rows.release()
