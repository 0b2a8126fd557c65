"""Temporary: the evaluator's distributed runtime until mosx.runtime (shared with the trainer) lands."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    owned: bool = False  # we initialised the process group (and tear it down)
    device: torch.device = torch.device("cpu")  # where collective tensors live

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def close(self):
        if self.owned:
            torch.distributed.destroy_process_group()

    @classmethod
    def setup(cls, device: torch.device) -> "Runtime":
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), device=_collective_device(device))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            return cls(dist.get_rank(), dist.get_world_size(), owned=True, device=_collective_device(device))
        return cls()

    def gather_strided_rows(self, n: int, arrays: list) -> list:
        """Rank r holds rows r, r + world, ...: gather every rank's arrays on rank 0 in the original order
        (None elsewhere). Goes through torch.distributed, so ranks need not share a file system."""
        parts = [None] * self.world if self.main else None
        torch.distributed.gather_object(arrays, parts, dst=0)
        if not self.main:
            return [None] * len(arrays)
        out = []
        for k in range(len(arrays)):
            pieces = [p[k] for p in parts]
            ref = next((a for a in pieces if a is not None and len(a)), None)
            if ref is None:
                out.append(None)
                continue
            full = np.empty((n,) + ref.shape[1:], ref.dtype)
            for r, a in enumerate(pieces):
                if a is not None and len(a):
                    full[r::self.world] = a
            out.append(full)
        return out


def _collective_device(device: torch.device) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
    return device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
