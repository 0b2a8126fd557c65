"""The end of a run: the final checkpoint, the deployable model (`<out>/model.pt`, UMAP masks
folded into plain weights) and `config.json`, and the validation accuracy."""

from __future__ import annotations

import json
import os

import torch

from ..masking import fold_masks
from ..ops import group_predict
from . import resume
from .data import KeyedDataset, open_data
from .features import ListSampler, loader, to_input
from .log import TrainLog
from .models import save_model
from .state import Progress, Run

__all__ = ["finish", "accuracy"]


def finish(run: Run, progress: Progress, log: TrainLog, val_data=None):
    """Save what the run made; returns (model path, validation top-1 accuracy or None). val_data
    overrides cfg.val_data; the accuracy is measured on rank 0."""
    cfg, rt = run.cfg, run.rt
    if cfg.steps > progress.start_step or not os.path.exists(run.ckpt_path):
        resume.save(run, progress, cfg.steps, log.flush)
    model_path = os.path.join(cfg.out, "model.pt")
    if cfg.umap_keep is not None:
        fold_masks(run.model)
    if rt.main:
        save_model(
            model_path,
            run.model,
            arch=cfg.model,
            num_features=run.dim,
            groups=run.groups,
            loss=cfg.loss,
            class_names=run.data.class_names,
            in_chans=run.in_chans,
            extra={"config": cfg.to_dict(), "flood_level": progress.flood_level},
        )
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    log.close()
    val_acc = None
    vd = val_data if val_data is not None else cfg.val_data
    if vd is not None and rt.main:
        val_acc = accuracy(
            run.model,
            open_data(vd, cfg.data_root, trust_pickle=cfg.trust_pickle),
            run.eval_tf,
            run.groups,
            rt,
            run.micro,
            run.workers,
        )
        run.say(f"validation top-1 accuracy {val_acc:.4f}")
    rt.barrier()
    return model_path, val_acc


@torch.no_grad()
def accuracy(model, data, transform, groups, rt, batch, workers) -> float:
    """Top-1 accuracy: group_predict's global class ids for the grouped model, argmax for flat."""
    was = model.training
    model.eval()
    correct = total = 0
    keys = [(i, 0) for i in range(len(data))]
    for x, y in loader(KeyedDataset(data, transform, 0), ListSampler(keys, batch), workers, rt.device):
        x = to_input(x, rt, non_blocking=False)
        with rt.autocast():
            logits = model(x).float()
        pred = group_predict(logits, groups)[0] if groups is not None else logits.argmax(1)
        correct += int((pred.cpu() == y).sum())
        total += y.numel()
    model.train(was)
    return correct / max(total, 1)
