"""Reference workloads on parrun's public API: a parallel MLP, attention, batched inference
and the Mandelbrot set; each paired with a serial reference."""

from __future__ import annotations

from ._attention import attend, attention, attention_reference
from ._mandelbrot import escape_rows_py, mandelbrot, mandelbrot_numpy
from ._minilm import MiniLMEncoder, load_minilm
from ._mlp import MLPModel, mlp, mlp_reference
from ._ops import erf, gelu_

__all__ = [
    "MLPModel",
    "MiniLMEncoder",
    "attend",
    "attention",
    "attention_reference",
    "erf",
    "escape_rows_py",
    "gelu_",
    "load_minilm",
    "mandelbrot",
    "mandelbrot_numpy",
    "mlp",
    "mlp_reference",
]
