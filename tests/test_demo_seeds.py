"""`mosx demo --seeds N` and `--um-regime`: the summary statistics against numpy / statistics on
made-up runs, the seed schedule, the per-step training hook, the validation-only selection rule, and
tiny end-to-end runs whose summaries are recomputed from the per-seed files."""

import json
import os
import statistics

import numpy as np
import pytest
import torch
from test_demo import FONTS_INSTALLED, SMOKE, _unleash_available, needs_fonts

import mosx.demo as demo
from mosx.demo import regime, seeds


# ------------------------------------------------------------------------------ summaries
def test_summarize_values_is_mean_and_sample_std():
    rng = np.random.default_rng(0)
    v = rng.normal(size=7).tolist()
    s = seeds.summarize_values(v)
    assert s["mean"] == pytest.approx(statistics.fmean(v), abs=1e-15)
    assert s["std"] == pytest.approx(statistics.stdev(v), rel=1e-12)
    assert s["values"] == v
    assert seeds.summarize_values([0.3])["std"] is None
    with pytest.raises(ValueError, match="no values"):
        seeds.summarize_values([])


def _fake_run(seed, avgs: dict, sets=("a", "b")):
    """A run_demo-shaped dictionary: methods with average AUROC / FPR95 as given."""
    methods = {}
    for label, (auroc, fpr) in avgs.items():
        m = {"auroc": auroc, "fpr95": fpr}
        methods[label] = {
            "model": "grouped" if label == "MOS" else "flat",
            "spec": label.lower(),
            "sets": {o: {"auroc": auroc + 0.01 * i, "fpr95": fpr - 0.01 * i} for i, o in enumerate(sets)},
            "average": m,
            "score_seconds": 0.1,
        }
    return {
        "settings": {"seed": seed, "data_seed": seed + 10},
        "ood_sets": list(sets),
        "methods": methods,
        "id_accuracy": {"flat": 0.9 + 0.01 * seed, "grouped": 0.8},
        "conventions": "c",
    }


def test_summary_counts_wins_and_first_places():
    runs = [
        _fake_run(0, {"MSP": (0.90, 0.30), "MOS": (0.95, 0.20), "Energy": (0.80, 0.50)}),
        _fake_run(1, {"MSP": (0.96, 0.25), "MOS": (0.95, 0.20), "Energy": (0.80, 0.50)}),
        _fake_run(2, {"MSP": (0.90, 0.20), "MOS": (0.94, 0.20), "Energy": (0.99, 0.10)}),
    ]
    s = seeds.summarize(runs)
    assert s["seeds"] == [0, 1, 2] and s["data_seeds"] == [10, 11, 12]
    assert s["methods"]["MSP"]["average"]["auroc"]["mean"] == pytest.approx((0.90 + 0.96 + 0.90) / 3)
    assert s["methods"]["MSP"]["sets"]["b"]["fpr95"]["values"] == pytest.approx([0.29, 0.24, 0.19])
    assert s["id_accuracy"]["flat"]["std"] == pytest.approx(statistics.stdev([0.9, 0.91, 0.92]))
    # MOS beats MSP on FPR95 in seeds 0 and 1 (seed 2 ties: not a win), on AUROC in seeds 0 and 2
    assert s["wins"]["fpr95"]["MOS"]["MSP"] == 2
    assert s["wins"]["auroc"]["MOS"]["MSP"] == 2
    assert s["wins"]["fpr95"]["MSP"]["MOS"] == 0
    assert s["first_place"]["auroc"] == {"MSP": 1, "MOS": 1, "Energy": 1}
    assert s["first_place"]["fpr95"] == {"MSP": 0, "MOS": 2, "Energy": 1}
    # per set: set "b" has fpr95 - 0.01, the same shift for every method, so the same counts
    assert s["set_wins"]["fpr95"]["b"]["MOS"]["MSP"] == 2
    table = seeds.format_seed_table(s)
    assert "MSP in 2/3" in table and "±" in table
    bad = _fake_run(3, {"MSP": (0.9, 0.3)}, sets=("a",))
    with pytest.raises(ValueError, match="different OOD sets"):
        seeds.summarize(runs + [bad])


def test_seed_settings_move_every_seed():
    s = demo.make_settings("tiny", seed=5, data_seed=7)
    t = seeds.seed_settings(s, 2)
    assert (t.seed, t.data_seed) == (7, 9)
    assert (s.seed, s.data_seed) == (5, 7)  # the original is unchanged


# ------------------------------------------------------------------------------ the training hook
def test_train_every_hook_runs_in_eval_mode_at_each_period(tmp_path):
    from mosx.train import make_config, train

    x = torch.randn(64, 6)
    y = torch.arange(64) % 3
    calls = []

    def hook(step, model):
        calls.append((step, model.training, torch.is_grad_enabled()))

    cfg = make_config(
        "cpu-demo", model="identity", loss="flat", steps=7, batch_size=16, warmup_steps=1, milestones=(),
        out=str(tmp_path), device="cpu", progress=False, ckpt_every=0, log_every=1, workers=0,
        mixup_alpha=0.0,
    )  # fmt: skip
    r = train(cfg, data=(x, y), every=(3, hook), log=lambda m: None)
    assert [c[0] for c in calls] == [3, 6, 7]  # every third step and the last
    assert all(not training and not grad for _, training, grad in calls)
    assert r.steps == 7
    with pytest.raises(ValueError, match="every must be"):
        train(cfg, data=(x, y), every=(0, hook))


# ------------------------------------------------------------------------------ the regime's selection
def _cand(val_acc, val_auroc, test_auroc, epoch):
    spec = {"val": {"auroc": val_auroc, "fpr95": 0.5}, "test": {"auroc": test_auroc, "fpr95": 0.5}}
    return {"keep": 0.9, "lr": 0.01, "epoch": epoch, "record": {"val_accuracy": val_acc, "energy": spec}}


def test_selection_reads_validation_only_and_respects_the_accuracy_floor():
    cands = [
        _cand(0.90, 0.70, 0.99, 1),  # best test AUROC: must not matter
        _cand(0.92, 0.80, 0.50, 2),
        _cand(0.80, 0.95, 0.60, 3),  # best validation AUROC but lost too much accuracy
    ]
    assert regime.select(cands, "flat", 0.85)["epoch"] == 2
    assert regime.select(cands, "flat", 0.79)["epoch"] == 3
    assert regime.select(cands, "flat", 0.99) is None


@needs_fonts
def test_train_val_split_is_disjoint_and_sized(tmp_path):
    s = demo.make_settings("tiny", data_root=str(tmp_path / "data"), progress=False)
    bench = demo.load_data(s)
    tr, va = regime.split_train_val(bench, 12, 5, seed=0)
    assert len(tr) == 12 * bench.num_classes and len(va) == 5 * bench.num_classes
    assert torch.bincount(tr.labels).tolist() == [12] * bench.num_classes
    # no image appears in both: compare the raw bytes of every row
    rows = {bytes(im.numpy().tobytes()) for im in tr.images}
    assert not any(bytes(im.numpy().tobytes()) in rows for im in va.images)
    tr2, _ = regime.split_train_val(bench, 12, 5, seed=1)
    assert not torch.equal(tr.images, tr2.images)
    with pytest.raises(demo.DemoError, match="fewer than"):
        regime.split_train_val(bench, 1000, 5, seed=0)


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    if not FONTS_INSTALLED:
        pytest.skip("Noto fonts not installed")
    root = tmp_path_factory.mktemp("seeds")
    out = str(root / "out")
    argv = SMOKE + ["--data-root", str(root / "data"), "--out", out, "--seeds", "2"]
    assert demo.main(argv) == 0
    return out


@needs_fonts
def test_seeds_run_summary_is_the_mean_of_its_seed_files(seed_run):
    per = []
    for i in range(2):
        with open(os.path.join(seed_run, f"seed_{i}", "demo_results.json")) as f:
            per.append(json.load(f))
    assert [p["settings"]["seed"] for p in per] == [3, 4]
    assert [p["settings"]["data_seed"] for p in per] == [0, 1]
    assert per[0]["data"]["key"] != per[1]["data"]["key"]  # another data draw, not only another init
    with open(os.path.join(seed_run, "demo_seeds.json")) as f:
        summ = json.load(f)
    for label, m in summ["methods"].items():
        vals = [p["methods"][label]["average"]["fpr95"] for p in per]
        assert m["average"]["fpr95"]["mean"] == pytest.approx(statistics.fmean(vals))
        assert m["average"]["fpr95"]["std"] == pytest.approx(statistics.stdev(vals))
    for name in ("demo_seeds_table.txt", "demo_seeds.csv", "seeds_average.png"):
        assert os.path.getsize(os.path.join(seed_run, name)) > 0


@needs_fonts
def test_seeds_reuse_skips_finished_seeds(seed_run, capsys):
    data = os.path.join(os.path.dirname(seed_run), "data")
    argv = SMOKE + ["--data-root", data, "--out", seed_run, "--seeds", "2", "--reuse"]
    assert demo.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("--reuse: models of") == 2
    assert "[2/4] training the backbone" not in err


def test_seeds_and_regime_argument_errors(capsys, tmp_path):
    assert demo.main(["--preset", "tiny", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
    assert demo.main(["--preset", "tiny", "--um-regime", "--scaling", "--out", str(tmp_path)]) == 2
    assert "--um-regime is its own experiment" in capsys.readouterr().err


@needs_fonts
def test_um_regime_smoke_and_its_scorer_agrees_with_the_evaluator(tmp_path):
    if not _unleash_available():
        pytest.skip("this build of mosx._C lacks the masked_weight op")
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    argv = ["--preset", "tiny", "--um-regime", "--data-root", data, "--out", out, "--no-progress", "--device", "cpu"]
    assert demo.main(argv) == 0
    rout = os.path.join(out, "um_regime")
    with open(os.path.join(rout, "um_regime.json")) as f:
        res = json.load(f)
    run = res["runs"][0]
    assert res["ood_val"] not in res["ood_test"] and len(res["ood_test"]) == 4
    s = demo.make_settings("tiny", data_root=data)
    for kind in ("flat", "grouped"):
        m = run["models"][kind]
        assert [c["epoch"] for c in m["curve"]] == [1.0, 2.0]
        assert all(c["train_loss"] is not None for c in m["curve"])
        n_grid = len(s.regime_um_keeps) * len(s.regime_um_lrs) * round(s.regime_um_epochs)
        assert len(m["grid"]["UM"]["candidates"]) == n_grid
        for method in ("UM", "UMAP"):
            sel = m["grid"][method]["selected"]
            if sel is not None:  # the tested copy is the model the choice was made on
                spec = regime.PRIMARY[kind]
                assert sel["record"][spec]["val"] == sel["selected_on"][spec]["val"]
                assert "test" in sel["record"][spec] and "test" not in sel["selected_on"][spec]
    # the per-epoch scorer's last record agrees with the evaluator on the saved final model (the
    # evaluator applies the head to cached features, so scores agree to float32 rounding, not bitwise,
    # and a near-tie among 40-image OOD sets may swap: metrics to 1%)
    from mosx.evaluate import evaluate
    from mosx.models import load_model

    bench = demo.load_data(s)
    model, _ = load_model(os.path.join(rout, "seed_0", "train_flat", "model.pt"))
    ood = {k: v for k, v in bench.ood.items() if k in res["ood_test"]}
    ev = evaluate(
        model, bench.test, ood, scores=["msp", "energy"], device="cpu", precision="fp32", plots=False,
        progress=False, verbose=False, workers=0, out_dir=str(tmp_path / "ev"),
    )  # fmt: skip
    final = run["models"]["flat"]["final"]
    assert final["test_accuracy"] == pytest.approx(ev.id_accuracy, abs=1e-9)
    model.eval()
    scorer = regime._Scorer("flat", None, bench.test, bench.ood[res["ood_val"]], bench.test, ood)
    mine = scorer._scores(scorer._logits(model, bench.test.images))
    for spec in ("msp", "energy"):
        ref = torch.as_tensor(ev.scores[spec]["id"], dtype=torch.float64)
        torch.testing.assert_close(mine[spec], ref, rtol=1e-4, atol=1e-4)
        assert final[spec]["test"]["auroc"] == pytest.approx(ev.averages[spec]["auroc"], abs=0.01)
        assert final[spec]["test"]["fpr95"] == pytest.approx(ev.averages[spec]["fpr_at_tpr"], abs=0.01)
    for name in ("um_regime_table.txt", "um_regime.csv", "um_regime_curves.png"):
        assert os.path.getsize(os.path.join(rout, name)) > 0


@needs_fonts
def test_scaling_over_seeds_bands_and_reuse(tmp_path, capsys):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    argv = SMOKE + ["--data-root", data, "--out", out, "--scaling", "--scaling-classes", "4,6", "--seeds", "2"]
    assert demo.main(argv) == 0
    per = []
    for i in range(2):
        with open(os.path.join(out, f"seed_{i}", "scaling", "scaling.json")) as f:
            per.append(json.load(f))
    with open(os.path.join(out, "scaling", "scaling_seeds.json")) as f:
        summ = json.load(f)
    assert [r["classes"] for r in summ["rows"]] == [4, 6]
    for j, row in enumerate(summ["rows"]):
        vals = [p["rows"][j]["MOS"]["fpr95"] for p in per]
        assert row["MOS"]["fpr95"]["values"] == vals
        assert row["MOS"]["fpr95"]["std"] == pytest.approx(statistics.stdev(vals))
    assert os.path.getsize(os.path.join(out, "scaling", "scaling_seeds.png")) > 0
    capsys.readouterr()
    assert demo.main(argv + ["--reuse"]) == 0  # both seeds finished: nothing is trained again
    err = capsys.readouterr().err
    assert err.count("--reuse: scaling results of") == 2 and "training the backbone" not in err


def test_font_dir_the_missing_fonts_message_names_exists(tmp_path, capsys):
    """The missing-fonts message tells the user to pass --font-dir: mosx demo has that flag."""
    missing = str(tmp_path / "no-fonts")
    argv = ["--preset", "tiny", "--font-dir", missing, "--data-root", str(tmp_path / "d"), "--out", str(tmp_path)]
    assert demo.main(argv) == 2
    err = capsys.readouterr().err
    assert missing in err and "--font-dir" in err
    assert demo.build_parser().parse_args(["--font-dir", missing]).font_dir == missing


def test_two_demos_on_one_out_folder_do_not_mix(tmp_path, capsys):
    import socket
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "out"
        out.mkdir()
        (out / ".mosx.lock").write_text(f"{other.pid}\n{socket.gethostname()}\n")
        assert demo.main(["--preset", "tiny", "--out", str(out), "--data-root", str(tmp_path / "d")]) == 2
        assert f"another mosx demo run (pid {other.pid}" in capsys.readouterr().err
        assert sorted(os.listdir(out)) == [".mosx.lock"]
    finally:
        other.kill()
        other.wait()
