"""The evaluator's cache: one backbone pass per image set, its logits and features stored on disk in
fp16 (memory-mapped on reads), keyed by the model's weights, the image list and the transform, so
asking for other scores or hyperparameters never reruns the backbone."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..runtime import Runtime
from .backbone import extract
from .images import ImageDataset, ImageList

__all__ = ["CACHE_FORMAT", "Cached", "cache_set", "load_cache", "model_fingerprint", "data_fingerprint",
           "save_npy", "safe_name"]

CACHE_FORMAT = "mosx.evalcache/1"


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        # reshape(-1): 0-dim buffers (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_fingerprint(images: ImageList, transform_key: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(transform_key.encode())
    if images.dataset is not None:
        ds = images.dataset
        held = [getattr(ds, "images", None)] if isinstance(getattr(ds, "images", None), torch.Tensor) else \
            list(ds.tensors) if isinstance(ds, torch.utils.data.TensorDataset) else None
        h.update(f"{type(ds).__name__}:{len(ds)}:{images.labels}".encode())
        if held is not None:  # in-memory tensors: hash their bytes
            for t in held:
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:  # anything else: hash every item (no backbone involved, but it reads all data)
            loader = ImageDataset(images, lambda im: torch.as_tensor(np.asarray(im)), (1,))
            for i in range(len(loader)):
                x, _, ok = loader[i]
                h.update(x.contiguous().view(torch.uint8).numpy().tobytes() if ok else b"?")
        return h.hexdigest()
    for p in images.paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


@dataclass
class Cached:
    logits: np.ndarray  # [N, L] fp16 (memory-mapped)
    features: np.ndarray  # [N, D] fp16
    ok: np.ndarray  # [N] bool: the image was read
    labels: np.ndarray  # [N] int64, -1 unknown
    meta: dict
    path: str


def load_cache(path: str) -> Optional[Cached]:
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != CACHE_FORMAT:
        return None
    load = lambda n: np.load(os.path.join(path, n), mmap_mode="r")  # noqa: E731
    return Cached(load("logits.npy"), load("features.npy"), np.load(os.path.join(path, "ok.npy")),
                   np.load(os.path.join(path, "labels.npy")), meta, path)


def save_npy(path, arr):
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def cache_set(model, images: ImageList, transform, transform_key, shape, cache_root, fingerprint, rt: Runtime,
               opts, tensor_transform=None) -> tuple:
    """Cached (logits, features) of one image set, computing them (sharded over ranks) if needed.
    Returns (cache on rank 0 / None elsewhere, backbone seconds, images this rank ran)."""
    key = hashlib.blake2b(f"{fingerprint}|{data_fingerprint(images, transform_key)}|{opts['precision']}".encode(),
                          digest_size=8).hexdigest()
    path = os.path.join(cache_root, f"{safe_name(images.name)}-{key}")
    cached = load_cache(path) if rt.main else None
    exists = cached is not None
    if rt.world > 1:  # rank 0's cache decides (no shared file system needed)
        t = torch.tensor([int(exists)], device=rt.collective_device)
        torch.distributed.broadcast(t, 0)
        exists = bool(t.item())
    if exists:
        return cached, 0.0, 0
    if rt.main:
        os.makedirs(path, exist_ok=True)
    dataset = ImageDataset(images, transform, shape, tensor_transform)
    n = len(images)
    idx = range(rt.rank, n, rt.world)
    z, f, ok, seconds, count = extract(model, dataset, idx, desc=f"{images.name}" + (f" [rank {rt.rank}]" if rt.world > 1 else ""),
                                        **{k: opts[k] for k in ("batch_size", "workers", "device", "precision", "channels_last", "progress")})
    if rt.world > 1:
        z, f, ok = rt.gather_strided_rows(n, [z, f, ok])
    if rt.main:
        save_npy(os.path.join(path, "logits.npy"), z)
        save_npy(os.path.join(path, "features.npy"), f)
        save_npy(os.path.join(path, "ok.npy"), ok)
        save_npy(os.path.join(path, "labels.npy"), np.asarray(images.labels, dtype=np.int64))
        meta = {"format": CACHE_FORMAT, "name": images.name, "source": images.source, "num_images": n,
                "unreadable": [images.item_name(int(i)) for i in np.flatnonzero(~ok)], "model": fingerprint,
                "transform": transform_key, "precision": opts["precision"], "world": rt.world,
                "backbone_seconds": seconds}
        with open(os.path.join(path, "meta.json.tmp"), "w") as fh:
            json.dump(meta, fh, indent=1)
        os.replace(os.path.join(path, "meta.json.tmp"), os.path.join(path, "meta.json"))
    rt.barrier()
    return (load_cache(path) if rt.main else None), seconds, count


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "set"
