"""The evaluator: `mosx eval` and :func:`evaluate`.

One backbone pass per image: logits and features (the input of the final linear layer) are cached to
disk in fp16, keyed by the model's weights, the image list and the transform. Every score is then
computed from the cache, so asking for other scores or hyperparameters never reruns the backbone.

    from mosx.evaluate import evaluate
    res = evaluate(model, "val/", {"inat": "inat/", "textures": "dtd.txt"}, groups=groups,
                   scores=["mos"], out_dir="runs/eval")
    res.metrics["mos"]["inat"].auroc

The model is any torch module that returns logits (features are read with
:func:`mosx.scores.model_outputs`: timm's forward_features/forward_head, a (logits, features) tuple,
or a hook on the final linear layer). Under torchrun every rank runs the backbone on its shard;
rank 0 gathers the shards, so the metrics are exact over all images.

Conventions: ID is the positive class; FPR is at 95% TPR on ID, nearest-TPR rule, AUPR as average
precision (see :mod:`mosx.metrics`; all selectable).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from . import metrics as M
from . import scores as S
from .groups import Groups, as_groups

__all__ = ["evaluate", "combine", "EvalResult", "ImageList", "image_list", "load_model", "make_transform", "main"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
CACHE_FORMAT = "mosx.evalcache/1"


# ------------------------------------------------------------------------------ image lists
@dataclass
class ImageList:
    """Image files and their class ids (-1 where unknown, e.g. OOD sets)."""

    name: str
    paths: list
    labels: list
    class_names: Optional[list] = None  # for class folders: the sorted folder names
    source: str = ""
    dataset: Optional[torch.utils.data.Dataset] = None  # in-memory data instead of files (paths None)

    def __len__(self):
        return len(self.labels)

    def item_name(self, i: int) -> str:
        return self.paths[i] if self.paths is not None else f"{self.name}[{i}]"

    @classmethod
    def from_dataset(cls, ds: torch.utils.data.Dataset, name: str) -> "ImageList":
        """A map-style Dataset of images or (image, label) items. Labels come from its `labels` or
        `targets` attribute when it has one (else unknown). Items that are tensors are used as they
        are (no transform unless one is given); PIL images get the evaluator's transform."""
        n = len(ds)
        labels = getattr(ds, "labels", None)
        if labels is None:
            labels = getattr(ds, "targets", None)
        if labels is None and isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) > 1:
            labels = ds.tensors[1]
        labels = [-1] * n if labels is None else [int(v) for v in labels]
        if len(labels) != n:
            raise ValueError(f"{name}: dataset has {n} items but {len(labels)} labels")
        return cls(name, None, labels, class_names=getattr(ds, "class_names", None),
                   source=type(ds).__name__, dataset=ds)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def image_list(spec, name: str, *, groups: Optional[Groups] = None, root: Optional[str] = None) -> ImageList:
    """An ImageList from a folder or a list file.

    Folder with class sub-folders (ImageFolder layout): labels are the sorted folder names' indices.
    Folder without them: every image below it, label -1.
    List file, one image per line: ``<path>`` (label -1), ``<path> <class id>``, or the MOS reference
    format ``<path> <group> <within-group index>`` (mapped to class ids through `groups`, or the
    file's own group-by-group numbering). Relative paths are taken from `root` (default: the list
    file's folder).
    """
    if isinstance(spec, ImageList):
        return spec
    path = os.fspath(spec)
    if os.path.isdir(path):
        subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        direct = [f for f in os.listdir(path) if _is_image(f)]
        if subdirs and not direct:
            paths, labels = [], []
            for c, d in enumerate(subdirs):
                for dirpath, _, files in sorted(os.walk(os.path.join(path, d))):
                    for f in sorted(files):
                        if _is_image(f):
                            paths.append(os.path.join(dirpath, f))
                            labels.append(c)
            out = ImageList(name, paths, labels, class_names=subdirs, source=path)
        else:
            paths = [os.path.join(dp, f) for dp, _, files in sorted(os.walk(path)) for f in sorted(files) if _is_image(f)]
            out = ImageList(name, paths, [-1] * len(paths), source=path)
    elif os.path.isfile(path):
        out = _read_list_file(path, name, groups, root)
    else:
        raise FileNotFoundError(f"{name}: {path!r} is neither a folder nor a list file")
    if not out.paths:
        raise ValueError(f"{name}: no images found in {path!r}")
    return out


def _read_list_file(path, name, groups, root):
    base = root if root is not None else os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            ints = []
            while len(parts) > 1 and len(ints) < 2 and _is_int(parts[-1]):
                ints.insert(0, int(parts.pop()))
            rows.append((" ".join(parts), ints, lineno))
    kinds = {len(i) for _, i, _ in rows}
    if len(kinds) > 1:
        raise ValueError(f"{path}: lines mix formats (0, 1 or 2 integers after the path)")
    paths = [p if os.path.isabs(p) else os.path.join(base, p) for p, _, _ in rows]
    kind = kinds.pop() if kinds else 0
    if kind == 0:
        labels = [-1] * len(rows)
    elif kind == 1:
        labels = [i[0] for _, i, _ in rows]
    else:
        g = groups if groups is not None else Groups.from_list_file(path)
        lookup = {(gk, j): c for c, (gk, j) in enumerate(zip(g.class_to_group, g.class_within))}
        labels = []
        for _, (gk, j), lineno in rows:
            if (gk, j) not in lookup:
                raise ValueError(f"{path}:{lineno}: (group {gk}, within {j}) is not a class of the grouping")
            labels.append(lookup[(gk, j)])
    return ImageList(name, paths, labels, source=path)


def _is_int(s):
    try:
        int(s)
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------------------ dataset
class _ImageDataset(torch.utils.data.Dataset):
    """(image tensor, index, ok): an item that cannot be read gives ok=False and a zero image."""

    def __init__(self, images: "ImageList", transform, shape, tensor_transform=None):
        self.images, self.transform, self.shape = images, transform, shape
        self.tensor_transform = tensor_transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        try:
            return self._load(i), i, True
        except Exception:  # unreadable or corrupt: counted and reported, never fatal
            return torch.zeros(self.shape), i, False

    def _load(self, i):
        from PIL import Image

        if self.images.dataset is None:
            with open(self.images.paths[i], "rb") as f:
                img = Image.open(f)
                img = img.convert("RGB")
            return self.transform(img)
        item = self.images.dataset[i]
        x = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(x, Image.Image):
            return self.transform(x.convert("RGB"))
        x = torch.as_tensor(x)
        return self.tensor_transform(x) if self.tensor_transform is not None else x


def make_transform(image_size: int = 224, resize: str = "squash", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """Eval transform: resize to image_size x image_size ("squash", as the MOS reference's 480x480) or
    resize the short side and centre-crop ("crop"), then normalise."""
    from torchvision import transforms as T

    if resize == "squash":
        sized = [T.Resize((image_size, image_size))]
    elif resize == "crop":
        sized = [T.Resize(int(round(image_size / 0.875))), T.CenterCrop(image_size)]
    else:
        raise ValueError(f"resize must be 'squash' or 'crop', got {resize!r}")
    return T.Compose(sized + [T.ToTensor(), T.Normalize(list(mean), list(std))])


# ------------------------------------------------------------------------------ distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    owned: bool = False  # we initialised the process group (and tear it down)
    device: torch.device = torch.device("cpu")  # where collective tensors live

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


def _setup_dist(device: torch.device) -> _Dist:
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), device=_collective_device(device))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return _Dist(dist.get_rank(), dist.get_world_size(), owned=True, device=_collective_device(device))
    return _Dist()


def _collective_device(device: torch.device) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
    return device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


# ------------------------------------------------------------------------------ cache
def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        # reshape(-1): 0-dim buffers (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _data_fingerprint(images: ImageList, transform_key: str) -> str:
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
            loader = _ImageDataset(images, lambda im: torch.as_tensor(np.asarray(im)), (1,))
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
class _Cached:
    logits: np.ndarray  # [N, L] fp16 (memory-mapped)
    features: np.ndarray  # [N, D] fp16
    ok: np.ndarray  # [N] bool: the image was read
    labels: np.ndarray  # [N] int64, -1 unknown
    meta: dict
    path: str


def _load_cache(path: str) -> Optional[_Cached]:
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != CACHE_FORMAT:
        return None
    load = lambda n: np.load(os.path.join(path, n), mmap_mode="r")  # noqa: E731
    return _Cached(load("logits.npy"), load("features.npy"), np.load(os.path.join(path, "ok.npy")),
                   np.load(os.path.join(path, "labels.npy")), meta, path)


def _save_npy(path, arr):
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ backbone pass
def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        import contextlib

        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def _extract(model, dataset, indices, *, batch_size, workers, device, precision, channels_last, desc, progress):
    """Run the backbone over dataset[indices]: (logits fp16, features fp16, ok, seconds, images)."""
    sub = torch.utils.data.Subset(dataset, list(indices))
    loader = torch.utils.data.DataLoader(
        sub, batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None)
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
            with _autocast(device, precision):
                z, f = S.model_outputs(model, x)
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


def _cache_set(model, images: ImageList, transform, transform_key, shape, cache_root, fingerprint, rt: _Dist,
               opts, tensor_transform=None) -> tuple:
    """Cached (logits, features) of one image set, computing them (sharded over ranks) if needed.
    Returns (cache on rank 0 / None elsewhere, backbone seconds, images this rank ran)."""
    key = hashlib.blake2b(f"{fingerprint}|{_data_fingerprint(images, transform_key)}|{opts['precision']}".encode(),
                          digest_size=8).hexdigest()
    path = os.path.join(cache_root, f"{_safe(images.name)}-{key}")
    cached = _load_cache(path) if rt.main else None
    exists = cached is not None
    if rt.world > 1:  # rank 0's cache decides (no shared file system needed)
        t = torch.tensor([int(exists)], device=rt.device)
        torch.distributed.broadcast(t, 0)
        exists = bool(t.item())
    if exists:
        return cached, 0.0, 0
    if rt.main:
        os.makedirs(path, exist_ok=True)
    dataset = _ImageDataset(images, transform, shape, tensor_transform)
    n = len(images)
    idx = range(rt.rank, n, rt.world)
    z, f, ok, seconds, count = _extract(model, dataset, idx, desc=f"{images.name}" + (f" [rank {rt.rank}]" if rt.world > 1 else ""),
                                        **{k: opts[k] for k in ("batch_size", "workers", "device", "precision", "channels_last", "progress")})
    if rt.world > 1:
        z, f, ok = _gather_rows(rt, n, [z, f, ok])
    if rt.main:
        _save_npy(os.path.join(path, "logits.npy"), z)
        _save_npy(os.path.join(path, "features.npy"), f)
        _save_npy(os.path.join(path, "ok.npy"), ok)
        _save_npy(os.path.join(path, "labels.npy"), np.asarray(images.labels, dtype=np.int64))
        meta = {"format": CACHE_FORMAT, "name": images.name, "source": images.source, "num_images": n,
                "unreadable": [images.item_name(int(i)) for i in np.flatnonzero(~ok)], "model": fingerprint,
                "transform": transform_key, "precision": opts["precision"], "world": rt.world,
                "backbone_seconds": seconds}
        with open(os.path.join(path, "meta.json.tmp"), "w") as fh:
            json.dump(meta, fh, indent=1)
        os.replace(os.path.join(path, "meta.json.tmp"), os.path.join(path, "meta.json"))
    rt.barrier()
    return (_load_cache(path) if rt.main else None), seconds, count


def _gather_rows(rt: _Dist, n: int, arrays: list) -> list:
    """Rank r holds rows r, r + world, ...: gather every rank's arrays on rank 0 in the original order
    (None elsewhere). Goes through torch.distributed, so ranks need not share a file system."""
    parts = [None] * rt.world if rt.main else None
    torch.distributed.gather_object(arrays, parts, dst=0)
    if not rt.main:
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
                full[r::rt.world] = a
        out.append(full)
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "set"


# ------------------------------------------------------------------------------ result
@dataclass
class EvalResult:
    """metrics[method][ood set] -> OODMetrics; averages[method] -> mean AUROC / FPR over sets."""

    metrics: dict
    averages: dict
    id_accuracy: Optional[float]  # a dict {model label: accuracy} for combined results
    grouped: bool  # (dict {label: grouped} when combined)
    images_per_s: Optional[float]  # (dict when combined)
    scorer_seconds: dict
    unreadable: dict  # set name -> [paths]
    counts: dict  # set name -> images scored
    scores: dict = field(default_factory=dict)  # method -> {set: np.ndarray}
    files: dict = field(default_factory=dict)  # what was written where

    def summary(self, tpr_level: float = 0.95) -> str:
        """The table plus accuracy, throughput, scorer times and skipped images."""
        out = [self.table(tpr_level)]
        accs = self.id_accuracy if isinstance(self.id_accuracy, dict) else \
            {("grouped" if self.grouped else "flat"): self.id_accuracy}
        for k, a in accs.items():
            if a is not None:
                out.append(f"ID accuracy ({k}): {100 * a:.2f}%")
        ips = self.images_per_s if isinstance(self.images_per_s, dict) else {"": self.images_per_s}
        for k, v in ips.items():
            if v:
                out.append(f"backbone{' (' + k + ')' if k else ''}: {v:.1f} images/s")
        out.append("scorer time: " + ", ".join(f"{k} {v:.3f}s" for k, v in self.scorer_seconds.items()))
        skipped = sum(len(v) for v in self.unreadable.values())
        if skipped:
            out.append(f"{skipped} unreadable image(s) skipped: "
                       + ", ".join(f"{k} {len(v)}" for k, v in self.unreadable.items() if v))
        return "\n".join(out)

    def table(self, tpr_level: float = 0.95) -> str:
        sets = list(next(iter(self.metrics.values()))) if self.metrics else []
        fpr_name = f"FPR{round(tpr_level * 100):d}"
        head = ["Method"] + sets + ["Average"]
        rows = []
        for method, per in self.metrics.items():
            cells = [f"{100 * per[s].auroc:6.2f} / {100 * per[s].fpr_at_tpr:6.2f}" for s in sets]
            a = self.averages[method]
            cells.append(f"{100 * a['auroc']:6.2f} / {100 * a['fpr_at_tpr']:6.2f}")
            rows.append([method] + cells)
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
        out = [f"AUROC / {fpr_name} in % (ID positive)", line(head), "-+-".join("-" * w for w in widths)]
        out += [line(r) for r in rows]
        return "\n".join(out)


# ------------------------------------------------------------------------------ main function
def _default_scores(grouped: bool, have_fit: bool) -> list:
    if grouped:
        return ["mos"]
    out = ["msp", "maxlogit", "energy", "odin:temperature=1000", "gradnorm"]
    if have_fit:
        out += ["kl_matching", "mahalanobis", "react-energy"]
    return out


def _as_images(spec, name, groups):
    if isinstance(spec, ImageList):
        return spec
    if isinstance(spec, torch.utils.data.Dataset):
        return ImageList.from_dataset(spec, name)
    return image_list(spec, name, groups=groups)


def evaluate(
    model: torch.nn.Module,
    id_data,
    ood_data: Mapping[str, object],
    *,
    groups=None,
    scores: Optional[Sequence] = None,
    fit_data=None,
    fit_on_id: bool = False,
    class_names: Optional[Sequence[str]] = None,
    out_dir: Optional[str] = None,
    cache_dir: Optional[str] = None,
    transform=None,
    tensor_transform=None,
    image_size: int = 224,
    resize: str = "squash",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    batch_size: int = 128,
    workers: Optional[int] = None,
    device=None,
    precision: str = "auto",
    channels_last: bool = True,
    tpr: float = 0.95,
    positive: str = "id",
    fpr_rule: str = "nearest",
    aupr: str = "ap",
    plots: bool = True,
    progress: bool = True,
    verbose: bool = True,
) -> Optional[EvalResult]:
    """Score an ID set and named OOD sets with every requested method; see the module docstring.

    id_data / ood_data values: folders, list files, :class:`ImageList` or map-style Datasets
    (e.g. mosx.data's ImageSet; tensor items pass through `tensor_transform`, default none).
    groups: the model's
    grouping (its output must have groups.num_logits columns); None for a flat model.
    scores: scorer specs (see :func:`mosx.scores.build_scorer`) or Scorer objects; default: "mos"
    for a grouped model, the logit/feature baselines for a flat one.
    fit_data: ID images for the scorers fitted on ID statistics (KL matching, Mahalanobis, ReAct);
    fit_on_id=True fits them on the ID test set instead (optimistic; says so in the report).
    class_names: expected class list; a mismatch with the ID folder's classes stops the run.
    precision: "bf16" / "fp16" autocast or "fp32"; "auto" = bf16 on a GPU, fp32 on a CPU (where
    bf16 convolutions are slow without native support). Output files go to out_dir (table.txt,
    results.json, results.csv, roc_<method>.png, hist_<method>.png) and the cache to cache_dir
    (default out_dir/cache).
    Returns the EvalResult on rank 0 (None on other ranks).
    """
    # ---- every check before any work
    if not ood_data:
        raise ValueError("evaluate: give at least one OOD set")
    if out_dir is None and cache_dir is None:
        raise ValueError("evaluate: give out_dir or cache_dir (the logits/features cache lives on disk)")
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"evaluate: precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    M._check_options("evaluate", positive, fpr_rule, aupr)
    g = as_groups(groups) if groups is not None else None
    if device is None:  # under torchrun each rank takes its own GPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    id_images = _as_images(id_data, "id", g)
    ood_images = {name: _as_images(spec, name, g) for name, spec in ood_data.items()}
    for name, im in ood_images.items():
        if len(im) == 0:
            raise ValueError(f"evaluate: OOD set {name!r} is empty")
    if "id" in ood_images:
        raise ValueError("evaluate: 'id' is reserved for the ID set; rename that OOD set")
    if class_names is not None and id_images.class_names is not None and list(class_names) != list(id_images.class_names):
        diff = next(i for i, (a, b) in enumerate(zip(list(class_names) + [None] * len(id_images.class_names),
                                                     id_images.class_names + [None] * len(class_names))) if a != b)
        raise ValueError(
            f"evaluate: the model's class list ({len(class_names)} classes) does not match the ID folder's "
            f"({len(id_images.class_names)}); first difference at index {diff}: "
            f"{(list(class_names) + [None])[min(diff, len(class_names))]!r} vs "
            f"{(id_images.class_names + [None])[min(diff, len(id_images.class_names))]!r}")
    if g is not None and id_images.class_names is not None and len(id_images.class_names) != g.num_classes:
        raise ValueError(f"evaluate: the grouping has {g.num_classes} classes but the ID folder has "
                         f"{len(id_images.class_names)}")
    specs = list(scores) if scores is not None else None
    have_fit = fit_data is not None or fit_on_id
    scorer_objs = {}
    for spec in specs if specs is not None else _default_scores(g is not None, have_fit):
        s = spec if isinstance(spec, S.Scorer) else S.build_scorer(str(spec), groups=g)
        name = spec if isinstance(spec, str) else s.name
        if name in scorer_objs:
            name = repr(s) if repr(s) not in scorer_objs else f"{name} #{len(scorer_objs)}"
        if s.needs_fit and not have_fit:
            raise ValueError(f"evaluate: scorer {name!r} is fitted on ID statistics: give fit_data "
                             "(--fit-data) or fit_on_id=True (--fit-on-id)")
        base = s.base if isinstance(s, S.ReAct) else s
        if g is not None and not isinstance(base, S.MOS) and (isinstance(s, S.ReAct) or "logits" in s.needs):
            raise ValueError(f"evaluate: scorer {name!r} reads flat class logits but the model is grouped "
                             f"({g.num_logits} = classes + others slots); evaluate a flat model for it")
        if isinstance(base, S.MOS) and g is None:
            raise ValueError("evaluate: the mos score needs the model's grouping (groups / --groups)")
        scorer_objs[name] = s
    fit_images = None
    if fit_data is not None:
        fit_images = _as_images(fit_data, "fit", g)

    model = model.to(dev).eval()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    head = None
    try:
        head = S.linear_head(model)
    except ValueError:
        pass
    if transform is None:
        transform = make_transform(image_size, resize, mean, std)
        transform_key = f"size={image_size},resize={resize},mean={tuple(mean)},std={tuple(std)}"
    else:
        transform_key = repr(transform)
    if tensor_transform is not None:
        transform_key += f"|tensor:{tensor_transform!r}"
    # Output width against the grouping, before the pass: from the head, else one probe image.
    x0, _, ok0 = _ImageDataset(id_images, transform, (3, image_size, image_size), tensor_transform)[0]
    shape = tuple(x0.shape)
    width = head.weight.shape[0] if head is not None else None
    if width is None and ok0:
        with torch.no_grad():
            width = S.model_outputs(model, x0[None].to(dev))[0].shape[1]
    if g is not None and width is not None and width != g.num_logits:
        raise ValueError(f"evaluate: the model outputs {width} logits but the grouping needs {g.num_logits} "
                         f"({g.num_classes} classes + {g.num_groups} others slots)")
    if g is None and id_images.class_names is not None and width is not None and width != len(id_images.class_names):
        raise ValueError(f"evaluate: the model outputs {width} logits but the ID folder has "
                         f"{len(id_images.class_names)} classes")
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if dev.type == "cuda" else min(4, max(0, (os.cpu_count() or 1) - 1))

    rt = _setup_dist(dev)
    try:
        return _run(model, head, g, id_images, ood_images, fit_images, fit_on_id, scorer_objs,
                    (transform, tensor_transform), transform_key, shape, dev, rt, out_dir, cache_dir, batch_size, workers, precision,
                    channels_last, tpr, positive, fpr_rule, aupr, plots, progress, verbose)
    finally:
        if rt.owned:
            torch.distributed.destroy_process_group()


def _run(model, head, g, id_images, ood_images, fit_images, fit_on_id, scorers, transform, transform_key, shape,
         dev, rt, out_dir, cache_dir, batch_size, workers, precision, channels_last, tpr, positive, fpr_rule, aupr,
         plots, progress, verbose):
    cache_root = cache_dir or os.path.join(out_dir, "cache")
    if rt.main:
        os.makedirs(cache_root, exist_ok=True)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
    rt.barrier()
    fp = model_fingerprint(model)
    opts = dict(batch_size=batch_size, workers=workers, device=dev, precision=precision,
                channels_last=channels_last, progress=progress and (rt.main or rt.world > 1))
    sets = {"id": id_images, **ood_images}
    if fit_images is not None:
        sets["fit"] = fit_images
    caches, backbone_s, ran = {}, 0.0, 0
    for name, images in sets.items():
        c, sec, cnt = _cache_set(model, images, transform[0], transform_key, shape, cache_root, fp, rt, opts,
                                 tensor_transform=transform[1])
        caches[name] = c
        backbone_s += sec
        ran += cnt
    # images/s over all ranks: images run everywhere over the slowest rank's time
    if rt.world > 1:
        t = torch.tensor([float(ran), backbone_s], dtype=torch.float64, device=rt.device)
        mx = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        torch.distributed.all_reduce(mx, op=torch.distributed.ReduceOp.MAX)
        ran, backbone_s = int(t[0]), float(mx[1])
    ips = ran / backbone_s if ran and backbone_s > 0 else None

    def data_of(c: _Cached) -> dict:
        keep = np.flatnonzero(c.ok)
        all_ok = len(keep) == len(c.ok)
        pick = (lambda a: a) if all_ok else (lambda a: a[keep])
        return {"logits": pick(c.logits), "features": pick(c.features), "labels": torch.from_numpy(np.asarray(pick(c.labels))),
                "head": head}

    # ---- fit, then every score from the cache
    timings = {}
    fit_src = caches.get("fit") if fit_images is not None else (caches["id"] if fit_on_id else None)
    if rt.main and fit_src is not None and any(s.needs_fit for s in scorers.values()):
        d = data_of(fit_src)
        if (d["labels"] < 0).any():
            d.pop("labels")  # unlabelled fit data: Mahalanobis uses predicted classes
        for name, s in scorers.items():
            if s.needs_fit:
                t0 = time.perf_counter()
                S.fit_all({name: s}, d, device=dev)
                timings[name] = time.perf_counter() - t0
    # ---- scorers that perturb the input (ODIN / Mahalanobis with eps > 0): a gradient pass per set
    input_scorers = {k: v for k, v in scorers.items() if "inputs" in v.needs}
    perturbed = {}
    if input_scorers:
        if rt.world > 1:  # the statistics were fitted on rank 0
            box = [input_scorers if rt.main else None]
            torch.distributed.broadcast_object_list(box, src=0)
            input_scorers = box[0]
        for m, s in input_scorers.items():
            t0 = time.perf_counter()
            for set_name in ["id", *ood_images]:
                perturbed.setdefault(m, {})[set_name] = _perturbed_scores(
                    model, sets[set_name], s, rt, opts, transform, shape, f"{m} {set_name}")
            timings[m] = timings.get(m, 0.0) + time.perf_counter() - t0
    if not rt.main:
        return None
    score_sets = {}
    cached_scorers = {k: v for k, v in scorers.items() if k not in input_scorers}
    for set_name in ["id", *ood_images]:
        d = data_of(caches[set_name])
        d.pop("labels")
        out = S.score_all(cached_scorers, d, device=dev, timings=timings) if cached_scorers else {}
        keep = np.flatnonzero(caches[set_name].ok)
        for m in scorers:
            v = out[m] if m in out else torch.from_numpy(perturbed[m][set_name][keep])
            score_sets.setdefault(m, {})[set_name] = v
    metrics, averages = {}, {}
    for m, per in score_sets.items():
        metrics[m] = {o: M.ood_metrics(per["id"], per[o], tpr=tpr, positive=positive, fpr_rule=fpr_rule, aupr=aupr)
                      for o in ood_images}
        vals = list(metrics[m].values())
        averages[m] = {k: float(np.mean([getattr(v, k) for v in vals]))
                       for k in ("auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "detection_error")}
    # ---- ID accuracy
    idc = caches["id"]
    keep = np.flatnonzero(idc.ok)
    labels = torch.from_numpy(np.asarray(idc.labels)[keep])
    acc = None
    if len(labels) and bool((labels >= 0).all()):
        z = torch.from_numpy(np.asarray(idc.logits)[keep]).float()
        if g is not None:
            from .ops import group_predict

            pred = group_predict(z, g)[0]
        else:
            pred = z.argmax(1)
        acc = float((pred == labels).double().mean())
    unreadable = {n: c.meta["unreadable"] for n, c in caches.items()}
    counts = {n: int(c.ok.sum()) for n, c in caches.items()}
    res = EvalResult(metrics, averages, acc, g is not None, ips, timings, unreadable, counts,
                     scores={m: {s: v.numpy() for s, v in per.items()} for m, per in score_sets.items()})
    for n, bad in unreadable.items():
        if bad:
            warnings.warn(f"{n}: {len(bad)} unreadable image(s) skipped, e.g. {bad[0]}")
    if out_dir:
        res.files = _write_outputs(res, out_dir, tpr, dict(positive=positive, fpr_rule=fpr_rule, aupr=aupr,
                                                           fit="fit_data" if fit_images is not None else ("id (optimistic)" if fit_on_id else None)),
                                   plots)
    if verbose:
        print(res.summary(tpr))
    return res


def combine(results: Mapping[str, EvalResult]) -> EvalResult:
    """One result from several models' results on the same sets (e.g. {"grouped": .., "flat": ..}):
    methods side by side (a method name present twice gets " (label)" appended); accuracy, images/s,
    grouped flag as {label: value}."""
    names = [m for r in results.values() for m in r.metrics]
    metrics, averages, scores, timings = {}, {}, {}, {}
    for label, r in results.items():
        for m in r.metrics:
            key = f"{m} ({label})" if names.count(m) > 1 else m
            metrics[key], averages[key] = r.metrics[m], r.averages[m]
            if m in r.scores:
                scores[key] = r.scores[m]
            if m in r.scorer_seconds:
                timings[key] = r.scorer_seconds[m]
    first = next(iter(results.values()))
    return EvalResult(metrics, averages, {k: r.id_accuracy for k, r in results.items()},
                      {k: r.grouped for k, r in results.items()}, {k: r.images_per_s for k, r in results.items()},
                      timings, first.unreadable, first.counts, scores=scores)


def _perturbed_scores(model, images, scorer, rt: _Dist, opts, transform, shape, desc):
    """Scores of a scorer that needs inputs + model (a gradient per batch), sharded over ranks;
    the full [N] float32 array on rank 0 (None elsewhere). Rows of unreadable images are 0."""
    dev = opts["device"]
    dataset = _ImageDataset(images, transform[0], shape, transform[1])
    sub = torch.utils.data.Subset(dataset, list(range(rt.rank, len(images), rt.world)))
    loader = torch.utils.data.DataLoader(sub, batch_size=opts["batch_size"], shuffle=False,
                                         num_workers=opts["workers"], pin_memory=dev.type == "cuda")
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
            with _autocast(dev, opts["precision"]):
                sc = scorer.score(inputs=x, model=model)
            out[lo:lo + len(ok)] = sc.float().cpu().numpy()
            lo += len(ok)
            if bar is not None:
                bar.update(len(ok))
    finally:
        for p, r in zip(model.parameters(), grads):
            p.requires_grad_(r)
        if bar is not None:
            bar.close()
    if rt.world > 1:
        return _gather_rows(rt, len(images), [out])[0]
    return out


def _write_outputs(res: EvalResult, out_dir: str, tpr: float, conventions: dict, plots: bool) -> dict:
    files = {}
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(res.table(tpr) + "\n")
    files["table"] = os.path.join(out_dir, "table.txt")
    doc = {
        "conventions": {**conventions, "tpr_level": tpr, "id_is_positive": conventions["positive"] == "id"},
        "metrics": {m: {o: v.as_dict() for o, v in per.items()} for m, per in res.metrics.items()},
        "average": res.averages,
        "id_accuracy": res.id_accuracy,
        "grouped_model": res.grouped,
        "images_per_s": res.images_per_s,
        "scorer_seconds": res.scorer_seconds,
        "images_scored": res.counts,
        "unreadable": res.unreadable,
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    files["json"] = os.path.join(out_dir, "results.json")
    import csv

    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "ood_set", "auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "detection_error", "num_id", "num_ood"])
        for m, per in res.metrics.items():
            for o, v in per.items():
                w.writerow([m, o, v.auroc, v.aupr_in, v.aupr_out, v.fpr_at_tpr, v.detection_error, v.num_id, v.num_ood])
            a = res.averages[m]
            w.writerow([m, "average", a["auroc"], a["aupr_in"], a["aupr_out"], a["fpr_at_tpr"], a["detection_error"], "", ""])
    files["csv"] = os.path.join(out_dir, "results.csv")
    if plots:
        files["plots"] = _plots(res, out_dir)
    return files


def _plots(res: EvalResult, out_dir: str) -> list:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    written = []
    for m, per in res.scores.items():
        fig, ax = plt.subplots(figsize=(5, 5))
        for o in res.metrics[m]:
            fpr, tpr_, _ = M.roc_curve(per["id"], per[o])
            step = max(1, len(fpr) // 4000)  # plotting needs no more points than pixels
            ax.plot(fpr[::step].numpy(), tpr_[::step].numpy(), label=f"{o} (AUROC {100 * res.metrics[m][o].auroc:.1f})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="FPR (OOD kept as ID)", ylabel="TPR (ID kept)", title=f"ROC: {m}")
        ax.legend(loc="lower right", fontsize=8)
        p = os.path.join(out_dir, f"roc_{_safe(m)}.png")
        fig.savefig(p, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(p)
        fig, ax = plt.subplots(figsize=(6, 4))
        all_s = np.concatenate([np.asarray(v, np.float64) for v in per.values()])
        finite = all_s[np.isfinite(all_s)]
        bins = np.linspace(finite.min(), finite.max(), 80) if finite.size and finite.min() < finite.max() else 20
        for s, v in per.items():
            ax.hist(np.asarray(v, np.float64), bins=bins, density=True, histtype="step", label=s)
        ax.set(xlabel=f"{m} score (higher = more ID)", ylabel="density", title=f"Score histogram: {m}")
        ax.legend(fontsize=8)
        p = os.path.join(out_dir, f"hist_{_safe(m)}.png")
        fig.savefig(p, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(p)
    return written


# ------------------------------------------------------------------------------ models from files
def load_model(spec: str, *, arch: Optional[str] = None, weights: Optional[str] = None,
               num_classes: Optional[int] = None):
    """(model, info) from a mosx model file (`mosx train` output), a timm model name (with local
    `weights`, since nothing is downloaded), or a BiT `.npz` (with `arch`, e.g. resnetv2_101x1_bit).
    info: {"groups", "class_names"} where the file knows them."""
    if os.path.isfile(spec) and spec.endswith(".npz"):
        if arch is None:
            raise ValueError(f"{spec}: a BiT .npz needs --arch (e.g. resnetv2_101x1_bit)")
        import timm

        model = timm.create_model(arch, pretrained=False, num_classes=num_classes or 1000)
        model.load_pretrained(spec)
        return model, {"groups": None, "class_names": None}
    if os.path.isfile(spec):
        d = torch.load(spec, map_location="cpu", weights_only=False)
        if isinstance(d, dict) and str(d.get("format", "")).startswith("mosx.model/"):
            from .train.models import load_model as load_mosx_model  # the trainer's file format

            model, info = load_mosx_model(spec)
            return model, {"groups": info.get("groups"), "class_names": info.get("class_names")}
        if isinstance(d, torch.nn.Module):
            return d, {"groups": None, "class_names": None}
        if arch is None:
            raise ValueError(f"{spec}: a plain state dict needs --arch (a timm model name)")
        weights = spec
        spec = arch
    import timm

    if not timm.list_models(spec) and spec not in timm.list_models():
        raise ValueError(f"--model {spec!r}: not a file and not a timm model name")
    model = timm.create_model(spec, pretrained=False, **({"num_classes": num_classes} if num_classes else {}))
    if weights is None:
        raise ValueError(f"--model {spec!r}: timm weights are not downloaded here; give --weights PATH")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    model.load_state_dict(state)
    return model, {"groups": None, "class_names": None}


def _load_groups(spec: Optional[str]) -> Optional[Groups]:
    if spec is None:
        return None
    if os.path.isfile(spec):
        if spec.endswith(".json"):
            return Groups.load(spec)
        return Groups.from_list_file(spec)
    try:
        return Groups.from_sizes([int(s) for s in spec.split(",")])
    except ValueError:
        raise ValueError(f"--groups {spec!r}: a groups .json, a list file or comma-separated sizes") from None


# ------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mosx eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="mosx model file, timm model name, BiT .npz or state dict")
    p.add_argument("--arch", help="timm architecture for a .npz or a plain state dict")
    p.add_argument("--weights", help="local weights for a timm model name")
    p.add_argument("--num-classes", type=int, help="output width when building a timm model")
    p.add_argument("--flat-model", help="a second, flat model scored in the same run (baselines beside MOS); "
                                         "same loading rules as --model (--flat-arch/--flat-weights)")
    p.add_argument("--flat-arch")
    p.add_argument("--flat-weights")
    p.add_argument("--flat-scores", help="scorer specs for the flat model (default: the baselines)")
    p.add_argument("--groups", help="grouping of a grouped model: groups .json, list file, or sizes '398,521,...'")
    p.add_argument("--classes", help="file with the expected class names, one per line (checked against the ID folder)")
    p.add_argument("--id", required=True, help="ID images: folder (class sub-folders) or list file")
    p.add_argument("--ood", action="append", default=[], metavar="NAME=PATH", help="an OOD set (repeat)")
    p.add_argument("--fit-data", help="ID images for fitted scorers (KL matching, Mahalanobis, ReAct)")
    p.add_argument("--fit-on-id", action="store_true", help="fit those on the ID test set (optimistic)")
    p.add_argument("--scores", help="scorer specs name[:key=value,...], comma-separated, e.g. "
                                    "'msp,energy:temperature=2,odin:temperature=1000,eps=0.0014,react-energy:percentile=90' "
                                    "(known: mos, msp, maxlogit, energy, odin, kl_matching, mahalanobis, gradnorm, react-<name>)")
    p.add_argument("--out", required=True, help="output folder (table, JSON, CSV, PNG, cache)")
    p.add_argument("--cache-dir", help="logits/features cache folder (default OUT/cache)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--resize", choices=("squash", "crop"), default="squash")
    p.add_argument("--mean", type=float, nargs=3, default=(0.5, 0.5, 0.5))
    p.add_argument("--std", type=float, nargs=3, default=(0.5, 0.5, 0.5))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, help="loader workers (default: up to 8 on GPU)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available; LOCAL_RANK under torchrun)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast for the backbone; auto: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--tpr", type=float, default=0.95)
    p.add_argument("--positive", choices=("id", "ood"), default="id")
    p.add_argument("--fpr-rule", choices=("nearest", "first"), default="nearest")
    p.add_argument("--aupr", choices=("ap", "trapezoid"), default="ap")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def _split_scores(s: Optional[str]):
    """'msp,energy:temperature=2,odin:temperature=1000,eps=0.001' -> specs: a comma-separated piece
    of the form key=value (no ':') continues the previous spec's parameters; ';' always separates."""
    if not s:
        return None
    out = []
    for group in s.split(";"):
        start = len(out)
        for piece in (p.strip() for p in group.split(",")):
            if not piece:
                continue
            if len(out) > start and "=" in piece and ":" not in piece:
                out[-1] += "," + piece
            else:
                out.append(piece)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ood = {}
    for item in args.ood:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            print(f"mosx eval: --ood expects NAME=PATH, got {item!r}", file=sys.stderr)
            return 2
        if name in ood:
            print(f"mosx eval: OOD set {name!r} given twice", file=sys.stderr)
            return 2
        ood[name] = path
    device = args.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        model, info = load_model(args.model, arch=args.arch, weights=args.weights, num_classes=args.num_classes)
        groups = _load_groups(args.groups) or info.get("groups")
        if args.groups and info.get("groups") is not None and _load_groups(args.groups) != info["groups"]:
            raise ValueError("--groups differs from the grouping stored in the model file")
        class_names = info.get("class_names")
        if args.classes:
            with open(args.classes) as f:
                given = [ln.strip() for ln in f if ln.strip()]
            if class_names is not None and given != list(class_names):
                raise ValueError(f"--classes ({len(given)} names) does not match the class list stored in "
                                 f"{args.model} ({len(class_names)} names)")
            class_names = given
        common = dict(fit_data=args.fit_data, fit_on_id=args.fit_on_id, class_names=class_names,
                      image_size=args.image_size, resize=args.resize, mean=args.mean, std=args.std,
                      batch_size=args.batch_size, workers=args.workers, device=device, precision=args.precision,
                      channels_last=not args.no_channels_last, tpr=args.tpr, positive=args.positive,
                      fpr_rule=args.fpr_rule, aupr=args.aupr, progress=not args.no_progress)
        if not args.flat_model:
            evaluate(model, args.id, ood, groups=groups, scores=_split_scores(args.scores), out_dir=args.out,
                     cache_dir=args.cache_dir, plots=not args.no_plots, **common)
            return 0
        flat, finfo = load_model(args.flat_model, arch=args.flat_arch, weights=args.flat_weights,
                                 num_classes=args.num_classes)
        if finfo.get("groups") is not None:
            raise ValueError("--flat-model holds a grouped model; give the flat baseline there")
        if class_names is not None and finfo.get("class_names") is not None and list(finfo["class_names"]) != list(class_names):
            raise ValueError("--flat-model's class list differs from --model's")
        cache = args.cache_dir or os.path.join(args.out, "cache")
        runs = {}
        for label, (m, g, sc) in {"grouped" if groups is not None else "model": (model, groups, args.scores),
                                  "flat": (flat, None, args.flat_scores)}.items():
            runs[label] = evaluate(m, args.id, ood, groups=g, scores=_split_scores(sc), out_dir=None, cache_dir=cache,
                                   plots=False, verbose=False, **common)
        if runs["flat"] is not None:  # rank 0
            res = combine(runs)
            os.makedirs(args.out, exist_ok=True)
            res.files = _write_outputs(res, args.out, args.tpr, dict(positive=args.positive, fpr_rule=args.fpr_rule,
                                                                     aupr=args.aupr, fit=args.fit_data or ("id (optimistic)" if args.fit_on_id else None)),
                                       not args.no_plots)
            print(res.summary(args.tpr))
    except (ValueError, FileNotFoundError) as e:
        print(f"mosx eval: {e}", file=sys.stderr)
        return 2
    return 0
