"""Training data: image folders, reference list files and in-memory tensors, the recipe's transforms,
and a step-indexed sampler.

Exact resume and distributed equivalence rest on two choices:
- every sample's augmentation draws from its own generator seeded by (seed, epoch, index), so it
  does not depend on the process, the loader worker or what ran before;
- the sampler is a function of the step: step s reads batch s % S of the permutation of epoch
  s // S (S = steps per epoch), and splits that global batch into per-(rank, accumulation) chunks.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = [
    "ImageData",
    "TensorData",
    "DatasetData",
    "open_data",
    "RecipeTransform",
    "KeyedDataset",
    "StepBatchSampler",
    "seed_mix",
    "tensor_batch",
]

IMG_EXT = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_M64 = (1 << 64) - 1


def seed_mix(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 steps)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _M64
        h ^= h >> 29
    return h >> 1


def _refuse_symlink_loops(root: str) -> None:
    """ImageFolder follows directory symlinks; a link back to an ancestor would have it list the same
    images again at every level until the path fails to resolve (os.walk drops that error), so the
    training set would silently hold copies. Refuse such a tree, naming the link."""

    def walk(path: str, ancestors: frozenset) -> None:
        try:
            entries = list(os.scandir(path))
        except OSError as e:
            raise ValueError(f"{root}: cannot list {path}: {e.strerror or e}") from None
        for e in entries:
            try:
                is_dir = e.is_dir(follow_symlinks=True)
            except OSError:
                continue
            if not is_dir:
                continue
            real = os.path.realpath(e.path)
            if real in ancestors:
                raise ValueError(
                    f"{root}: {e.path} is a symlink loop (it points back to {real}); remove it, or the "
                    "images under it would be listed again at every level"
                )
            walk(e.path, ancestors | {real})

    walk(root, frozenset({os.path.realpath(root)}))


class UnreadableImage(RuntimeError):
    """A training image that PIL cannot decode: the run stops with its path (nothing is skipped
    silently: a skipped image would change the data the model trains on)."""


# More classes than any label space in use (ImageNet-21k: 21,841; extreme multi-label sets: a few
# million): a larger class id is a corrupt label, and a head that wide would not fit in memory.
MAX_CLASSES = 1 << 24


def _check_class_count(n: int, class_names, source: str) -> None:
    """Refuse a largest class id that would size the head (and the default class names) beyond
    MAX_CLASSES, before anything is allocated for it."""
    if n > MAX_CLASSES and (class_names is None or len(class_names) < n):
        raise ValueError(
            f"{source}: class id {n - 1} implies {n} classes, more than the {MAX_CLASSES} mosx trains; "
            "class ids must be 0..C-1 (a corrupt label?)"
        )


class ImageData:
    """Image files with class ids. load(i) -> (PIL image, class id)."""

    def __init__(self, samples, class_names, list_groups=None, source=""):
        self.samples = list(samples)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.targets = [t for _, t in self.samples]
        self.list_groups = list_groups  # mosx.Groups defined by a list file, else None
        self.source = source
        if not self.samples:
            raise ValueError(f"{source}: no images found")

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        from PIL import Image

        path, target = self.samples[i]
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                img = img.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            # PIL raises OSError (truncated, unidentified), SyntaxError (bad headers of some formats) or
            # DecompressionBombError; the file is named so that it can be fixed or removed from the list
            raise UnreadableImage(
                f"training image {path} (sample {i}, class {target}) cannot be read: {type(e).__name__}: {e}; "
                "fix or remove it and run again (with --resume the run continues from its last checkpoint)"
            ) from None
        return img, target

    @classmethod
    def from_folder(cls, root: str) -> ImageData:
        from torchvision.datasets import ImageFolder

        _refuse_symlink_loops(root)
        folder = ImageFolder(root, allow_empty=False)
        return cls(folder.samples, folder.classes, source=root)

    @classmethod
    def from_list_file(cls, path: str, root: str | None = None) -> ImageData:
        """Lines `<image path> <group> <within-group index>` (the MOS reference format). Class ids are
        numbered group by group (mosx.Groups.from_list_file), so the grouping comes with the file."""
        from ..groups import Groups

        groups = Groups.from_list_file(path)
        first = [0]
        for s in groups.sizes:
            first.append(first[-1] + s)
        root = root if root is not None else os.path.dirname(os.path.abspath(path))
        samples, names = [], [None] * groups.num_classes
        with open(path) as f:
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                g, j = int(parts[-2]), int(parts[-1])
                rel = " ".join(parts[:-2])
                c = first[g] + j
                samples.append((os.path.join(root, rel), c))
                if names[c] is None:
                    names[c] = os.path.basename(os.path.dirname(rel)) or f"g{g}_c{j}"
        return cls(samples, names, list_groups=groups, source=path)


class TensorData:
    """In-memory samples: x [N, C, H, W] images (or [N, D] features), y [N] class ids."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, class_names=None, source="tensors"):
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"{source}: y must be [N] integer class ids, got {y.dtype} {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{source}: x has {x.shape[0]} samples but y has {y.shape[0]}")
        if x.dim() not in (2, 4):
            raise ValueError(f"{source}: x must be [N, C, H, W] images or [N, D] features, got {tuple(x.shape)}")
        if y.numel() == 0:
            raise ValueError(f"{source}: no samples")
        if int(y.min()) < 0:
            raise ValueError(f"{source}: negative class id {int(y.min())}")
        self.x, self.y = x, y.long()
        n = int(self.y.max()) + 1
        _check_class_count(n, class_names, source)
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(n)]
        if len(self.class_names) < n:
            raise ValueError(f"{source}: class id {n - 1} but only {len(self.class_names)} class names")
        self.num_classes = len(self.class_names)
        self.targets = self.y.tolist()
        self.list_groups = None
        self.source = source

    @property
    def is_features(self) -> bool:
        return self.x.dim() == 2

    def __len__(self):
        return self.y.shape[0]

    def load(self, i):
        return self.x[i], int(self.y[i])


class DatasetData:
    """Any map-style Dataset of (image, class id) items (kept in the dataset, read per item)."""

    def __init__(self, ds, class_names=None):
        self.ds = ds
        targets = getattr(ds, "targets", None)
        self.targets = [int(t) for t in targets] if targets is not None else [int(ds[i][1]) for i in range(len(ds))]
        if not self.targets:
            raise ValueError("the dataset is empty")
        names = class_names or getattr(ds, "classes", None)
        if min(self.targets) < 0:
            raise ValueError(f"{type(ds).__name__}: negative class id {min(self.targets)}")
        _check_class_count(max(self.targets) + 1, names, type(ds).__name__)
        self.class_names = list(names) if names is not None else [str(c) for c in range(max(self.targets) + 1)]
        self.num_classes = len(self.class_names)
        self.list_groups = None
        self.source = type(ds).__name__

    def __len__(self):
        return len(self.ds)

    def load(self, i):
        img, target = self.ds[i]
        return img, int(target)


def open_data(spec, root: str | None = None, *, trust_pickle: bool = False):
    """ImageData / TensorData from a path (folder, list file, .pt tensors), a (x, y) pair, a dict
    {"x", "y"[, "class_names"]} or a TensorDataset. A .pt file loads with weights_only=True unless
    `trust_pickle`."""
    if spec is None:
        raise ValueError("no training data given (--data)")
    if isinstance(spec, (ImageData, TensorData)):
        return spec
    if isinstance(spec, torch.utils.data.TensorDataset):
        return TensorData(*spec.tensors[:2])
    if isinstance(getattr(spec, "images", None), torch.Tensor) and isinstance(
        getattr(spec, "labels", None), torch.Tensor
    ):
        # mosx.data.ImageSet: uint8 images (normalised by the recipe's transform) and labels
        return TensorData(
            spec.images, spec.labels, getattr(spec, "class_names", None), source=getattr(spec, "name", "tensors")
        )
    if isinstance(spec, torch.utils.data.Dataset):
        return DatasetData(spec)
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return TensorData(spec[0], spec[1])
    if isinstance(spec, dict):
        return TensorData(spec["x"], spec["y"], spec.get("class_names"))
    path = os.fspath(spec)
    if os.path.isdir(path):
        return ImageData.from_folder(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data {path!r} does not exist")
    if path.endswith((".pt", ".pth")):
        from ..models.files import read_file

        d = read_file(path, trust_pickle=trust_pickle)
        if not isinstance(d, dict) or "x" not in d or "y" not in d:
            raise ValueError(f"{path}: a tensor data file must hold a dict with 'x' and 'y'")
        return TensorData(d["x"], d["y"], d.get("class_names"), source=path)
    return ImageData.from_list_file(path, root)


class RecipeTransform:
    """Resize to resize x resize (no aspect keep), random crop, horizontal flip, normalise (train);
    resize to eval_resize x eval_resize and normalise (eval). Randomness from the generator passed in.

    PIL images and uint8 tensors are scaled to [0, 1] and normalised; float tensors are taken as
    already prepared (only resizing, cropping and flipping apply); 2-d features pass through.
    """

    def __init__(self, train: bool, resize: int, crop: int, flip: bool, mean, std, eval_resize: int):
        self.train, self.resize, self.crop, self.flip = train, int(resize), int(crop), bool(flip)
        self.eval_resize = int(eval_resize)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    @classmethod
    def from_config(cls, cfg, train: bool) -> RecipeTransform:
        return cls(train, cfg.resize, cfg.crop, cfg.flip, cfg.mean, cfg.std, cfg.eval_resize)

    def __call__(self, img, gen: torch.Generator | None = None) -> torch.Tensor:
        size = self.resize if self.train else self.eval_resize
        normalise = True
        if isinstance(img, torch.Tensor):
            if img.dim() == 1:
                return img.float()
            normalise = not img.dtype.is_floating_point
            t = img.float() / 255.0 if normalise else img.float()
            if size > 0 and tuple(t.shape[-2:]) != (size, size):
                t = F.interpolate(
                    t.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False, antialias=True
                ).squeeze(0)
        else:
            from PIL import Image
            from torchvision.transforms.functional import pil_to_tensor

            if size > 0 and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            t = pil_to_tensor(img).float().div_(255.0)
        if self.train:
            h, w = t.shape[-2:]
            if self.crop > min(h, w):
                raise ValueError(f"crop {self.crop} is larger than the {h}x{w} image")
            if self.crop > 0:
                top = int(torch.randint(0, h - self.crop + 1, (1,), generator=gen))
                left = int(torch.randint(0, w - self.crop + 1, (1,), generator=gen))
                t = t[..., top : top + self.crop, left : left + self.crop]
            if self.flip and bool(torch.rand((), generator=gen) < 0.5):
                t = t.flip(-1)
        if normalise:
            mean, std = self.mean, self.std
            if t.shape[0] != mean.shape[0]:
                # one value repeated per channel (the recipe's 0.5) fits any channel count
                if bool((mean == mean[0]).all() and (std == std[0]).all()):
                    mean, std = mean[:1], std[:1]
                else:
                    raise ValueError(f"image has {t.shape[0]} channels but mean/std have {mean.shape[0]}")
            t = (t - mean) / std
        return t.contiguous()


def tensor_batch(data: TensorData, transform: RecipeTransform, seed: int, keys) -> tuple:
    """The batch KeyedDataset + default collation would give for these (index, epoch) keys, computed
    batch-wise from in-memory tensors (one resize and one normalisation for the whole batch; crop
    and flip draws from the same per-sample generators, in the same order)."""
    idx = torch.tensor([k[0] for k in keys], dtype=torch.int64)
    x = data.x.index_select(0, idx)
    y = data.y.index_select(0, idx)
    if x.dim() == 2:
        return x.float(), y
    normalise = not x.dtype.is_floating_point
    t = x.float() / 255.0 if normalise else x.float()
    tf = transform
    size = tf.resize if tf.train else tf.eval_resize
    if size > 0 and tuple(t.shape[-2:]) != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if tf.train and (tf.crop > 0 or tf.flip):
        h, w = t.shape[-2:]
        if tf.crop > min(h, w):
            raise ValueError(f"crop {tf.crop} is larger than the {h}x{w} image")
        out = []
        for row, (i, epoch) in enumerate(keys):
            gen = torch.Generator().manual_seed(seed_mix(seed, epoch, i))
            v = t[row]
            if tf.crop > 0:
                top = int(torch.randint(0, h - tf.crop + 1, (1,), generator=gen))
                left = int(torch.randint(0, w - tf.crop + 1, (1,), generator=gen))
                v = v[..., top : top + tf.crop, left : left + tf.crop]
            if tf.flip and bool(torch.rand((), generator=gen) < 0.5):
                v = v.flip(-1)
            out.append(v)
        t = torch.stack(out)
    if normalise:
        mean, std = tf.mean, tf.std
        if t.shape[1] != mean.shape[0] and bool((mean == mean[0]).all() and (std == std[0]).all()):
            mean, std = mean[:1], std[:1]
        t = (t - mean) / std
    return t.contiguous(), y


class KeyedDataset(torch.utils.data.Dataset):
    """Items are addressed by (index, epoch); the augmentation generator is seeded from (seed, epoch, index)."""

    def __init__(self, data, transform, seed: int):
        self.data, self.transform, self.seed = data, transform, int(seed)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        img, target = self.data.load(i)
        gen = torch.Generator().manual_seed(seed_mix(self.seed, epoch, i))
        return self.transform(img, gen), target


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields the micro-batches of this rank for steps start_step .. steps-1, as lists of (index, epoch).

    Step s uses global batch s % S of epoch s // S (S = len // global_batch, the last partial batch
    dropped). The global batch is cut into world * accum chunks of micro_batch; rank r takes chunks
    r * accum .. r * accum + accum - 1, in order. One process with accumulation A therefore sees
    exactly the samples that A processes see without accumulation.
    """

    def __init__(
        self,
        n: int,
        global_batch: int,
        micro_batch: int,
        world: int,
        rank: int,
        seed: int,
        steps: int,
        start_step: int = 0,
    ):
        if global_batch % (world * micro_batch):
            raise ValueError(
                f"batch_size {global_batch} is not a multiple of world size {world} x micro_batch {micro_batch}"
            )
        if n < global_batch:
            raise ValueError(f"the data set has {n} samples, fewer than one batch of {global_batch}")
        self.n, self.global_batch, self.micro = n, global_batch, micro_batch
        self.world, self.rank, self.seed = world, rank, seed
        self.accum = global_batch // (world * micro_batch)
        self.steps_per_epoch = n // global_batch
        self.steps, self.start_step = steps, start_step
        self._perm = (None, None)

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(seed_mix(self.seed, 0x5A3, epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def step_indices(self, step: int) -> tuple[int, list[list[int]]]:
        """(epoch, [accum lists of indices]) for this rank at a step."""
        epoch, b = divmod(step, self.steps_per_epoch)
        chunk = self.permutation(epoch)[b * self.global_batch : (b + 1) * self.global_batch]
        out = []
        for a in range(self.accum):
            c = self.rank * self.accum + a
            out.append(chunk[c * self.micro : (c + 1) * self.micro].tolist())
        return epoch, out

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            epoch, lists = self.step_indices(step)
            for idx in lists:
                yield [(i, epoch) for i in idx]

    def __len__(self):
        return max(0, self.steps - self.start_step) * self.accum
