"""The op library mosx._C only loads next to the torch it was compiled against: say so clearly."""

from __future__ import annotations

import torch

FIX = "pip install --no-build-isolation --force-reinstall --no-deps ."


def check_torch_version(installed: str | None = None) -> None:
    """Raise ImportError when the running torch is not the one this build was compiled against
    (a source tree that was never built has no build record and is not checked)."""
    try:
        from ._build_info import TORCH_VERSION
    except ImportError:
        return
    installed = torch.__version__ if installed is None else installed
    if installed != TORCH_VERSION:
        raise ImportError(
            f"mosx was built against torch {TORCH_VERSION}, but torch {installed} is installed; the "
            f"compiled op library only loads next to the torch it was built with. Rebuild mosx against "
            f"this torch: `{FIX}` in the mosx source folder (or install torch=={TORCH_VERSION})."
        )
