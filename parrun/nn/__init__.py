"""Reference workloads on parrun's public API: a parallel MLP, attention, batched inference
and the Mandelbrot set; each paired with a serial reference."""

from __future__ import annotations

from ._attention import attention, attention_reference
from ._mandelbrot import escape_rows_py, mandelbrot, mandelbrot_numpy
from ._mlp import MLPModel, mlp, mlp_reference
from ._ops import erf, gelu_

__all__ = ["MLPModel", "attention", "attention_reference", "erf", "escape_rows_py", "gelu_",
           "mandelbrot", "mandelbrot_numpy", "mlp", "mlp_reference"]
