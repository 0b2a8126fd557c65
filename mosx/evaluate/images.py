"""Image sets for the evaluator: lists of image files (folders, list files, in-memory datasets), the
dataset that reads them (an unreadable image is reported, never fatal) and the eval transform."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..groups import Groups

__all__ = ["IMAGE_EXTENSIONS", "ImageList", "ImageDataset", "image_list", "as_images", "make_transform"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass
class ImageList:
    """Image files and their class ids (-1 where unknown, e.g. OOD sets)."""

    name: str
    paths: list
    labels: list
    class_names: list | None = None  # for class folders: the sorted folder names
    source: str = ""
    dataset: torch.utils.data.Dataset | None = None  # in-memory data instead of files (paths None)

    def __len__(self):
        return len(self.labels)

    def item_name(self, i: int) -> str:
        return self.paths[i] if self.paths is not None else f"{self.name}[{i}]"

    @classmethod
    def from_dataset(cls, ds: torch.utils.data.Dataset, name: str) -> ImageList:
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
        return cls(
            name, None, labels, class_names=getattr(ds, "class_names", None), source=type(ds).__name__, dataset=ds
        )


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def image_list(
    spec, name: str, *, groups: Groups | None = None, root: str | None = None, labeled: bool = True
) -> ImageList:
    """An ImageList from a folder or a list file.

    Folder with class sub-folders (ImageFolder layout): labels are the sorted folder names' indices.
    Folder without them: every image below it, label -1. A folder with class sub-folders AND images
    at its top level is refused (one stray image would silently make the set unlabelled), unless
    labeled=False (OOD sets: every image below it, label -1).
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
        if subdirs and direct and labeled:
            raise ValueError(
                f"{name}: {path!r} holds class folders and also {len(direct)} image(s) at its top level "
                f"(e.g. {sorted(direct)[0]!r}), so it is neither a labelled ImageFolder nor an unlabelled folder: "
                f"move them into a class folder or out of it"
            )
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
            paths = [
                os.path.join(dp, f) for dp, _, files in sorted(os.walk(path)) for f in sorted(files) if _is_image(f)
            ]
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


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, index, ok): an item that cannot be read gives ok=False and a zero image."""

    def __init__(self, images: ImageList, transform, shape, tensor_transform=None):
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


def make_transform(
    image_size: int = 224, resize: str = "squash", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), in_chans: int = 3
):
    """Eval transform: resize to image_size x image_size ("squash", as the MOS reference's 480x480) or
    resize the short side and centre-crop ("crop"), then normalise. in_chans=1 (a model trained on
    grey images, e.g. the demo's) converts to grey first and takes one mean / std value (or three
    equal ones)."""
    from torchvision import transforms as T

    if resize == "squash":
        sized = [T.Resize((image_size, image_size))]
    elif resize == "crop":
        sized = [T.Resize(int(round(image_size / 0.875))), T.CenterCrop(image_size)]
    else:
        raise ValueError(f"resize must be 'squash' or 'crop', got {resize!r}")
    mean, std = list(mean), list(std)
    if in_chans == 1:
        if len(set(mean)) != 1 or len(set(std)) != 1:
            raise ValueError(f"a 1-channel model takes one mean and one std value, got mean={mean} std={std}")
        sized = [T.Grayscale(1)] + sized
        mean, std = mean[:1], std[:1]
    elif in_chans != 3:
        raise ValueError(f"image files give 1 (grey) or 3 (RGB) channels; the model takes {in_chans}")
    return T.Compose(sized + [T.ToTensor(), T.Normalize(mean, std)])


def as_images(spec, name: str, groups: Groups | None, labeled: bool = True) -> ImageList:
    """An ImageList from a folder / list file path, an ImageList, or a map-style Dataset."""
    if isinstance(spec, ImageList):
        return spec
    if isinstance(spec, torch.utils.data.Dataset):
        return ImageList.from_dataset(spec, name)
    return image_list(spec, name, groups=groups, labeled=labeled)
