"""`train(cfg)`: a training run as named stages, read top-down in `_train`:

1. `_setup` (here): the process settings, the data, the backbone, the grouping, the classifier
   (UMAP masks applied), the loss, the optimizer, the schedule and mixup, held in a `Run`;
2. `resume.restore`: the checkpoint's progress when resuming (mosx/train/resume.py);
3. `flood_level.estimate`: Unleashing Mask's flooding level b (mosx/train/flood_level.py);
4. `features.training_batches`: the image pipeline, or the frozen backbone's feature cache
   (mosx/train/features.py), then DDP (torchrun) and torch.compile wrap what trains;
5. `steps.run_steps`: the step loop, with gradient accumulation, bf16 autocast, the loss log
   (mosx/train/log.py) and periodic checkpoints (mosx/train/steps.py);
6. `save.finish`: the final checkpoint, the deployable model, the validation accuracy
   (mosx/train/save.py).

The distributed runtime (rank, world, device, process group) is mosx.runtime.Runtime.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .._io import output_lock
from ..masking import apply_masks
from ..models.files import read_file
from ..ops import group_cross_entropy
from ..runtime import Runtime
from . import flood_level, resume, save, steps
from .config import TrainConfig, validate
from .data import DatasetData, RecipeTransform, StepBatchSampler, TensorData, open_data, seed_mix
from .features import auto_workers, features, training_batches
from .grouping import resolve_groups
from .log import TrainLog
from .mixup import Mixup
from .models import Classifier, build_backbone, load_backbone_weights, set_trainable
from .schedule import StepSchedule
from .state import Run

__all__ = ["train", "TrainResult", "make_loss"]

CKPT_FORMAT = resume.CKPT_FORMAT


@dataclass
class TrainResult:
    out: str
    steps: int  # optimizer steps completed
    losses: list = field(default_factory=list)  # (step, mean training loss over the log window), rank 0
    final_loss: float | None = None
    val_accuracy: float | None = None
    seconds: float = 0.0  # wall time of the step loop in this process
    images_per_s: float | None = None
    cache_seconds: float | None = None  # feature extraction time (feature-cache mode)
    flood_level: float | None = None
    groups: object = None
    model_path: str | None = None
    resumed_from: int | None = None
    model: object = None  # the trained Classifier (masks folded), on the training device


def make_loss(kind: str, groups=None):
    """loss(logits, y, lam, perm): the group-softmax or flat cross-entropy, mixup included."""
    if kind == "group":

        def loss(logits, y, lam=1.0, perm=None):
            logits = logits.float()
            if perm is None:
                return group_cross_entropy(logits, y, groups)
            return group_cross_entropy(logits, y, groups, mix_targets=y[perm.to(y.device)], mix_lambda=lam)
    else:

        def loss(logits, y, lam=1.0, perm=None):
            logits = logits.float()
            if perm is None:
                return F.cross_entropy(logits, y)
            return lam * F.cross_entropy(logits, y) + (1.0 - lam) * F.cross_entropy(logits, y[perm.to(y.device)])

    return loss


# ---------------------------------------------------------------------- the entry point
def train(cfg: TrainConfig, data=None, val_data=None, groups=None, log=None, every=None) -> TrainResult:
    """Train a grouped (MOS) or flat classifier with the settings of `cfg`.

    data / val_data override cfg.data / cfg.val_data and may be paths, (x, y) tensors, dicts or
    TensorDatasets; groups overrides cfg.groups (a mosx.Groups, a sizes list or a spec string).
    every: (n, fn) calls fn(step, model) after every n-th optimizer step and after the last one (on
    every rank; the model is in eval mode during the call, for validation curves).
    Run under torchrun for DistributedDataParallel. Returns a TrainResult (losses on rank 0).
    """
    validate(cfg)
    if every is not None:
        n, fn = every
        if not (isinstance(n, int) and n >= 1 and callable(fn)):
            raise ValueError(f"every must be (steps >= 1, callable), got {every!r}")
    rt = Runtime.setup(cfg.device, amp=cfg.amp, channels_last=cfg.channels_last, fused=cfg.fused)
    try:
        # one job per output folder: a second run started on cfg.out stops before it writes anything
        with output_lock(cfg.out, "training run") if rt.main else contextlib.nullcontext():
            return _train(cfg, rt, data, val_data, groups, log, every)
    finally:
        rt.close()


def _train(cfg, rt, data, val_data, groups, log, every=None):
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    run = _setup(cfg, rt, data, groups, say if rt.main else (lambda msg: None))
    progress = resume.restore(run)
    if cfg.um_estimate is not None and progress.resumed_from is None:
        progress.flood_level = flood_level.estimate(run)
        if cfg.um_estimate_only:
            return TrainResult(out=cfg.out, steps=0, flood_level=progress.flood_level, groups=run.groups)

    sampler = StepBatchSampler(
        len(run.data),
        cfg.batch_size,
        run.micro,
        rt.world,
        rt.rank,
        cfg.seed,
        steps=cfg.steps,
        start_step=progress.start_step,
    )
    batches, net, cache_seconds = training_batches(run, sampler, progress.start_step)
    ddp = None
    if rt.world > 1:
        ddp = net = DistributedDataParallel(net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    train_log = TrainLog(run, progress)
    seconds = steps.run_steps(run, progress, train_log, batches, net, ddp, every)
    train_log.flush()
    train_log.close_bar()
    steps_run = cfg.steps - progress.start_step
    ips = steps_run * cfg.batch_size / seconds if steps_run > 0 and seconds > 0 else None

    model_path, val_acc = save.finish(run, progress, train_log, val_data)
    history = progress.losses
    final = history[-1][1] if history else None
    if ips:
        run.say(f"{steps_run} steps in {seconds:.1f}s ({ips:.1f} images/s), final loss {final}")
    return TrainResult(
        out=cfg.out,
        steps=cfg.steps,
        losses=history,
        final_loss=final,
        val_accuracy=val_acc,
        seconds=seconds,
        images_per_s=ips,
        cache_seconds=cache_seconds,
        flood_level=progress.flood_level,
        groups=run.groups,
        model_path=model_path,
        resumed_from=progress.resumed_from,
        model=run.model,
    )


# ---------------------------------------------------------------------- stage 1: setup
def _seed_all(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)


def _in_chans(data) -> int:
    """Image channels of the data: tensors say it; files are decoded to RGB."""
    if isinstance(data, TensorData):
        return 3 if data.is_features else int(data.x.shape[1])
    if isinstance(data, DatasetData):
        img = data.load(0)[0]
        return int(img.shape[0]) if isinstance(img, torch.Tensor) and img.dim() == 3 else 3
    return 3


def _load_init(model: Classifier, path: str, trust_pickle: bool = False):
    d = read_file(path, trust_pickle=trust_pickle)
    if not isinstance(d, dict):
        raise ValueError(f"--init {path}: expected a mosx model file or a state dict, got {type(d).__name__}")
    state = d.get("state_dict") if d.get("format") == "mosx.model/1" else d.get("model", d)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"--init {path}: does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def _setup(cfg, rt, data, groups, say) -> Run:
    """Everything fixed before the first step. Every process draws the same random initialisation;
    from the optimizer on, each process has its own random stream."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    _seed_all(cfg.seed)  # the same random initialisation in every process
    if rt.main:
        os.makedirs(cfg.out, exist_ok=True)

    # the data and the backbone
    tdata = open_data(data if data is not None else cfg.data, cfg.data_root, trust_pickle=cfg.trust_pickle)
    feat_dim = tdata.x.shape[1] if isinstance(tdata, TensorData) and tdata.is_features else None
    if feat_dim is not None and cfg.model != "identity":
        raise ValueError("the data are [N, D] feature vectors: use --model identity")
    in_chans = _in_chans(tdata)
    backbone, dim = build_backbone(cfg.model, feat_dim, in_chans)
    if cfg.weights:
        info = load_backbone_weights(backbone, cfg.weights)
        say(f"weights {cfg.weights}: {info['loaded']} tensors loaded, {len(info['missing'])} missing")
    backbone.to(rt.device)
    train_tf = RecipeTransform.from_config(cfg, train=True)
    eval_tf = RecipeTransform.from_config(cfg, train=False)
    micro = cfg.micro_batch or cfg.batch_size // rt.world
    if cfg.batch_size % (rt.world * micro):
        raise ValueError(
            f"batch_size {cfg.batch_size} is not a multiple of world size {rt.world} x micro_batch {micro}"
        )
    accum = cfg.batch_size // (rt.world * micro)
    workers = auto_workers(cfg, rt)

    # the grouping (data-driven groupings read the backbone's features) and the classifier
    if cfg.loss == "group":

        def features_fn(indices):
            return features(backbone, tdata, eval_tf, [(i, 0) for i in indices], rt, micro, workers, cfg.seed)

        groups = resolve_groups(
            groups if groups is not None else cfg.groups,
            tdata,
            features_fn if cfg.model != "identity" else (lambda idx: tdata.x[idx].float()),
            cfg.seed,
        )
        num_outputs = groups.num_logits
        if rt.main:
            groups.save(os.path.join(cfg.out, "groups.json"))
    else:
        groups = None
        num_outputs = tdata.num_classes
    model = Classifier(backbone, dim, num_outputs, head_init=cfg.head_init).to(rt.device)
    if cfg.init:
        _load_init(model, cfg.init, cfg.trust_pickle)
    set_trainable(model, cfg.train_blocks)
    if cfg.umap_keep is not None:
        masked = apply_masks(model, cfg.umap_keep, train_weights=cfg.umap_train_weights)
        say(f"UMAP: learned masks keeping {cfg.umap_keep} of {len(masked)} layers")
        model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)

    # the optimisation
    _seed_all(seed_mix(cfg.seed, rt.rank))  # from here on, each process its own stream
    loss_fn = make_loss(cfg.loss, groups)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    opt_kw = {"fused": True} if rt.fused else {}
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **opt_kw)
    sched = StepSchedule(optimizer, cfg.lr, cfg.warmup_steps, cfg.milestones, cfg.lr_decay)
    mixup = Mixup(cfg.mixup_alpha, seed=seed_mix(cfg.seed, 0x61))
    return Run(
        cfg=cfg,
        rt=rt,
        say=say,
        data=tdata,
        in_chans=in_chans,
        backbone=backbone,
        dim=dim,
        groups=groups,
        model=model,
        train_tf=train_tf,
        eval_tf=eval_tf,
        micro=micro,
        accum=accum,
        workers=workers,
        loss_fn=loss_fn,
        optimizer=optimizer,
        sched=sched,
        mixup=mixup,
    )
