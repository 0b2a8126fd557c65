"""The distributed runtime shared by the trainer and the evaluator: which process this is (rank,
world), the device it computes on, the device its collective tensors live on, the process group
(joined when one exists, created and owned under torchrun), and the two row gathers both sides
need, since both shard rows rank-strided (rank r holds rows r, r + world, ...).

    rt = Runtime.setup("auto")          # or a torch.device / "cuda:1" / "cpu"
    try:
        ...                             # rt.rank, rt.world, rt.main, rt.device, rt.barrier()
    finally:
        rt.close()                      # tears the process group down if setup created it

The trainer's precision and layout switches (bf16 autocast, channels_last, fused SGD) ride along as
keyword options of `setup` ("auto" means on CUDA), so a run carries one runtime object.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Runtime", "resolve_device"]


def resolve_device(device=None) -> torch.device:
    """The device a process computes on. None or "auto": this process's GPU if CUDA is available
    (LOCAL_RANK under torchrun), else the CPU; "cuda" without an index: the LOCAL_RANK GPU; anything
    else as given ("cuda:1", "cpu", a torch.device)."""
    if isinstance(device, torch.device):
        return device
    spec = "auto" if device is None else str(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        return torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cuda":
        return torch.device(f"cuda:{local}")
    return torch.device(spec)


def _switch(value, cuda: bool) -> bool:
    """An on/off option: True/"on"/"bf16" on, False/None/"off" off, "auto" on CUDA only."""
    if value == "auto":
        return cuda
    if isinstance(value, str):
        return value in ("on", "bf16")
    return bool(value)


@dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where this process computes
    collective_device: torch.device = field(
        default_factory=lambda: torch.device("cpu")
    )  # where collective tensors live
    owns_group: bool = False  # setup() initialised the process group, close() tears it down
    amp: bool = False  # bf16 autocast in autocast()
    channels_last: bool = False  # 4-d inputs in channels_last memory format
    fused: bool = False  # fused optimizer kernels

    @classmethod
    def setup(cls, device=None, *, amp=False, channels_last=False, fused=False) -> Runtime:
        """The runtime of this process on `device` (see resolve_device). Joins the process group if
        one is initialised; under torchrun (WORLD_SIZE > 1) without one, initialises it (NCCL for a
        CUDA device, gloo otherwise) and owns it. amp / channels_last / fused take True/False or
        "on"/"off"/"auto" ("auto": on for a CUDA device; amp also takes "bf16")."""
        dev = resolve_device(device)
        cuda = dev.type == "cuda"
        if cuda:
            torch.cuda.set_device(dev)
        owns = False
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("nccl" if cuda else "gloo")
            owns = True
        flags = dict(amp=_switch(amp, cuda), channels_last=_switch(channels_last, cuda), fused=_switch(fused, cuda))
        if dist.is_available() and dist.is_initialized():
            # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
            coll = dev if dist.get_backend() == "nccl" else torch.device("cpu")
            return cls(dist.get_rank(), dist.get_world_size(), dev, coll, owns, **flags)
        return cls(0, 1, dev, torch.device("cpu"), False, **flags)

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    def autocast(self):
        """bf16 autocast on this device when amp is on (a no-op context otherwise)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        """Destroy the process group if setup() created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def gather_strided_rows(self, n: int, arrays: list) -> list:
        """Rank r holds rows r, r + world, ... of n rows in each numpy array (or None): gather every
        rank's arrays on rank 0 in the original order (a list of None elsewhere; None for an array
        no rank holds rows of). Goes through torch.distributed objects, so ranks need not share a
        file system. With one process the arrays come back as they are."""
        if self.world == 1:
            return list(arrays)
        parts = [None] * self.world if self.main else None
        dist.gather_object(arrays, parts, dst=0)
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
                    full[r :: self.world] = a
            out.append(full)
        return out

    def all_gather_strided_rows(self, n: int, rows: torch.Tensor | None) -> torch.Tensor:
        """Rank r holds rows r, r + world, ... of an [n, D] float tensor (None: no rows here): every
        rank gets all n rows, in order, as a float32 CPU tensor. Collective tensors travel on
        collective_device. With one process the rows come back on the CPU."""
        if self.world == 1:
            return rows.float().cpu()
        per = -(-n // self.world)
        dim = torch.tensor([rows.shape[1] if rows is not None else 0], device=self.collective_device)
        dist.all_reduce(dim, op=dist.ReduceOp.MAX)
        buf = torch.zeros(per, int(dim), device=self.collective_device)
        if rows is not None:
            buf[: rows.shape[0]] = rows.to(self.collective_device)
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        full = torch.empty(n, int(dim))
        for r, p in enumerate(parts):
            m = len(range(r, n, self.world))
            full[r :: self.world] = p[:m].cpu()
        return full
