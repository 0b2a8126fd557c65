"""The evaluator's validation search (`mosx eval --search`): it chooses what mosx.scores.search
chooses on the same cached validation logits, scores the test sets with the chosen scorer, records
the search, and refuses a validation set that is also a test set."""

import glob
import json
import math
import os

import numpy as np
import pytest
import torch
from test_evaluate import SIZE, _png, common, net

from mosx import evaluate as E
from mosx import scores as S
from mosx.evaluate.cache import load_cache


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Tiny, disjoint image folders: ID test (class folders), an OOD test set, fit data, ID and OOD
    validation sets."""
    root = tmp_path_factory.mktemp("searchdata")
    rng = np.random.default_rng(1)
    colours = {"cat": (200, 40, 40), "dog": (40, 200, 40), "eel": (40, 40, 200)}
    for c, rgb in colours.items():
        for folder in ("id", "fit"):
            os.makedirs(root / folder / c)
            for i in range(4):
                _png(root / folder / c / f"{i}.png", rgb, rng)
    os.makedirs(root / "val_id")
    for i, rgb in enumerate(list(colours.values()) * 3):
        _png(root / "val_id" / f"{i}.png", rgb, rng)
    # other file names: same-named noise images of one size would make identical file lists
    for folder, rgb, stem in (("far", (128, 128, 128), "t"), ("val_ood", (140, 120, 110), "v")):
        os.makedirs(root / folder)
        for i in range(8):
            _png(root / folder / f"{stem}{i}.png", rgb, rng)
    return root


def cached(out, name):
    """The evaluator's cache of one set (all images readable), as score_all takes it."""
    (path,) = glob.glob(os.path.join(out, "cache", f"{name}-*"))
    c = load_cache(path)
    assert c.ok.all()
    return {"logits": c.logits, "features": c.features}


def test_search_chooses_what_search_chooses_and_scores_with_it(sets, tmp_path):
    model = net()
    search = {"id": str(sets / "val_id"), "ood": str(sets / "val_ood")}
    scores = ["msp", "gen", "react-energy"]
    res = E.evaluate(
        model,
        str(sets / "id"),
        {"far": str(sets / "far")},
        scores=scores,
        fit_data=str(sets / "fit"),
        search=search,
        plots=False,
        **common(tmp_path),
    )
    assert list(res.search) == scores and res.search["msp"] is None  # nothing to search: as given
    default = S.GEN()  # these data choose other values, so the score check below sees the replacement
    assert res.search["gen"]["params"] != {"gamma": default.gamma, "M": default.M}
    out = str(tmp_path / "out")
    head = S.linear_head(model)
    idv, oodv = cached(out, "val_id"), cached(out, "val_ood")
    fit = {**cached(out, "fit"), "head": head}
    test_sets = {"id": str(sets / "id"), "far": str(sets / "far")}
    for m in ("gen", "react-energy"):
        direct = S.search(
            S.build_scorer(m),
            {**idv, "head": head},
            {"ood": {**oodv, "head": head}},
            "fpr95",
            test_sets=test_sets,
            val_sets=search,
            fit_data=fit,
        )
        rec = res.search[m]
        assert rec["params"] == direct.params and rec["value"] == direct.value and rec["metric"] == "fpr95"
        assert [g["value"] for g in rec["grid"]] == [g["value"] for g in direct.grid]
        assert len(rec["grid"]) == math.prod(len(v) for v in S.build_scorer(m).search_space().values())
        assert rec["val_sets"] == direct.val_sets
        for name in ("id", "far"):  # the test sets are scored by the chosen (fitted) scorer
            want = S.score_all({"s": direct.scorer}, {**cached(out, name), "head": head})["s"]
            np.testing.assert_array_equal(res.scores[m][name], want.numpy())
    # msp was not touched
    msp = S.score_all({"s": S.MSP()}, cached(out, "far"))["s"]
    np.testing.assert_array_equal(res.scores["msp"]["far"], msp.numpy())
    lines = res.summary().splitlines()
    chosen = ", ".join(f"{k}={v}" for k, v in res.search["gen"]["params"].items())
    assert any(ln.startswith(f"gen: chose {chosen} on validation fpr95") for ln in lines)
    assert "msp: no hyperparameters to search, scored as given" in lines
    # the record lands in results.json
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["search"]["gen"]["params"] == res.search["gen"]["params"] and doc["search"]["msp"] is None
    assert doc["search"]["react-energy"]["value"] == pytest.approx(res.search["react-energy"]["value"])
    assert set(doc["search"]["gen"]["val_sets"]) == {"id", "ood"}


def cli(sets, out, *extra):
    model_file = out.parent / f"{out.name}-model.pt"
    torch.save(net(), model_file)
    return E.main(
        [
            "--model",
            str(model_file),
            "--trust-pickle",
            "--id",
            str(sets / "id"),
            "--ood",
            f"far={sets / 'far'}",
            "--scores",
            "msp,gen",
            "--out",
            str(out),
            "--image-size",
            str(SIZE),
            "--workers",
            "0",
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--no-progress",
            "--no-plots",
            *extra,
        ]
    )


def test_cli_search_writes_the_record(sets, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli(sets, out, "--search", f"id={sets / 'val_id'},ood={sets / 'val_ood'}", "--search-metric", "auroc") == 0
    printed = capsys.readouterr().out
    assert "gen: chose gamma=" in printed and "on validation auroc" in printed
    doc = json.loads((out / "results.json").read_text())
    rec = doc["search"]["gen"]
    assert rec["metric"] == "auroc" and rec["value"] == max(g["value"] for g in rec["grid"])
    assert doc["search"]["msp"] is None and "val:ood" in doc["images_scored"]


def test_a_validation_set_that_is_a_test_set_is_refused(sets, tmp_path, capsys):
    model = net()
    with pytest.raises(ValueError, match="validation set 'ood' is also test set 'far'"):
        E.evaluate(
            model,
            str(sets / "id"),
            {"far": str(sets / "far")},
            scores=["gen"],
            search={"id": str(sets / "val_id"), "ood": str(sets / "far")},
            **common(tmp_path),
        )
    assert model.calls == 0  # refused before the backbone ran
    with pytest.raises(ValueError, match="validation set 'id' is also test set 'id'"):
        E.evaluate(
            model,
            str(sets / "id"),
            {"far": str(sets / "far")},
            scores=["gen"],
            search={"id": str(sets / "id" / "cat"), "ood": str(sets / "val_ood")},  # inside the ID test set
            **common(tmp_path),
        )
    assert cli(sets, tmp_path / "c", "--search", f"id={sets / 'val_id'}", "--search", f"ood={sets / 'far'}") == 2
    err = capsys.readouterr().err
    assert err.startswith("mosx eval: search: validation set 'ood' is also test set 'far'")


class SearchedODIN(S.ODIN):
    def search_space(self):
        return {"temperature": [1.0, 10.0], "eps": [0.0, 0.01]}


def test_bad_search_settings_are_clear_errors(sets, tmp_path, capsys):
    val = f"id={sets / 'val_id'}"
    for bad, msg in (
        (["--search", str(sets / "val_id")], "--search expects NAME=PATH"),
        (["--search", "id="], "--search expects NAME=PATH"),
        (["--search", f"{val},{val}"], "'id' given twice"),
        (["--search", f"ood={sets / 'val_ood'}"], "needs the ID validation set as 'id'"),
        (["--search", val], "at least one OOD"),
    ):
        assert cli(sets, tmp_path / "bad", *bad) == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(sets, tmp_path / "bad", "--search", val, "--search-metric", "fpr90")
    args = E.build_parser().parse_args(
        ["--model", "m", "--id", "i", "--out", "o", "--search", "id=a,b", "--search", "ood=c,x=d,"]
    )
    assert E.config_from_args(args).search == {"id": "a,b", "ood": "c", "x": "d"}  # a path may hold a comma
    ok = {"id": str(sets / "val_id"), "ood": str(sets / "val_ood")}
    run = lambda **kw: E.evaluate(net(), str(sets / "id"), {"far": str(sets / "far")}, **common(tmp_path), **kw)
    with pytest.raises(ValueError, match="search_metric"):
        run(scores=["gen"], search=ok, search_metric="fpr90")
    with pytest.raises(ValueError, match="cannot search scorer .* perturbs the input"):
        run(scores=[SearchedODIN()], search=ok)
    with pytest.raises(ValueError, match="validation set 'ood' is empty|no images found"):
        os.makedirs(tmp_path / "nothing", exist_ok=True)
        run(scores=["gen"], search={**ok, "ood": str(tmp_path / "nothing")})
