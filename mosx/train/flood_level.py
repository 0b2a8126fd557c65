"""Unleashing Mask's first stage: estimate the flooding level b, the mean training loss of the
model under a random weight mask (mosx.unleash.estimate_flood_level), averaged over the ranks and
written to `<out>/flood_level.json`."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from ..unleash import estimate_flood_level
from .data import KeyedDataset, StepBatchSampler
from .features import loader, to_input
from .state import Run

__all__ = ["estimate"]


def estimate(run: Run) -> float:
    """b over one pass of the training data (cfg.um_estimate: the random mask's keep fraction)."""
    cfg, rt, data, micro = run.cfg, run.rt, run.data, run.micro
    est_sampler = StepBatchSampler(
        len(data), micro * rt.world, micro, rt.world, rt.rank, cfg.seed, steps=len(data) // (micro * rt.world)
    )
    est_loader = loader(KeyedDataset(data, run.train_tf, cfg.seed), est_sampler, run.workers, rt.device)

    def est_batches():
        for x, y in est_loader:
            yield to_input(x, rt, non_blocking=False), y.to(rt.device)

    with rt.autocast():
        b = estimate_flood_level(
            run.model, est_batches(), lambda logits, y: run.loss_fn(logits, y), keep=cfg.um_estimate, seed=cfg.seed
        )
    if rt.world > 1:  # one b for all processes: the mean of their estimates
        t = torch.tensor([b], device=rt.collective_device, dtype=torch.float64)
        dist.all_reduce(t)
        b = float(t) / rt.world
    run.say(f"Unleashing Mask: estimated flooding level b = {b:.6f} (keep {cfg.um_estimate})")
    if rt.main:
        with open(os.path.join(cfg.out, "flood_level.json"), "w") as f:
            json.dump({"flood_level": b, "keep": cfg.um_estimate, "loss": cfg.loss}, f)
    return b
