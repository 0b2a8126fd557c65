"""The two objects the training stages hand each other: `Run`, everything `setup` builds and the
later stages read (config, runtime, data, model, optimizer...), and `Progress`, what a checkpoint
restores and the step loop extends (the start step, the loss history, the flood level)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..runtime import Runtime
from .config import TrainConfig
from .data import RecipeTransform
from .mixup import Mixup
from .models import Classifier
from .schedule import StepSchedule

__all__ = ["Run", "Progress"]


@dataclass
class Run:
    cfg: TrainConfig
    rt: Runtime
    say: Callable[[str], None]  # rank 0's log line (a no-op on the other ranks)
    data: object  # the opened training data (TensorData / DatasetData / ...)
    in_chans: int
    backbone: torch.nn.Module
    dim: int  # backbone feature width
    groups: object  # a mosx.Groups for the grouped loss, None for flat
    model: Classifier
    train_tf: RecipeTransform
    eval_tf: RecipeTransform
    micro: int  # per-process micro-batch
    accum: int  # micro-batches per optimizer step
    workers: int  # data loader workers
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    sched: StepSchedule
    mixup: Mixup
    data_id: dict | None = None  # resume.data_fingerprint(data), computed once when first needed

    @property
    def out(self) -> str:
        return self.cfg.out

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.cfg.out, "checkpoint.pt")


class NonFiniteTraining(RuntimeError):
    """The training loss or the weights became NaN / inf: the run stops, model.pt is not written and
    the last checkpoint written before it (if any) is left as it was."""


@dataclass
class Progress:
    start_step: int = 0  # the first step this process runs (the checkpoint's step when resumed)
    losses: list = field(default_factory=list)  # (step, mean training loss over the log window)
    resumed_from: int | None = None  # the checkpoint's step, None for a fresh run
    flood_level: float | None = None  # UM's b: from the config, the checkpoint or the estimate
    saved_step: int | None = None  # the step of the last checkpoint written (or resumed from)
