"""Elementwise pieces shared by the workloads: exact GELU, in place, in NumPy."""

from __future__ import annotations

import numpy as np

# Abramowitz & Stegun 7.1.26: |error| < 1.5e-7 on erf, well below float32 resolution of GELU.
_P = 0.3275911
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(x: np.ndarray) -> np.ndarray:
    """erf(x) for a float array (A&S 7.1.26)."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + _P * a)
    poly = ((((_A[4] * t + _A[3]) * t + _A[2]) * t + _A[1]) * t + _A[0]) * t
    return (sign * (1.0 - poly * np.exp(-a * a))).astype(x.dtype, copy=False)


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
