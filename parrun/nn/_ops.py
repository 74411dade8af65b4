"""Elementwise pieces shared by the workloads: exact GELU, in place, in NumPy."""

from __future__ import annotations

import numpy as np

# Abramowitz & Stegun 7.1.26: |error| < 1.5e-7 on erf, well below float32 resolution of GELU.
_P = 0.3275911
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(x: np.ndarray) -> np.ndarray:
    """erf(x) for a float array (A&S 7.1.26), with two temporaries of x's size."""
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
