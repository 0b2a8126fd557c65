"""Tensor helpers shared by the scorers: input checks, row-block reading and exact percentiles.

Nothing here knows about a particular scorer; every family module may import it.
"""

from __future__ import annotations

import math

import torch

from .._dtypes import acc_dtype


# ------------------------------------------------------------------------------ checks
def _matrix(x, name: str, who: str, cols: int | None = None) -> torch.Tensor:
    """`x` as a 2-D floating tensor in the compute dtype (float64 stays, the rest become float32)."""
    if x is None:
        raise ValueError(f"{who}: needs `{name}`")
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(
            f"{who}: {name} must be 2-D [N, {'D' if name == 'features' else 'L'}], got shape {tuple(x.shape)}"
        )
    if not (x.is_floating_point()):
        raise TypeError(f"{who}: {name} must be floating point, got {x.dtype}")
    if cols is not None and x.shape[1] != cols:
        raise ValueError(f"{who}: {name} have {x.shape[1]} columns but the scorer was fitted on {cols}")
    return x.to(acc_dtype(x.dtype))


def _check_2d(x, name: str, who: str) -> None:
    """Shape/dtype checks on a tensor or array without loading it (it may be a large memmap)."""
    if x is None:
        raise ValueError(f"{who}: needs `{name}`")
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"{who}: {name} must be 2-D, got shape {shape}")
    dt = x.dtype
    floating = dt.is_floating_point if isinstance(dt, torch.dtype) else getattr(dt, "kind", "") == "f"
    if not floating:
        raise TypeError(f"{who}: {name} must be floating point, got {dt}")


def _same_rows(who: str, **named):
    rows = {k: v.shape[0] for k, v in named.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"{who}: row counts differ: {rows}")


def _is_half(x) -> bool:
    dt = getattr(x, "dtype", None)
    return dt == torch.float16 or str(dt) == "float16"


# ------------------------------------------------------------------------------ row blocks
def _row_chunks(x, device, chunk: int = 65536, dtype=torch.float64):
    """Row blocks of a tensor or array (e.g. a memmap of the fp16 cache) as `dtype` on `device`."""
    for lo in range(0, x.shape[0], chunk):
        t = x[lo : lo + chunk]
        if not isinstance(t, torch.Tensor):
            import numpy as np

            t = torch.from_numpy(np.array(t))
        yield lo, t.to(device=device, dtype=dtype)


def _fit_device(x, device):
    if device is not None:
        return torch.device(device)
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


# ------------------------------------------------------------------------------ percentiles
def _percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """q-th percentile of all elements with linear interpolation (NumPy's default), any size."""
    flat = x.reshape(-1)
    n = flat.numel()
    pos = (q / 100.0) * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    v_lo = flat.kthvalue(lo + 1).values.to(torch.float64)
    v_hi = flat.kthvalue(hi + 1).values.to(torch.float64) if hi != lo else v_lo
    return v_lo + (v_hi - v_lo) * (pos - lo)


def _percentile_fp16(x, q: float, device=None) -> torch.Tensor:
    """Exact q-th percentile (linear interpolation) of an fp16 tensor/array of any size, read in row
    blocks: fp16 has 65,536 bit patterns, so one bincount of them gives every order statistic."""
    dev = _fit_device(x, device)
    counts = torch.zeros(65536, dtype=torch.int64, device=dev)
    for lo in range(0, x.shape[0], 65536):
        t = x[lo : lo + 65536]
        if not isinstance(t, torch.Tensor):
            import numpy as np

            t = torch.from_numpy(np.array(t))
        bits = t.to(dev).reshape(-1).view(torch.int16).to(torch.int32) & 0xFFFF
        counts += torch.bincount(bits, minlength=65536)
    values = torch.arange(65536, dtype=torch.int32, device=dev).to(torch.int16).view(torch.float16).to(torch.float64)
    nan = torch.isnan(values)
    if bool(counts[nan].any()):
        raise ValueError(f"react: the features contain {int(counts[nan].sum())} NaN value(s)")
    order = torch.argsort(torch.where(nan, torch.inf, values), stable=True)
    cum = torch.cumsum(counts[order], 0)
    n = int(cum[-1])
    if n == 0:
        raise ValueError("react: no features to take a percentile of")
    pos = (q / 100.0) * (n - 1)
    ranks = torch.tensor([math.floor(pos), min(math.floor(pos) + 1, n - 1)], device=dev)
    # the k-th smallest (0-based) is the first value whose cumulative count exceeds k
    v = values[order[torch.searchsorted(cum, ranks, side="right")]]
    return v[0] + (v[1] - v[0]) * (pos - math.floor(pos))
