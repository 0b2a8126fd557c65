"""`mosx demo`: a CI smoke run at a tiny size (a few classes, a few hundred images, one epoch), its
outputs, repeatability under a fixed seed, and the settings / command-line checks."""

import csv
import json
import os

import pytest

import mosx.demo as demo
from mosx.data import glyphs

FONTS_INSTALLED = os.path.isdir(glyphs.DEFAULT_FONT_DIR) and any(
    n.startswith("NotoSansDevanagari-") for n in os.listdir(glyphs.DEFAULT_FONT_DIR)
)
needs_fonts = pytest.mark.skipif(
    not FONTS_INSTALLED,
    reason="Noto fonts not installed: apt-get install fonts-noto-core fonts-noto-extra (or .ci/install_data_deps.sh)",
)

# 6 letters in 3 scripts, 180 training images, one epoch of 6 steps, 16 x 16 images.
SMOKE = [
    "--preset",
    "tiny",
    "--classes",
    "6",
    "--scripts",
    "3",
    "--train-per-class",
    "30",
    "--test-per-class",
    "8",
    "--ood-per-set",
    "24",
    "--fit-per-class",
    "8",
    "--batch-size",
    "30",
    "--epochs",
    "1",
    "--seed",
    "3",
    "--device",
    "cpu",
    "--no-progress",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The smoke demo run twice with the same seed into two folders (one shared data cache)."""
    if not FONTS_INSTALLED:
        pytest.skip("Noto fonts not installed")
    root = tmp_path_factory.mktemp("demo")
    data = str(root / "data")
    outs = []
    for i in range(2):
        out = str(root / f"run{i}")
        assert demo.main(SMOKE + ["--data-root", data, "--out", out]) == 0
        outs.append(out)
    return outs


def _results(out):
    with open(os.path.join(out, "demo_results.json")) as f:
        return json.load(f)


@needs_fonts
def test_smoke_run_writes_every_output(runs):
    out = runs[0]
    res = _results(out)
    for name in ("demo_table.txt", "demo_results.json", "demo_results.csv", "hist_msp_vs_mos.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    ood_sets = res["ood_sets"]
    assert ood_sets and "scripts" in ood_sets
    for o in ood_sets:
        assert os.path.getsize(os.path.join(out, f"roc_{o}.png")) > 0
    # the evaluator's own outputs, one folder per model, with a ROC curve and histogram per method
    for kind, specs in (("eval_flat", demo.FLAT_SCORES), ("eval_grouped", demo.GROUPED_SCORES)):
        for f in ("table.txt", "results.json", "results.csv"):
            assert os.path.exists(os.path.join(out, kind, f))
        pngs = [f for f in os.listdir(os.path.join(out, kind)) if f.endswith(".png")]
        assert len(pngs) == 2 * len(specs)
    # the backbone and both trained models were saved
    for kind in ("backbone", "flat", "grouped"):
        assert os.path.exists(res["training"][kind]["model"])


@needs_fonts
def test_table_has_every_method_and_ood_set(runs):
    out = runs[0]
    res = _results(out)
    labels = list(demo.FLAT_SCORES.values()) + list(demo.GROUPED_SCORES.values())
    assert list(res["methods"]) == labels
    with open(os.path.join(out, "demo_table.txt"), encoding="utf-8") as f:
        table = f.read()
    lines = table.splitlines()
    header = lines[1]
    for o in res["ood_sets"] + ["Average"]:
        assert o in header
    for label in labels:
        row = [ln for ln in lines if ln.startswith(label + " ")]
        assert len(row) == 1, label
        assert row[0].count(" / ") == len(res["ood_sets"]) + 1  # AUROC / FPR95 per set and the average
    assert "ID accuracy: flat" in table and "grouped" in table
    for label, m in res["methods"].items():
        assert set(m["sets"]) == set(res["ood_sets"])
        for v in list(m["sets"].values()) + [m["average"]]:
            assert 0.0 <= v["auroc"] <= 1.0 and 0.0 <= v["fpr95"] <= 1.0
        assert m["score_seconds"] >= 0.0
    for kind in ("flat", "grouped"):
        assert 0.0 <= res["id_accuracy"][kind] <= 1.0


@needs_fonts
def test_outputs_agree_with_the_evaluator_and_each_other(runs):
    """The combined table is the evaluator's numbers, not new ones: JSON = CSV = eval_*/results.json;
    the average column is the mean over the OOD sets."""
    out = runs[0]
    res = _results(out)
    with open(os.path.join(out, "demo_results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(res["methods"]) * (len(res["ood_sets"]) + 1)
    for r in rows:
        m = res["methods"][r["method"]]
        v = m["average"] if r["ood_set"] == "average" else m["sets"][r["ood_set"]]
        assert float(r["auroc"]) == pytest.approx(v["auroc"], abs=1e-12)
        assert float(r["fpr95"]) == pytest.approx(v["fpr95"], abs=1e-12)
    for label, m in res["methods"].items():
        with open(os.path.join(out, f"eval_{m['model']}", "results.json")) as f:
            ev = json.load(f)
        for o in res["ood_sets"]:
            assert m["sets"][o]["auroc"] == ev["metrics"][m["spec"]][o]["auroc"]
            assert m["sets"][o]["fpr95"] == ev["metrics"][m["spec"]][o]["fpr_at_tpr"]
        mean = sum(m["sets"][o]["fpr95"] for o in res["ood_sets"]) / len(res["ood_sets"])
        assert m["average"]["fpr95"] == pytest.approx(mean, abs=1e-12)
        assert res["id_accuracy"][m["model"]] == ev["id_accuracy"]


@needs_fonts
def test_same_seed_gives_identical_metrics(runs):
    a, b = (_results(o) for o in runs)
    assert a["methods"].keys() == b["methods"].keys()
    for label in a["methods"]:
        assert a["methods"][label]["sets"] == b["methods"][label]["sets"], label
        assert a["methods"][label]["average"] == b["methods"][label]["average"], label
    assert a["id_accuracy"] == b["id_accuracy"]
    for kind in ("backbone", "flat", "grouped"):
        assert a["training"][kind]["final_loss"] == b["training"][kind]["final_loss"]


def test_settings_and_recipe():
    s = demo.make_settings("quick")
    assert s.classes == 100 and s.device == "auto"
    assert s.steps(20000) == round(s.epochs * 20000 / s.batch_size)
    cfg = demo.train_config(s, "group", 20000, "unused-out", device="cpu")
    assert cfg.loss == "group" and cfg.model == s.model_name == f"{s.arch}-{s.width}" and cfg.steps == s.steps(20000)
    assert cfg.flip is False and cfg.crop == s.image_size and cfg.eval_resize == s.image_size
    assert list(cfg.milestones) == sorted(cfg.milestones) and cfg.milestones[-1] < cfg.steps
    assert cfg.seed == s.seed and cfg.mixup_alpha == s.mixup
    # stage 2: the flat and the grouped head get the same recipe; only the loss differs
    heads = {
        loss: demo.head_config(s, loss, 20000, "unused-out", "backbone.pt").to_dict() for loss in ("flat", "group")
    }
    assert {k: v for k, v in heads["flat"].items() if k != "loss"} == {
        k: v for k, v in heads["group"].items() if k != "loss"
    }
    h = heads["group"]
    assert h["train_blocks"] == 0 and h["cache_features"] and h["weights"] == "backbone.pt" and h["init"] is None
    assert h["steps"] == round(s.head_epochs * 20000 / s.batch_size) and h["lr"] == s.head_lr
    assert h["head_init"] == "zero" and h["weight_decay"] == 0  # the paper's head recipe
    # stage 1: the whole network from scratch, random head, weight decay
    b = demo.backbone_config(s, 20000, "unused-out")
    assert b.loss == "flat" and b.train_blocks == -1 and b.head_init == "random" and b.init is None
    assert b.weight_decay == s.weight_decay > 0 and b.steps == s.steps(20000) and b.lr == s.lr
    assert demo.make_settings("tiny", classes=5).classes == 5


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(classes=1), "classes"),
        (dict(epochs=0), "epochs"),
        (dict(classes=2, train_per_class=3, batch_size=32), "less than one batch"),
        (dict(device="tpu"), "device"),
        (dict(arch="resnet"), "arch"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(scaling_classes=(1, 10)), "scaling"),
        (dict(nonsense=1), "unknown demo setting"),
    ],
)
def test_bad_settings_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        demo.make_settings("quick", **bad)


def test_command_line_errors(capsys, tmp_path):
    assert demo.main(["--classes", "1", "--out", str(tmp_path)]) == 2
    assert "classes must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--preset", "huge"])
    a = demo.build_parser().parse_args([])
    assert a.preset == "quick" and a.out == "mosx-out"
    s = demo.settings_from_args(
        demo.build_parser().parse_args(["--full", "--classes", "40", "--scaling-classes", "10,20"])
    )
    assert s.classes == 40 and s.width == demo.PRESETS["full"]["width"] and s.scaling_classes == (10, 20)


def test_cuda_request_without_cuda_is_refused(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert demo.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@needs_fonts
def test_scaling_smoke(tmp_path, runs):
    """--scaling at two tiny sizes: one row per size with MSP / Energy / MOS, table, JSON, CSV and plot."""
    data = os.path.join(os.path.dirname(runs[0]), "data")
    out = str(tmp_path / "scaling")
    argv = SMOKE + ["--data-root", data, "--out", out, "--scaling", "--scaling-classes", "4,6"]
    assert demo.main(argv) == 0
    with open(os.path.join(out, "scaling", "scaling.json")) as f:
        res = json.load(f)
    assert [r["classes"] for r in res["rows"]] == [4, 6]
    for r in res["rows"]:
        for label in demo.SCALING_SCORES.values():
            assert 0.0 <= r[label]["fpr95"] <= 1.0
    for name in ("scaling_table.txt", "scaling.csv", "scaling.png"):
        assert os.path.getsize(os.path.join(out, "scaling", name)) > 0


def _unleash_available():
    try:
        demo.check_unleash_available()
        return True
    except demo.DemoError:
        return False


@needs_fonts
def test_unleash_smoke(runs):
    """--unleash on the smoke run's models: b estimated per model, before / UM / UMAP rows."""
    if not _unleash_available():
        pytest.skip("this build of mosx._C lacks the masked_weight op (rebuild: pip install -e .)")
    data = os.path.join(os.path.dirname(runs[1]), "data")
    s = demo.settings_from_args(demo.build_parser().parse_args(SMOKE + ["--data-root", data, "--um-epochs", "0.5"]))
    res = demo.run_unleash(s, runs[1], _results(runs[1]))
    stages = {(r["method"], r["stage"]) for r in res["rows"]}
    for label in ("MSP", "Energy", "MOS"):
        assert {(label, "before"), (label, "UM"), (label, "UMAP")} <= stages
    for kind in ("flat", "grouped"):
        assert res["models"][kind]["flood_level"] > 0
    assert os.path.exists(os.path.join(runs[1], "unleash", "unleash_table.txt"))


@needs_fonts
def test_reuse_finds_only_a_run_with_the_same_settings(runs):
    data = os.path.join(os.path.dirname(runs[0]), "data")
    s = demo.settings_from_args(demo.build_parser().parse_args(SMOKE + ["--data-root", data]))
    prev = demo._previous_run(s, runs[0])
    assert prev is not None and prev["methods"] == _results(runs[0])["methods"]
    other = demo.settings_from_args(demo.build_parser().parse_args(SMOKE + ["--data-root", data, "--seed", "4"]))
    assert demo._previous_run(other, runs[0]) is None
    # Unleashing Mask settings do not change the main run's models: still reused
    um = demo.settings_from_args(demo.build_parser().parse_args(SMOKE + ["--data-root", data, "--um-lr", "0.001"]))
    assert demo._previous_run(um, runs[0]) is not None
    assert demo._previous_run(s, os.path.join(runs[0], "nowhere")) is None
