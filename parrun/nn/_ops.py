"""Elementwise pieces shared by the workloads: exact GELU, bias + activation and LayerNorm,
in place; fused into one pass per row with numba when it is installed, NumPy otherwise."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

# Bytes of activations per NumPy elementwise slab (the fallback path): about half a typical L2.
ACT_SLAB_BYTES = 192 * 1024

# Abramowitz & Stegun 7.1.26: |error| < 1.5e-7 on erf, well below float32 resolution of GELU.
_P = 0.3275911
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


_erf_exact = np.frompyfunc(math.erf, 1, 1)


def erf(x: np.ndarray) -> np.ndarray:
    """erf(x) for a float array: float64 exactly (``math.erf``, slow), other dtypes by A&S
    7.1.26 (|error| < 1.5e-7) in ~15 NumPy passes with two temporaries of x's size."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"erf takes a floating-point array, got {x.dtype}")
    if x.dtype == np.float64:
        return np.asarray(_erf_exact(x), np.float64)  # (a 0-d x gives a float)
    if x.ndim == 0:  # (NumPy scalars take no out=)
        return erf(x.reshape(1)).reshape(())
    dt = x.dtype.type
    a = np.abs(x)
    t = a * dt(_P)
    t += 1
    np.reciprocal(t, out=t)
    poly = t * dt(_A[4])
    for c in (_A[3], _A[2], _A[1], _A[0]):
        poly += dt(c)
        poly *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    poly *= a
    np.subtract(1, poly, out=poly)
    np.copysign(poly, x, out=poly)
    return poly


def gelu_(x: np.ndarray) -> np.ndarray:
    """x <- x * Phi(x), the exact (erf) GELU of torch.nn.functional.gelu, in place."""
    e = erf(x * np.asarray(1 / np.sqrt(2), x.dtype))
    e += 1
    e *= 0.5
    x *= e
    return x


def relu_(x: np.ndarray) -> np.ndarray:
    """x <- max(x, 0), in place."""
    return np.maximum(x, 0, out=x)


ACTIVATIONS = {"relu": relu_, "gelu": gelu_}


# Fused kernels (numba, when installed): bias + activation and residual + LayerNorm in one
# pass over each row, instead of NumPy's ~15 passes for GELU and ~8 for LayerNorm. erf is the
# rational approximation on [-4, 4] used by Eigen and XLA for float32 (max abs error 6.5e-8
# against math.erf, tested), which has no exp and so vectorises without SVML; float64 uses
# libm's erf.
_ERF_NUM = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
            -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
            -1.60960333262415e-02)  # odd numerator, x^13 down to x^1
_ERF_DEN = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
            -7.37332916720468e-03, -1.42647390514189e-02)  # even denominator, x^8 to x^0

# exp(x) for float32 as Cephes' expf does it: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-7
# polynomial, 2^n by building the float's exponent bits (max relative error 2.5e-7, tested).
# Written out so that numba vectorises it (libm's expf is scalar without SVML).
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)
_EXP_LOW = -87.33654  # below this e^x is not a normal float32: taken as 0

_kernels: dict[Any, Any] = {}


def jit(**options: Any) -> Any:
    """``numba.njit(**options)`` with the machine code cached on disk, so that each kernel is
    compiled once per machine instead of once per worker process (0.2-1.2 s a kernel here:
    a fresh 16-worker pool would otherwise compile in every worker, at its first piece).
    Where no cache directory can be written numba refuses ``cache=True``: then compiled per
    process, as without the cache."""
    import numba

    def decorate(fn: Any) -> Any:
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available for file"
            return numba.njit(**options)(fn)
    return decorate


class _Kernels(NamedTuple):
    gelu: Any
    relu: Any
    add_layer_norm: Any
    softmax_step: Any  # float32 only, else None


def _build(dtype: np.dtype) -> Any:
    """The fused kernels for one float dtype (compiled at first use, or loaded from numba's
    cache); None without numba."""
    try:
        import numba  # noqa: F401  (jit imports it again: here, only whether it is installed)
    except ImportError:
        return None
    t = dtype.type
    a13, a11, a9, a7, a5, a3, a1 = (t(c) for c in _ERF_NUM)
    b8, b6, b4, b2, b0 = (t(c) for c in _ERF_DEN)
    half, one, lim, rsqrt2 = t(0.5), t(1.0), t(4.0), t(1 / np.sqrt(2))
    # error_model="numpy": no zero-division branch, which would stop the loop vectorising.
    # fastmath without "nnan"/"ninf": masked scores are -inf and must stay so.
    fused = jit(fastmath={"nsz", "arcp", "contract", "afn", "reassoc"}, nogil=True,
                error_model="numpy")

    @fused
    def bias_gelu_exact(x, b):
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                v = x[i, j] + b[j]
                x[i, j] = half * v * (one + math.erf(v * rsqrt2))

    @fused
    def bias_gelu(x, b):
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                v = x[i, j] + b[j]
                z = min(max(v * rsqrt2, -lim), lim)
                z2 = z * z
                p = ((((((a13 * z2 + a11) * z2 + a9) * z2 + a7) * z2 + a5) * z2 + a3) * z2
                     + a1) * z
                q = (((b8 * z2 + b6) * z2 + b4) * z2 + b2) * z2 + b0
                x[i, j] = half * v * (one + p / q)

    @fused
    def bias_relu(x, b):
        zero = t(0)
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                x[i, j] = max(x[i, j] + b[j], zero)

    @fused
    def add_layer_norm(x, r, g, b, eps):
        n = x.shape[1]
        for i in range(x.shape[0]):
            row = x[i]
            res = r[i]
            s = 0.0
            for j in range(n):
                v = row[j] + res[j]
                row[j] = v
                s += v
            mu = s / n
            ss = 0.0
            for j in range(n):
                d = row[j] - mu
                ss += d * d
            inv = 1.0 / np.sqrt(ss / n + eps)
            for j in range(n):
                row[j] = t((row[j] - mu) * inv) * g[j] + b[j]

    p0, p1, p2, p3, p4, p5 = (t(c) for c in _EXP_POLY)
    log2e, ln2_hi, ln2_lo = t(1.4426950408889634), t(0.693359375), t(-2.12194440e-4)
    low, neg_inf, zero = t(_EXP_LOW), t(-np.inf), t(0)

    @fused
    def softmax_step(st, m, denom, corr):
        # One online-softmax step over transposed scores st (G, keys, queries): m, denom
        # (G, queries) hold each query's running max and sum of exp. st <- exp(st - new max);
        # corr <- exp(old max - new max), the factor for what was accumulated so far.
        n_groups, n_keys, n_q = st.shape
        col = np.empty(n_q, st.dtype)
        bits = np.empty(n_q, np.int32)
        pow2 = bits.view(st.dtype)
        for g in range(n_groups):
            for i in range(n_q):
                col[i] = m[g, i]
            for j in range(n_keys):
                for i in range(n_q):
                    v = st[g, j, i]
                    # A NaN score (a NaN or inf in q or k) makes the query's max NaN, and
                    # so its output, as in NumPy and torch; max() would skip it.
                    col[i] = v if (v > col[i] or v != v) else col[i]
            for i in range(n_q):
                # A query with every key masked so far keeps max -inf: shift by 0 instead.
                shift = zero if col[i] == neg_inf else col[i]
                c = math.exp(m[g, i] - shift) if m[g, i] > neg_inf else zero
                corr[g, i] = c
                denom[g, i] *= c
                m[g, i] = col[i]
                col[i] = shift
            for j in range(n_keys):
                for i in range(n_q):
                    x = st[g, j, i] - col[i]
                    xc = x if x > low else low  # NaN -> low: n and its bits stay defined
                    n = np.floor(xc * log2e + half)
                    r = xc - n * ln2_hi - n * ln2_lo
                    e = (((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5) * r * r + r + one
                    st[g, j, i] = e if x >= low else (zero if x < low else x)  # NaN stays
                    bits[i] = (np.int32(n) + 127) << 23
                for i in range(n_q):
                    e = st[g, j, i] * pow2[i]
                    st[g, j, i] = e
                    denom[g, i] += e

    # float64 users expect float64 accuracy: libm's erf (scalar, ~4x slower than the
    # rational form, which is accurate to float32 only); the softmax's exp likewise.
    if t is np.float64:
        return _Kernels(bias_gelu_exact, bias_relu, add_layer_norm, None)
    return _Kernels(bias_gelu, bias_relu, add_layer_norm, softmax_step)


def _fused(dtype: np.dtype) -> Any:
    key = np.dtype(dtype)
    if key not in _kernels:
        _kernels[key] = _build(key) if key in (np.float32, np.float64) else None
    return _kernels[key]


def _rows(x: np.ndarray) -> bool:
    """Whether x is a 2-D array of C-contiguous rows (what the fused kernels take)."""
    return x.ndim == 2 and x.strides[1] == x.itemsize


def bias_act_(x: np.ndarray, b: np.ndarray, activation: str) -> np.ndarray:
    """x <- act(x + b) in place, for x (rows, n) and b (n,): one fused pass with numba, else
    NumPy a cache-sized slab of rows at a time."""
    k = _fused(x.dtype) if _rows(x) and b.dtype == x.dtype else None
    if k is not None:
        (k.gelu if activation == "gelu" else k.relu)(x, b)
        return x
    act = ACTIVATIONS[activation]
    # GELU makes ~15 passes over its input, 2.4x faster when those stay in L2 (measured,
    # 256 x 1536 float32).
    step = max(1, ACT_SLAB_BYTES // max(1, x.shape[-1] * x.itemsize))
    for r in range(0, x.shape[0], step):
        slab = x[r:r + step]
        slab += b
        act(slab)
    return x


def add_layer_norm_(x: np.ndarray, r: np.ndarray, g: np.ndarray, b: np.ndarray,
                    eps: float) -> np.ndarray:
    """x <- LayerNorm(x + r) over the last axis (weight g, bias b), in place; x, r 2-D."""
    k = _fused(x.dtype) if _rows(x) and _rows(r) and g.dtype == b.dtype == x.dtype else None
    if k is not None:
        k.add_layer_norm(x, r, g, b, eps)
        return x
    x += r
    return layer_norm(x, g, b, eps)


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis, in place, in NumPy."""
    mu = x.mean(axis=-1, keepdims=True)
    x -= mu
    var = np.mean(x * x, axis=-1, keepdims=True)
    var += eps
    x /= np.sqrt(var)
    x *= g
    x += b
    return x


def softmax_step_(st: np.ndarray, m: np.ndarray, denom: np.ndarray) -> np.ndarray:
    """One online-softmax step over a block of transposed scores, in place.

    Args:
        st: (..., keys, queries) scores, -inf where masked; becomes exp(st - new max).
        m: (..., 1, queries) each query's running max; becomes the new max.
        denom: (..., 1, queries) running sum of exp; rescaled to the new max, plus this block.

    Returns:
        corr (..., 1, queries): exp(old max - new max), the factor by which what was
        accumulated before this block must be rescaled. One fused pass with numba for
        contiguous float32 (vectorised exp); NumPy otherwise.
    """
    k = _fused(st.dtype)
    if k is not None and k.softmax_step is not None and st.flags.c_contiguous and \
            m.flags.c_contiguous and denom.flags.c_contiguous:
        corr = np.empty_like(m)
        n_q = st.shape[-1]
        k.softmax_step(st.reshape(-1, st.shape[-2], n_q), m.reshape(-1, n_q),
                       denom.reshape(-1, n_q), corr.reshape(-1, n_q))
        return corr
    dt = st.dtype.type
    m_new = np.maximum(m, st.max(axis=-2, keepdims=True))
    # Queries with every key masked so far keep max -inf: avoid inf - inf.
    shift = np.where(np.isneginf(m_new), dt(0), m_new)
    st -= shift
    np.exp(st, out=st)
    corr = np.exp(m - shift)
    denom *= corr
    denom += st.sum(axis=-2, keepdims=True)
    m[...] = m_new
    return corr
