"""Checkpoints: atomic writes and the random-number state needed to resume a run exactly."""

from __future__ import annotations

import random

import numpy as np
import torch

from .._io import atomic_save

__all__ = ["atomic_save", "rng_state", "set_rng_state"]


def rng_state() -> dict:
    """Every RNG's state as tensors and plain Python values, so a checkpoint loads with
    weights_only=True (NumPy's key array is stored as an int64 tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    s = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
