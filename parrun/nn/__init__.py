"""Reference workloads on parrun's public API: a parallel MLP, attention, and batched
inference; each paired with a serial NumPy reference."""

from __future__ import annotations

from ._attention import attention, attention_reference
from ._mlp import MLPModel, mlp, mlp_reference
from ._ops import erf, gelu_

__all__ = ["MLPModel", "attention", "attention_reference", "erf", "gelu_", "mlp",
           "mlp_reference"]
