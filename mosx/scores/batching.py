"""Many scorers over the same data at once: :func:`fit_all` and :func:`score_all` read each block
of rows (tensors or arrays such as an fp16 memmap of the evaluator's cache) once for all scorers."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import torch

from .base import Scorer


def _rows(data: Mapping, keys: Iterable[str]) -> int:
    n = None
    for k in keys:
        v = data.get(k)
        if isinstance(v, torch.Tensor) or hasattr(v, "shape"):
            rows = v.shape[0]
            if n is not None and rows != n:
                raise ValueError(f"score_all: `{k}` has {rows} rows, other data has {n}")
            n = rows
    if n is None:
        raise ValueError("score_all: no row data (logits / features / inputs) given")
    return n


_ROW_KEYS = ("logits", "features", "inputs", "labels")


def _chunk(v, lo, hi, device):
    t = v[lo:hi]
    if not isinstance(t, torch.Tensor):
        import numpy as np

        t = torch.from_numpy(np.array(t))  # e.g. a read-only NumPy memmap of the fp16 cache: copy the chunk
    t = t.to(device, non_blocking=True)
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _declared(data: Mapping, keys) -> dict:
    """The entries of `data` a scorer reads (see Scorer.fit_accepts / Scorer.accepts)."""
    return {k: v for k, v in data.items() if k in keys and v is not None}


def fit_all(scorers: Mapping[str, Scorer], data: Mapping, *, device=None) -> dict:
    """Fit every scorer that needs it on the same ID data (loaded to `device` once). Each scorer is
    handed only the data it reads (``fit_needs`` and its optional fit data)."""
    todo = {k: s for k, s in scorers.items() if s.needs_fit}
    if not todo:
        return dict(scorers)
    n = _rows(data, _ROW_KEYS)
    dev = torch.device(device) if device is not None else None
    loaded = None
    for name, s in todo.items():
        accepts = s.fit_accepts
        # labels may come from the logits' argmax where the scorer reads logits as that fallback
        fallback = "logits" in accepts and "logits" not in s.fit_needs and data.get("logits") is not None
        missing = [k for k in s.fit_needs if data.get(k) is None and not (k == "labels" and fallback)]
        if missing:
            raise ValueError(f"fit_all: scorer {name!r} needs {missing} to fit")
        if getattr(s, "streaming_fit", False):
            # reads the (possibly memory-mapped) data in row blocks
            s.fit(**_declared(data, accepts), **({"device": dev} if "device" in accepts else {}))
            continue
        if loaded is None:  # everything in memory once, for the scorers that need it whole
            loaded = {
                k: (
                    _chunk(v, 0, n, dev or (v.device if isinstance(v, torch.Tensor) else "cpu"))
                    if k in _ROW_KEYS and v is not None
                    else v
                )
                for k, v in data.items()
            }
        s.fit(**_declared(loaded, accepts))
    return dict(scorers)


def score_all(
    scorers: Mapping[str, Scorer],
    data: Mapping,
    *,
    batch_size: int = 65536,
    device=None,
    timings: dict | None = None,
) -> dict:
    """Every scorer on the same data, reading each chunk of rows once; each scorer is handed only
    the data it reads (``needs`` and its optional score data).

    data: ``logits`` / ``features`` (tensors or arrays such as an fp16 memmap; half precision is
    widened to float32 per chunk), optionally ``inputs`` + ``model`` and ``head``.
    timings: if a dict is given, the seconds spent in each scorer are added to it.
    Returns {name: [N] tensor on the CPU}.
    """
    if batch_size < 1:
        raise ValueError(f"score_all: batch_size must be >= 1, got {batch_size}")
    for name, s in scorers.items():
        missing = [
            k for k in s.needs if data.get(k) is None and not (k == "head" and getattr(s, "head", None) is not None)
        ]
        if missing:
            raise ValueError(f"score_all: scorer {name!r} needs {missing}, which the data lacks")
        if not s.fitted:
            raise RuntimeError(f"score_all: scorer {name!r} must be fitted first (fit_all / .fit)")
    n = _rows(data, _ROW_KEYS)
    first = next((v for k, v in data.items() if k in _ROW_KEYS and isinstance(v, torch.Tensor)), None)
    dev = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    parts = {name: [] for name in scorers}
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        batch = {k: (_chunk(v, lo, hi, dev) if k in _ROW_KEYS and v is not None else v) for k, v in data.items()}
        for name, s in scorers.items():
            t0 = time.perf_counter()
            out = s.score(**_declared(batch, s.accepts))
            if timings is not None:
                if out.is_cuda:
                    torch.cuda.synchronize(out.device)
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
            parts[name].append(out.detach().cpu())
    return {name: torch.cat(p) for name, p in parts.items()}
