"""Floating-point dtype rules shared by the ops, the masked weight and the scorers (defined once).

The kernels accept these float dtypes and accumulate in float64 for float64 input, float32 for
everything narrower; the scorers compute in the same dtype as the kernels accumulate.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of `dtype`: float64 stays float64, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
