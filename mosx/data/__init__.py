"""The offline benchmark: letters of many scripts (ID, grouped by script) and OOD sets, near to far.

    import mosx.data
    bench = mosx.data.load_benchmark(num_classes=100)   # builds into ~/.cache/mosx/data once
    bench.train, bench.test        # torch Datasets of (1 x H x W float image in [0, 1], class id)
    bench.groups                   # mosx.Groups: one group per script
    bench.ood["fashion"]           # OOD Datasets, label -1

Command line: `mosx data build --num-classes 100`, `mosx data info`, `mosx data verify`,
`mosx data scripts`. Sources and licences: mosx/data/LICENSES.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import torch

from .cache import BenchmarkConfig, build, build_cached, default_root, resolve, verify
from .errors import MissingDataError

__all__ = [
    "Benchmark",
    "BenchmarkConfig",
    "ImageSet",
    "MissingDataError",
    "build",
    "build_cached",
    "default_root",
    "load_benchmark",
    "load_folder",
    "main",
    "read_manifest",
    "verify",
]


class ImageSet(torch.utils.data.Dataset):
    """uint8 images held as one tensor; items are (float image in [0, 1], label).

    `images` (N x 1 x H x W uint8) and `labels` (N int64; -1 for OOD) are public so training
    loops on the CPU can slice whole batches instead of going through a DataLoader.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, name: str):
        self.name = name
        self.images = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
        n = len(self.images)
        self.labels = (
            torch.full((n,), -1, dtype=torch.int64)
            if labels is None
            else torch.from_numpy(np.asarray(labels, dtype=np.int64))
        )
        if len(self.labels) != n:
            raise ValueError(f"{name}: {n} images but {len(self.labels)} labels")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].float().div_(255.0), self.labels[i]

    def tensors(self, dtype=torch.float32):
        """(all images as dtype in [0, 1], labels)."""
        return self.images.to(dtype).div_(255.0), self.labels

    def __repr__(self):
        return f"ImageSet({self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])})"


@dataclasses.dataclass
class Benchmark:
    path: str
    manifest: dict
    train: ImageSet
    test: ImageSet
    ood: dict
    groups: object  # mosx.Groups

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def class_names(self) -> list[str]:
        return [f"{c['script']}:{c['char']}" for c in self.manifest["classes"]]

    @property
    def script_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["scripts"]]


_MANIFEST_KEYS = ("key", "config", "classes", "scripts", "counts", "files")


def read_manifest(folder: str) -> dict:
    """folder/manifest.json, checked to be a JSON object with the keys a build writes; a missing,
    truncated or foreign manifest raises FileNotFoundError / RuntimeError saying how to rebuild."""
    path = os.path.join(folder, "manifest.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder}: no manifest.json; build it with `mosx data build`")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise RuntimeError(f"{path}: not a readable manifest ({e}); rebuild with `mosx data build --force`") from None
    missing = [k for k in _MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise RuntimeError(
            f"{path}: not a mosx benchmark manifest (missing {', '.join(missing)}); rebuild with "
            "`mosx data build --force`"
        )
    return manifest


def load_folder(folder: str, check: bool = False) -> Benchmark:
    """Open one build folder (as build_cached returns); check=True verifies the sha256 sums."""
    from ..groups import Groups

    manifest = read_manifest(folder)
    if check:
        bad = verify(folder)
        if bad:
            raise RuntimeError(f"{folder}: checksum mismatch in {bad}; rebuild with --force")

    def arr(name):
        # the header is read (memory-mapped) and checked against the manifest before any array is
        # allocated: a corrupted header can claim a shape of many gigabytes
        file = f"{name}.npy"
        meta = manifest.get("files", {}).get(file)
        try:
            mm = np.load(os.path.join(folder, file), allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise RuntimeError(f"{folder}/{file}: unreadable ({e}); rebuild with `mosx data build --force`") from None
        if meta is not None and (list(mm.shape) != list(meta["shape"]) or str(mm.dtype) != meta["dtype"]):
            raise RuntimeError(
                f"{folder}/{file}: {mm.dtype} {list(mm.shape)} but the manifest says {meta['dtype']} "
                f"{list(meta['shape'])}; rebuild with `mosx data build --force`"
            )
        out = np.array(mm)
        if name.endswith("_labels") and out.size and (out.min() < 0 or out.max() >= len(manifest["classes"])):
            raise RuntimeError(
                f"{folder}/{file}: labels outside 0..{len(manifest['classes']) - 1}; rebuild with "
                "`mosx data build --force`"
            )
        return out

    groups = Groups.from_assignment([c["group"] for c in manifest["classes"]], len(manifest["scripts"]))
    return Benchmark(
        path=folder,
        manifest=manifest,
        train=ImageSet(arr("train_images"), arr("train_labels"), "train"),
        test=ImageSet(arr("test_images"), arr("test_labels"), "test"),
        ood={name: ImageSet(arr(f"ood_{name}"), None, name) for name in manifest["config"]["ood_sets"]},
        groups=groups,
    )


def load_benchmark(
    root: str | None = None,
    num_classes: int = 100,
    *,
    build: bool = True,
    force: bool = False,
    progress: bool = True,
    check: bool = False,
    **settings,
) -> Benchmark:
    """The benchmark for these settings, built into root (default ~/.cache/mosx/data) if missing.

    settings are BenchmarkConfig fields: num_scripts, image_size, train_per_class, test_per_class,
    ood_per_set, ood_sets, test_family_fraction, max_styles_per_family, augment, seed, font_dir.
    """
    config = resolve(BenchmarkConfig(num_classes=num_classes, **settings))
    folder = os.path.join(root or default_root(), config.key())
    if force or not os.path.exists(os.path.join(folder, "manifest.json")):
        if not build:
            raise FileNotFoundError(f"no build for these settings in {folder}; run `mosx data build`")
        folder = build_cached(config, root, force=force, progress=progress)
    return load_folder(folder, check=check)


# ------------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mosx data", description="Build and inspect the offline benchmark data.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def settings(p):
        d = BenchmarkConfig()
        p.add_argument("--root", default=None, help=f"cache folder (default {default_root()}; env MOSX_DATA)")
        p.add_argument("--num-classes", type=int, default=d.num_classes)
        p.add_argument("--num-scripts", type=int, default=None, help="groups (default: num_classes // 5, at most 22)")
        p.add_argument("--image-size", type=int, default=d.image_size)
        p.add_argument("--train-per-class", type=int, default=d.train_per_class)
        p.add_argument("--test-per-class", type=int, default=d.test_per_class)
        p.add_argument("--ood-per-set", type=int, default=d.ood_per_set)
        p.add_argument(
            "--ood",
            default=None,
            help="comma-separated OOD sets (default: all installed): scripts,digits,silhouettes,fashion,textures",
        )
        p.add_argument(
            "--max-styles-per-family",
            type=int,
            default=d.max_styles_per_family,
            help="style files per typeface family (0: all)",
        )
        p.add_argument("--augment", type=float, default=d.augment)
        p.add_argument("--seed", type=int, default=d.seed)
        p.add_argument("--font-dir", default=d.font_dir)

    b = sub.add_parser("build", help="build (or reuse) a benchmark and print its folder")
    settings(b)
    b.add_argument("--force", action="store_true", help="rebuild even if the build exists")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    i = sub.add_parser("info", help="summary of a build (building it when missing)")
    settings(i)
    v = sub.add_parser("verify", help="check a build folder's sha256 sums against its manifest")
    v.add_argument("folder")
    sub.add_parser("scripts", help="list the ID and held-out scripts found in the font folder")
    return ap


def _config(a) -> BenchmarkConfig:
    return BenchmarkConfig(
        num_classes=a.num_classes,
        num_scripts=a.num_scripts,
        image_size=a.image_size,
        train_per_class=a.train_per_class,
        test_per_class=a.test_per_class,
        ood_per_set=a.ood_per_set,
        ood_sets=None if a.ood is None else tuple(s.strip() for s in a.ood.split(",") if s.strip()),
        max_styles_per_family=a.max_styles_per_family or None,
        augment=a.augment,
        seed=a.seed,
        font_dir=a.font_dir,
    )


def _summary(bench: Benchmark) -> str:
    m = bench.manifest
    lines = [
        f"folder   {bench.path}",
        f"classes  {bench.num_classes} in {len(m['scripts'])} scripts (groups); image "
        f"{m['config']['image_size']}x{m['config']['image_size']}, built in {m['build_seconds']} s",
    ]
    for s in m["scripts"]:
        chars = "".join(m["classes"][c]["char"] for c in s["classes"])
        lines.append(f"  {s['name']:<11} {len(s['classes']):>3}  {chars}")
    lines.append("families train: " + ", ".join(sorted({f for v in m["fonts"]["train"].values() for f in v})))
    lines.append("families test:  " + ", ".join(sorted({f for v in m["fonts"]["test"].values() for f in v})))
    lines.append("counts   " + ", ".join(f"{k} {v}" for k, v in m["counts"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        if a.cmd == "build":
            folder = build_cached(_config(a), a.root, force=a.force, progress=not a.quiet)
            print(_summary(load_folder(folder)))
        elif a.cmd == "info":
            folder = build_cached(_config(a), a.root)
            print(_summary(load_folder(folder)))
        elif a.cmd == "verify":
            bad = verify(a.folder)
            print("ok" if not bad else f"checksum mismatch: {', '.join(bad)}")
            return 1 if bad else 0
        elif a.cmd == "scripts":
            from . import cache as _cache
            from . import glyphs

            fc = glyphs.FontCache()
            ids = glyphs.scan_fonts(None, glyphs.ID_SCRIPTS)
            ids = [s for s in ids if len({glyphs.design_of(f) for f in s.families}) >= 2]
            ranked, templates = glyphs.rank_letters(ids, fc, _cache.RANK_LIMIT)
            held = [s for s in glyphs.scan_fonts(None, glyphs.OOD_SCRIPTS) if s.families]
            held_ranked, _ = glyphs.rank_letters(held, fc, _cache.OOD_RANK_LIMIT, avoid=templates)
            for title, scripts, letters in (
                ("ID scripts (groups), in build order", ids, ranked),
                ("held-out scripts (OOD set 'scripts')", held, held_ranked),
            ):
                print(f"{title}: script, distinct letters, typeface families (styles)")
                for s in scripts:
                    fams = ", ".join(f"{f} ({len(v)})" for f, v in s.families.items())
                    print(f"  {s.name:<19} {len(letters.get(s.name, [])):>3}  {fams}")
            print(
                f"at most {sum(len(v) for v in ranked.values())} ID classes "
                f"(letters per ID script capped at {_cache.RANK_LIMIT})"
            )
    except (MissingDataError, ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"mosx data: {e}", file=sys.stderr)
        return 2
    return 0
