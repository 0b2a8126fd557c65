"""The training loop: one process or DistributedDataParallel (torchrun), gradient accumulation,
bf16 autocast, optional frozen-backbone feature cache, Unleashing Mask options, atomic checkpoints
and exact resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import atomic_save, rng_state, set_rng_state
from .config import TrainConfig, validate
from .data import (DatasetData, KeyedDataset, RecipeTransform, StepBatchSampler, TensorData, open_data, seed_mix,
                   tensor_batch)
from .grouping import resolve_groups
from .mixup import Mixup, mix_inputs
from .models import Classifier, build_backbone, load_backbone_weights, save_model, set_trainable, train_mode
from .schedule import StepSchedule

__all__ = ["train", "TrainResult", "make_loss"]

CKPT_FORMAT = "mosx.checkpoint/1"


@dataclass
class TrainResult:
    out: str
    steps: int                      # optimizer steps completed
    losses: list = field(default_factory=list)   # (step, mean training loss over the log window), rank 0
    final_loss: float | None = None
    val_accuracy: float | None = None
    seconds: float = 0.0            # wall time of the step loop in this process
    images_per_s: float | None = None
    cache_seconds: float | None = None   # feature extraction time (feature-cache mode)
    flood_level: float | None = None
    groups: object = None
    model_path: str | None = None
    resumed_from: int | None = None
    model: object = None            # the trained Classifier (masks folded), on the training device


# ---------------------------------------------------------------------- runtime
class _Runtime:
    def __init__(self, cfg: TrainConfig):
        want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.own_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if want_cuda else "gloo")
            self.own_group = True
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            self.device = torch.device(cfg.device if ":" in cfg.device else f"cuda:{local}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu" if cfg.device == "auto" else cfg.device)
        cuda = self.device.type == "cuda"
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and cuda)
        self.channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
        self.fused = cfg.fused == "on" or (cfg.fused == "auto" and cuda)
        self.main = self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.own_group and dist.is_initialized():
            dist.destroy_process_group()


def make_loss(kind: str, groups=None):
    """loss(logits, y, lam, perm): the group-softmax or flat cross-entropy, mixup included."""
    if kind == "group":
        from ..ops import group_cross_entropy

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


class _AsyncLog:
    """Losses accumulate on the device; every log_every steps their sum is copied to pinned host
    memory without waiting, and read once the copy has finished: no host-device sync in the loop."""

    def __init__(self, device, sink):
        self.cuda = device.type == "cuda"
        self.pending, self.sink = [], sink

    def push(self, step, loss_sum, count, lr, images, seconds):
        value = loss_sum.detach() / count
        if self.cuda:
            host = torch.empty((), dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
        else:
            host, ev = value, None
        self.pending.append((step, host, ev, lr, images, seconds))
        self.poll()

    def poll(self, block=False):
        while self.pending:
            step, host, ev, lr, images, seconds = self.pending[0]
            if ev is not None and not ev.query():
                if not block:
                    return
                ev.synchronize()
            self.pending.pop(0)
            self.sink(step, float(host), lr, images / max(seconds, 1e-9))


# ---------------------------------------------------------------------- helpers
def _seed_all(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)


def _loader(dataset, batch_sampler, workers, device):
    if workers == 0 and isinstance(dataset.data, TensorData):
        # in-memory tensors in this process: build whole batches at once, no per-item calls
        return (tensor_batch(dataset.data, dataset.transform, dataset.seed, keys) for keys in batch_sampler)
    kw = {}
    if workers > 0:
        kw.update(prefetch_factor=4, persistent_workers=False)
    # generator=: the loader draws its worker base seed from its own generator, not the global RNG
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda", generator=torch.Generator(), **kw)


def _auto_workers(cfg, rt):
    if cfg.workers >= 0:
        return cfg.workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", rt.world)))
    return max(0, min(12, per - 1))


class _ListSampler(torch.utils.data.Sampler):
    def __init__(self, keys, batch):
        self.keys, self.batch = keys, batch

    def __iter__(self):
        for i in range(0, len(self.keys), self.batch):
            yield self.keys[i:i + self.batch]

    def __len__(self):
        return math.ceil(len(self.keys) / self.batch)


@torch.no_grad()
def _features(backbone, data, transform, keys, rt, batch, workers, seed):
    """[len(keys), D] float32 backbone features (eval mode) of the (index, view) keys, on the CPU."""
    was = backbone.training
    backbone.eval()
    out = []
    for x, _ in _loader(KeyedDataset(data, transform, seed), _ListSampler(keys, batch), workers, rt.device):
        x = x.to(rt.device, non_blocking=True)
        if rt.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            f = backbone(x).flatten(1)
        out.append(f.float().cpu())
    backbone.train(was)
    return torch.cat(out)


def _sharded_features(backbone, data, transform, keys, rt, batch, workers, seed):
    """Features of all keys, each process computing a 1/world share and all-gathering the rest."""
    if rt.world == 1:
        return _features(backbone, data, transform, keys, rt, batch, workers, seed)
    mine = keys[rt.rank::rt.world]
    f = _features(backbone, data, transform, mine, rt, batch, workers, seed) if mine else None
    per = math.ceil(len(keys) / rt.world)
    dim = torch.tensor([f.shape[1] if f is not None else 0], device=rt.device)
    dist.all_reduce(dim, op=dist.ReduceOp.MAX)
    buf = torch.zeros(per, int(dim), device=rt.device)
    if f is not None:
        buf[:f.shape[0]] = f.to(rt.device)
    parts = [torch.empty_like(buf) for _ in range(rt.world)]
    dist.all_gather(parts, buf)
    full = torch.empty(len(keys), int(dim))
    for r, p in enumerate(parts):
        n = len(keys[r::rt.world])
        full[r::rt.world] = p[:n].cpu()
    return full


def _in_chans(data) -> int:
    """Image channels of the data: tensors say it; files are decoded to RGB."""
    if isinstance(data, TensorData):
        return 3 if data.is_features else int(data.x.shape[1])
    if isinstance(data, DatasetData):
        img = data.load(0)[0]
        return int(img.shape[0]) if isinstance(img, torch.Tensor) and img.dim() == 3 else 3
    return 3


def _load_init(model: Classifier, path: str):
    d = torch.load(path, map_location="cpu", weights_only=False)
    state = d.get("state_dict") if d.get("format") == "mosx.model/1" else d.get("model", d)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"--init {path}: does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def _unwrap(m):
    return m.module if hasattr(m, "module") else m


# ---------------------------------------------------------------------- the entry point
def train(cfg: TrainConfig, data=None, val_data=None, groups=None, log=None) -> TrainResult:
    """Train a grouped (MOS) or flat classifier with the settings of `cfg`.

    data / val_data override cfg.data / cfg.val_data and may be paths, (x, y) tensors, dicts or
    TensorDatasets; groups overrides cfg.groups (a mosx.Groups, a sizes list or a spec string).
    Run under torchrun for DistributedDataParallel. Returns a TrainResult (losses on rank 0).
    """
    validate(cfg)
    rt = _Runtime(cfg)
    try:
        return _train(cfg, rt, data, val_data, groups, log)
    finally:
        rt.close()


def _train(cfg, rt, data, val_data, groups, log):
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    say = say if rt.main else (lambda msg: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    _seed_all(cfg.seed)  # the same random initialisation in every process
    out = cfg.out
    if rt.main:
        os.makedirs(out, exist_ok=True)

    # ---- data and model
    tdata = open_data(data if data is not None else cfg.data, cfg.data_root)
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
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of world size {rt.world} x micro_batch {micro}")
    accum = cfg.batch_size // (rt.world * micro)
    workers = _auto_workers(cfg, rt)

    def features_fn(indices):
        return _features(backbone, tdata, eval_tf, [(i, 0) for i in indices], rt, micro, workers, cfg.seed)

    if cfg.loss == "group":
        g_spec = groups if groups is not None else cfg.groups
        groups = resolve_groups(g_spec, tdata, features_fn if cfg.model != "identity" else
                                (lambda idx: tdata.x[idx].float()), cfg.seed)
        num_outputs = groups.num_logits
        if rt.main:
            groups.save(os.path.join(out, "groups.json"))
    else:
        groups = None
        num_outputs = tdata.num_classes
    model = Classifier(backbone, dim, num_outputs, head_init=cfg.head_init).to(rt.device)
    if cfg.init:
        _load_init(model, cfg.init)
    set_trainable(model, cfg.train_blocks)
    if cfg.umap_keep is not None:
        from .. import unleash
        masked = unleash.apply_masks(model, cfg.umap_keep, train_weights=cfg.umap_train_weights)
        say(f"UMAP: learned masks keeping {cfg.umap_keep} of {len(masked)} layers")
        model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    _seed_all(seed_mix(cfg.seed, rt.rank))  # from here on, each process its own stream
    loss_fn = make_loss(cfg.loss, groups)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    opt_kw = {"fused": True} if rt.fused else {}
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **opt_kw)
    sched = StepSchedule(optimizer, cfg.lr, cfg.warmup_steps, cfg.milestones, cfg.lr_decay)
    mixup = Mixup(cfg.mixup_alpha, seed=seed_mix(cfg.seed, 0x61))

    # ---- resume
    ckpt_path = os.path.join(out, "checkpoint.pt")
    start_step, history, resumed, flood_b = 0, [], None, cfg.um_flood_level
    if cfg.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck.get("format") != CKPT_FORMAT:
            raise ValueError(f"{ckpt_path}: not a mosx checkpoint")
        if ck["world"] != rt.world or ck["batch"] != [cfg.batch_size, micro]:
            say(f"resume: checkpoint of world {ck['world']} batch {ck['batch']}, now world {rt.world} "
                f"batch {[cfg.batch_size, micro]}: the data order continues, RNG streams are not exact")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        mixup.load_state_dict(ck["mixup"])
        rngs = ck["rng"]
        set_rng_state(rngs[rt.rank] if rt.rank < len(rngs) else rngs[0])
        start_step, history, flood_b = ck["step"], list(ck["losses"]), ck.get("flood_level", flood_b)
        resumed = start_step
        say(f"resumed from {ckpt_path} at step {start_step}")
    elif cfg.resume:
        say(f"resume: no checkpoint at {ckpt_path}, starting from step 0")

    # ---- Unleashing Mask: the flooding level
    if cfg.um_estimate is not None and resumed is None:
        from .. import unleash
        est_sampler = StepBatchSampler(len(tdata), micro * rt.world, micro, rt.world, rt.rank, cfg.seed,
                                       steps=len(tdata) // (micro * rt.world))
        est_loader = _loader(KeyedDataset(tdata, train_tf, cfg.seed), est_sampler, workers, rt.device)

        def est_batches():
            for x, y in est_loader:
                x = x.to(rt.device)
                yield (x.contiguous(memory_format=torch.channels_last) if rt.channels_last and x.dim() == 4 else x,
                       y.to(rt.device))

        with rt.autocast():
            flood_b = unleash.estimate_flood_level(model, est_batches(), lambda logits, y: loss_fn(logits, y),
                                                   keep=cfg.um_estimate, seed=cfg.seed)
        if rt.world > 1:  # one b for all processes: the mean of their estimates
            t = torch.tensor([flood_b], device=rt.device, dtype=torch.float64)
            dist.all_reduce(t)
            flood_b = float(t) / rt.world
        say(f"Unleashing Mask: estimated flooding level b = {flood_b:.6f} (keep {cfg.um_estimate})")
        if rt.main:
            with open(os.path.join(out, "flood_level.json"), "w") as f:
                json.dump({"flood_level": flood_b, "keep": cfg.um_estimate, "loss": cfg.loss}, f)
        if cfg.um_estimate_only:
            return TrainResult(out=out, steps=0, flood_level=flood_b, groups=groups)
    flood = None
    if flood_b is not None:
        from ..unleash import flood

    # ---- batches: the image pipeline, or the frozen backbone's feature cache
    sampler = StepBatchSampler(len(tdata), cfg.batch_size, micro, rt.world, rt.rank, cfg.seed,
                               steps=cfg.steps, start_step=start_step)
    cache_seconds = None
    if cfg.cache_features:
        t0 = time.perf_counter()
        views = max(1, cfg.cache_views)
        tf = train_tf if cfg.cache_views > 0 else eval_tf
        keys = [(i, v) for v in range(views) for i in range(len(tdata))]
        feats = _sharded_features(backbone, tdata, tf, keys, rt, micro, workers, cfg.seed)
        feats = feats.view(views, len(tdata), -1).to(rt.device)
        targets = torch.as_tensor(tdata.targets, device=rt.device)
        cache_seconds = time.perf_counter() - t0
        say(f"feature cache: {views} view(s) x {len(tdata)} samples x {feats.shape[-1]} in {cache_seconds:.1f}s")

        def batches():
            for step in range(start_step, cfg.steps):
                epoch, lists = sampler.step_indices(step)
                for idx in lists:
                    i = torch.tensor(idx)
                    i = i.pin_memory().to(rt.device, non_blocking=True) if rt.device.type == "cuda" else i
                    # epoch e reads augmented view e % V of every sample (the cache cycles)
                    yield feats[epoch % views].index_select(0, i), targets.index_select(0, i)
        net = model.head
    else:
        def batches():
            yield from _loader(KeyedDataset(tdata, train_tf, cfg.seed), sampler, workers, rt.device)
        net = model
    ddp = None
    if rt.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        net = ddp
    if cfg.compile:
        net = torch.compile(net)

    # ---- the loop
    logf = None
    if rt.main:  # a fresh run starts the log; a resumed one drops what the killed run logged after its checkpoint
        log_path = os.path.join(out, "log.jsonl")
        kept = []
        if start_step > 0 and os.path.exists(log_path):
            with open(log_path) as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= start_step]
        logf = open(log_path, "w")
        logf.writelines(kept)
    bar = None
    if rt.main and cfg.progress and cfg.steps > start_step:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   mininterval=1.0)

    def sink(step, loss, lr, ips):
        history.append((step, loss))
        if logf:
            logf.write(json.dumps({"step": step, "loss": loss, "lr": lr, "images_per_s": ips}) + "\n")
            logf.flush()
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}", lr=f"{lr:.2e}")

    meter = _AsyncLog(rt.device, sink)
    loss_sum = torch.zeros((), device=rt.device)
    window_count, window_images, window_t = 0, 0, time.perf_counter()
    if cfg.cache_features:
        train_mode(model)
        model.backbone.eval()
    else:
        train_mode(model)
    it = iter(batches())
    t_loop = time.perf_counter()
    step = start_step

    def save_checkpoint(done_steps):
        rngs = [rng_state()]
        if rt.world > 1:
            rngs = [None] * rt.world
            dist.all_gather_object(rngs, rng_state())
        meter.poll(block=True)
        if rt.main:
            atomic_save({"format": CKPT_FORMAT, "step": done_steps, "model": _unwrap(model).state_dict(),
                         "optimizer": optimizer.state_dict(), "mixup": mixup.state_dict(), "rng": rngs,
                         "losses": list(history), "flood_level": flood_b, "world": rt.world,
                         "batch": [cfg.batch_size, micro], "config": cfg.to_dict(),
                         "groups": None if groups is None else list(groups.class_to_group)}, ckpt_path)
        rt.barrier()

    for step in range(start_step, cfg.steps):
        lr = sched.apply(step)
        lam, perm = mixup.draw(micro)
        if perm is not None and rt.device.type == "cuda":  # one small async copy per step
            perm = perm.pin_memory().to(rt.device, non_blocking=True)
        for a in range(accum):
            x, y = next(it)
            x = x.to(rt.device, non_blocking=True)
            y = y.to(rt.device, non_blocking=True)
            if rt.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            x = mix_inputs(x, lam, perm)
            sync = contextlib.nullcontext() if ddp is None or a == accum - 1 else ddp.no_sync()
            with sync:
                with rt.autocast():
                    logits = net(x)
                loss = loss_fn(logits, y, lam, perm)
                if flood is not None:
                    loss = flood(loss, flood_b)
                (loss / accum if accum > 1 else loss).backward()
            loss_sum += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_count += accum
        window_images += accum * micro * rt.world
        if cfg.step_sleep:
            time.sleep(cfg.step_sleep)
        done = step + 1
        if bar is not None:
            bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            now = time.perf_counter()
            meter.push(done, loss_sum, window_count, lr, window_images, now - window_t)
            loss_sum = torch.zeros((), device=rt.device)
            window_count, window_images, window_t = 0, 0, now
        if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.steps:
            save_checkpoint(done)
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    seconds = time.perf_counter() - t_loop
    meter.poll(block=True)
    if bar is not None:
        bar.close()
    steps_run = cfg.steps - start_step
    ips = steps_run * cfg.batch_size / seconds if steps_run > 0 and seconds > 0 else None

    # ---- the end: checkpoint, deployable model (UMAP masks folded), accuracy
    if cfg.steps > start_step or not os.path.exists(ckpt_path):
        save_checkpoint(cfg.steps)
    model_path = os.path.join(out, "model.pt")
    if cfg.umap_keep is not None:
        from .. import unleash
        unleash.fold_masks(model)
    if rt.main:
        save_model(model_path, model, arch=cfg.model, num_features=dim, groups=groups, loss=cfg.loss,
                   class_names=tdata.class_names, in_chans=in_chans, extra={"config": cfg.to_dict(), "flood_level": flood_b})
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    if logf:
        logf.close()
    val_acc = None
    vd = val_data if val_data is not None else cfg.val_data
    if vd is not None and rt.main:
        val_acc = accuracy(model, open_data(vd, cfg.data_root), eval_tf, groups, rt, micro, workers)
        say(f"validation top-1 accuracy {val_acc:.4f}")
    rt.barrier()
    final = history[-1][1] if history else None
    if ips:
        say(f"{steps_run} steps in {seconds:.1f}s ({ips:.1f} images/s), final loss {final}")
    return TrainResult(out=out, steps=cfg.steps, losses=history, final_loss=final, val_accuracy=val_acc,
                       seconds=seconds, images_per_s=ips, cache_seconds=cache_seconds, flood_level=flood_b,
                       groups=groups, model_path=model_path, resumed_from=resumed, model=model)


@torch.no_grad()
def accuracy(model, data, transform, groups, rt, batch, workers) -> float:
    """Top-1 accuracy: group_predict's global class ids for the grouped model, argmax for flat."""
    from ..ops import group_predict
    was = model.training
    model.eval()
    correct = total = 0
    keys = [(i, 0) for i in range(len(data))]
    for x, y in _loader(KeyedDataset(data, transform, 0), _ListSampler(keys, batch), workers, rt.device):
        x = x.to(rt.device)
        if rt.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            logits = model(x).float()
        pred = group_predict(logits, groups)[0] if groups is not None else logits.argmax(1)
        correct += int((pred.cpu() == y).sum())
        total += y.numel()
    model.train(was)
    return correct / max(total, 1)
