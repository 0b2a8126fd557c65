"""The evaluator's passes through the model: the batched forward pass that fills the cache (logits and
features), and the gradient pass of the scorers that perturb their input (ODIN, Mahalanobis with
eps > 0), both sharded rank-strided under torchrun."""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np
import torch

from ..runtime import Runtime
from ..scores import model_outputs
from .images import ImageDataset

__all__ = ["autocast", "extract", "perturbed_scores"]


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def extract(model, dataset, indices, *, batch_size, workers, device, precision, channels_last, desc, progress):
    """Run the backbone over dataset[indices]: (logits fp16, features fp16, ok, seconds, images)."""
    sub = torch.utils.data.Subset(dataset, list(indices))
    loader = torch.utils.data.DataLoader(
        sub,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    n = len(sub)
    logits = feats = None  # host buffers, allocated once the widths are known
    oks = np.zeros(n, bool)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr)
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    lo = 0
    with torch.no_grad():
        for x, _, ok in loader:
            x = x.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                z, f = model_outputs(model, x)
            if logits is None:
                logits = torch.empty((n, z.shape[1]), dtype=torch.float16, pin_memory=cuda)
                feats = torch.empty((n, f.shape[1]), dtype=torch.float16, pin_memory=cuda)
            hi = lo + len(ok)
            # Asynchronous copies into pinned memory on a GPU: no sync per batch, so loading,
            # the backbone and the copies overlap.
            logits[lo:hi].copy_(z.to(torch.float16), non_blocking=cuda)
            feats[lo:hi].copy_(f.to(torch.float16), non_blocking=cuda)
            oks[lo:hi] = ok.numpy()
            lo = hi
            if bar is not None:
                bar.update(len(ok))
                el = time.perf_counter() - t0
                bar.set_postfix_str(f"{bar.n / el:.0f} img/s" if el > 0 else "")
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if logits is None:
        return None, None, oks, seconds, 0
    return logits.numpy(), feats.numpy(), oks, seconds, n


def perturbed_scores(model, images, scorer, rt: Runtime, opts, transform, shape, desc):
    """Scores of a scorer that needs inputs + model (a gradient per batch), sharded over ranks;
    the full [N] float32 array on rank 0 (None elsewhere). Rows of unreadable images are 0."""
    dev = opts["device"]
    dataset = ImageDataset(images, transform[0], shape, transform[1])
    sub = torch.utils.data.Subset(dataset, list(range(rt.rank, len(images), rt.world)))
    loader = torch.utils.data.DataLoader(
        sub, batch_size=opts["batch_size"], shuffle=False, num_workers=opts["workers"], pin_memory=dev.type == "cuda"
    )
    out = np.zeros(len(sub), np.float32)
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # gradients w.r.t. the input only
        p.requires_grad_(False)
    bar = None
    if opts["progress"]:
        from tqdm import tqdm

        bar = tqdm(total=len(sub), desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr)
    try:
        lo = 0
        for x, _, ok in loader:
            x = x.to(dev, non_blocking=True)
            if opts["channels_last"] and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(dev, opts["precision"]):
                sc = scorer.score(inputs=x, model=model)
            out[lo : lo + len(ok)] = sc.float().cpu().numpy()
            lo += len(ok)
            if bar is not None:
                bar.update(len(ok))
    finally:
        for p, r in zip(model.parameters(), grads):
            p.requires_grad_(r)
        if bar is not None:
            bar.close()
    if rt.world > 1:
        return rt.gather_strided_rows(len(images), [out])[0]
    return out
