"""What the trainer feeds its model: the data loader (a DataLoader, or whole in-memory batches),
inputs moved to the device, the frozen backbone's features (for groupings and the feature cache,
sharded over ranks), and the training batches the step loop reads: the image pipeline, or the
feature cache that trains the head alone on precomputed features."""

from __future__ import annotations

import math
import os
import time

import torch

from .data import KeyedDataset, StepBatchSampler, TensorData, tensor_batch
from .state import Run

__all__ = ["loader", "ListSampler", "auto_workers", "to_input", "features", "sharded_features", "training_batches"]


def loader(dataset, batch_sampler, workers, device):
    """Batches of `dataset` in `batch_sampler`'s order: in-memory tensors without workers are built
    whole in this process; anything else goes through a DataLoader."""
    if workers == 0 and isinstance(dataset.data, TensorData):
        # in-memory tensors in this process: build whole batches at once, no per-item calls
        return (tensor_batch(dataset.data, dataset.transform, dataset.seed, keys) for keys in batch_sampler)
    kw = {}
    if workers > 0:
        kw.update(prefetch_factor=4, persistent_workers=False)
    # generator=: the loader draws its worker base seed from its own generator, not the global RNG
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
        **kw,
    )


def auto_workers(cfg, rt) -> int:
    """cfg.workers, or (when negative) one less than this process's share of the CPUs, at most 12."""
    if cfg.workers >= 0:
        return cfg.workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", rt.world)))
    return max(0, min(12, per - 1))


class ListSampler(torch.utils.data.Sampler):
    """Batches of `batch` consecutive keys of a list, in order."""

    def __init__(self, keys, batch):
        self.keys, self.batch = keys, batch

    def __iter__(self):
        for i in range(0, len(self.keys), self.batch):
            yield self.keys[i : i + self.batch]

    def __len__(self):
        return math.ceil(len(self.keys) / self.batch)


def to_input(x, rt, non_blocking=True):
    """x on the runtime's device, 4-d images in channels_last when the runtime asks for it."""
    x = x.to(rt.device, non_blocking=non_blocking)
    if rt.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def features(backbone, data, transform, keys, rt, batch, workers, seed):
    """[len(keys), D] float32 backbone features (eval mode) of the (index, view) keys, on the CPU."""
    was = backbone.training
    backbone.eval()
    out = []
    for x, _ in loader(KeyedDataset(data, transform, seed), ListSampler(keys, batch), workers, rt.device):
        x = to_input(x, rt)
        with rt.autocast():
            f = backbone(x).flatten(1)
        out.append(f.float().cpu())
    backbone.train(was)
    return torch.cat(out)


def sharded_features(backbone, data, transform, keys, rt, batch, workers, seed):
    """Features of all keys, each process computing its rank-strided share and all-gathering the rest."""
    if rt.world == 1:
        return features(backbone, data, transform, keys, rt, batch, workers, seed)
    mine = keys[rt.rank :: rt.world]
    f = features(backbone, data, transform, mine, rt, batch, workers, seed) if mine else None
    return rt.all_gather_strided_rows(len(keys), f)


def training_batches(run: Run, sampler: StepBatchSampler, start_step: int):
    """(the (x, y) micro-batches from start_step on, the module they train, cache seconds or None).

    The image pipeline trains the whole model. With cfg.cache_features the frozen backbone runs
    once over cfg.cache_views augmented views of every sample (or the plain eval view), sharded
    over ranks, and the head trains on the cached features: epoch e reads view e % views."""
    cfg, rt, data = run.cfg, run.rt, run.data
    if not cfg.cache_features:

        def batches():
            yield from loader(KeyedDataset(data, run.train_tf, cfg.seed), sampler, run.workers, rt.device)

        return batches(), run.model, None

    t0 = time.perf_counter()
    views = max(1, cfg.cache_views)
    tf = run.train_tf if cfg.cache_views > 0 else run.eval_tf
    keys = [(i, v) for v in range(views) for i in range(len(data))]
    feats = sharded_features(run.backbone, data, tf, keys, rt, run.micro, run.workers, cfg.seed)
    feats = feats.view(views, len(data), -1).to(rt.device)
    targets = torch.as_tensor(data.targets, device=rt.device)
    cache_seconds = time.perf_counter() - t0
    run.say(f"feature cache: {views} view(s) x {len(data)} samples x {feats.shape[-1]} in {cache_seconds:.1f}s")

    def cached():
        for step in range(start_step, cfg.steps):
            epoch, lists = sampler.step_indices(step)
            for idx in lists:
                i = torch.tensor(idx)
                i = i.pin_memory().to(rt.device, non_blocking=True) if rt.device.type == "cuda" else i
                # epoch e reads augmented view e % V of every sample (the cache cycles)
                yield feats[epoch % views].index_select(0, i), targets.index_select(0, i)

    return cached(), run.model.head, cache_seconds
