"""The evaluator's cache: one backbone pass per image set, its logits and features stored on disk in
fp16 (memory-mapped on reads), keyed by the model's weights, the image list and the transform, so
asking for other scores or hyperparameters never reruns the backbone."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .._io import DiskFull, is_disk_full, temp_path
from ..runtime import Runtime
from .backbone import extract
from .images import ImageDataset, ImageList

__all__ = [
    "CACHE_FORMAT",
    "Cached",
    "cache_set",
    "load_cache",
    "model_fingerprint",
    "data_fingerprint",
    "save_npy",
    "safe_name",
]

CACHE_FORMAT = "mosx.evalcache/2"  # /2: labels in the key, array checksums in meta.json


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
        held = (
            [getattr(ds, "images", None)]
            if isinstance(getattr(ds, "images", None), torch.Tensor)
            else list(ds.tensors)
            if isinstance(ds, torch.utils.data.TensorDataset)
            else None
        )
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
    for p, label in zip(images.paths, images.labels):  # labels too: an edited list file is another set
        try:
            st = os.stat(p)
            h.update(f"{p}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0{label}\0missing\n".encode())
    return h.hexdigest()


@dataclass
class Cached:
    logits: np.ndarray  # [N, L] fp16 (memory-mapped)
    features: np.ndarray  # [N, D] fp16
    ok: np.ndarray  # [N] bool: the image was read
    labels: np.ndarray  # [N] int64, -1 unknown
    meta: dict
    path: str


_ARRAYS = ("logits", "features", "ok", "labels")


def _digest(arr: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data, digest_size=16).hexdigest()


def load_cache(path: str) -> Cached | None:
    """The cache in folder `path`, or None when there is none or it does not hold what its meta.json
    says (a truncated, overwritten or missing array: warned about by name, then recomputed)."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        warnings.warn(f"{meta_path}: unreadable ({e}); recomputing this set")
        return None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        return None
    arrays = {}
    for name in _ARRAYS:
        file = os.path.join(path, f"{name}.npy")
        want = meta.get("arrays", {}).get(name, {})
        try:
            a = np.load(file, mmap_mode="r" if name in ("logits", "features") else None, allow_pickle=False)
            problem = None
            if list(a.shape) != want.get("shape") or str(a.dtype) != want.get("dtype"):
                problem = f"holds {a.dtype}{list(a.shape)}, meta.json says {want.get('dtype')}{want.get('shape')}"
            elif _digest(a) != want.get("blake2b"):
                problem = "its contents changed since it was written (checksum mismatch)"
        except (OSError, ValueError, EOFError) as e:
            problem = f"unreadable ({e})"
        if problem is not None:
            warnings.warn(f"{file}: {problem}; recomputing this set")
            return None
        arrays[name] = a
    return Cached(arrays["logits"], arrays["features"], arrays["ok"], arrays["labels"], meta, path)


def save_npy(path: str, arr: np.ndarray) -> None:
    """np.save to a temporary file, fsync, check its size, then rename: a full disk raises (naming
    the file) and leaves neither a truncated array nor a temporary file behind."""
    tmp = temp_path(path, ".npy")
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
            expected, written = f.tell(), os.fstat(f.fileno()).st_size
        if written != expected:  # what a full disk does to np.save: a short write, no error
            raise OSError(errno.ENOSPC, f"wrote {written} of {expected} bytes")
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            msg = f"{path}: could not write the evaluation cache ({e})"
            raise (DiskFull(e.errno, msg) if is_disk_full(e) else OSError(msg)) from e
        raise


def _write_json(path: str, doc: dict) -> None:
    tmp = temp_path(path)  # per process: two evaluations into one folder never share it
    try:
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cache_set(
    model,
    images: ImageList,
    transform,
    transform_key,
    shape,
    cache_root,
    fingerprint,
    rt: Runtime,
    opts,
    tensor_transform=None,
) -> tuple:
    """Cached (logits, features) of one image set, computing them (sharded over ranks) if needed.
    Returns (cache on rank 0 / None elsewhere, backbone seconds, images this rank ran)."""
    key = hashlib.blake2b(
        f"{fingerprint}|{data_fingerprint(images, transform_key)}|{opts['precision']}".encode(), digest_size=8
    ).hexdigest()
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
    z, f, ok, seconds, count = extract(
        model,
        dataset,
        idx,
        desc=f"{images.name}" + (f" [rank {rt.rank}]" if rt.world > 1 else ""),
        **{k: opts[k] for k in ("batch_size", "workers", "device", "precision", "channels_last", "progress")},
    )
    if rt.world > 1:
        z, f, ok = rt.gather_strided_rows(n, [z, f, ok])
    if rt.main:
        arrays = dict(logits=z, features=f, ok=ok, labels=np.asarray(images.labels, dtype=np.int64))
        for name, a in arrays.items():
            save_npy(os.path.join(path, f"{name}.npy"), a)
        meta = {
            "format": CACHE_FORMAT,
            "name": images.name,
            "source": images.source,
            "num_images": n,
            "unreadable": [images.item_name(int(i)) for i in np.flatnonzero(~ok)],
            "model": fingerprint,
            "transform": transform_key,
            "precision": opts["precision"],
            "world": rt.world,
            "backbone_seconds": seconds,
            "arrays": {
                name: {"shape": list(a.shape), "dtype": str(a.dtype), "blake2b": _digest(a)}
                for name, a in arrays.items()
            },
        }
        _write_json(os.path.join(path, "meta.json"), meta)
    rt.barrier()
    return (load_cache(path) if rt.main else None), seconds, count


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "set"
