"""Atomic file writes shared by the trainer, the model files and the evaluator's cache."""

from __future__ import annotations

import os

import torch

__all__ = ["atomic_save", "atomic_write_text"]


def atomic_write_text(text: str, path: str) -> None:
    """A text file (UTF-8) written as atomic_save writes: the old file or the new one, never a part."""
    atomic_save(text, path, writer=lambda obj, f: f.write(obj.encode("utf-8")))


def atomic_save(obj, path: str, writer=None) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a reader (or a run
    killed mid-write) sees the old file or the new one, never a partial one. writer(obj, file): another
    serialiser than torch.save."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            (writer or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
