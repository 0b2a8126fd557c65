"""NumPy / CuPy arrays in, the same array type out, without copies (DLPack)."""

from __future__ import annotations

import torch


def from_array(x):
    """(tensor, kind): kind is None for torch tensors, "numpy" or "cupy" for arrays."""
    if isinstance(x, torch.Tensor):
        return x, None
    mod = type(x).__module__.split(".")[0]
    if mod == "numpy":
        try:
            return torch.from_dlpack(x), "numpy"
        except (BufferError, RuntimeError, TypeError):
            # Read-only or otherwise not exportable arrays: torch.from_numpy still shares memory
            # where it can (read-only arrays are copied, with a warning from torch).
            return torch.from_numpy(x), "numpy"
    if mod == "cupy":
        return torch.from_dlpack(x), "cupy"
    return x, None


def to_array(t, kind):
    if kind is None or not isinstance(t, torch.Tensor):
        return t
    t = t.detach()
    if kind == "numpy":
        return t.numpy()
    import cupy  # only reached when the input was a CuPy array

    return cupy.from_dlpack(t)
