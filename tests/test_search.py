"""mosx.scores.search: the grid search on validation data, and its refusal to search on test sets."""

import shutil

import numpy as np
import pytest
import torch

from mosx import metrics as M
from mosx import scores as S


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def shaped_sets(gen, n=300, d=16, c=5):
    """ID and OOD feature sets under one head; OOD has a few large activations (ReAct's premise)."""
    head = S.LinearHead(rand(gen, c, d), rand(gen, c))
    f_id = (rand(gen, n, d) + 0.5).relu()
    f_ood = (rand(gen, n, d) * 0.5).relu()
    f_ood[:, :3] += rand(gen, n, 3).abs() * 4
    return head, f_id, f_ood


def test_search_picks_the_best_grid_point(gen):
    head, f_id, f_ood = shaped_sets(gen)
    scorer = S.ASH(S.Energy(), "p", head=head)
    res = S.search(scorer, {"features": f_id, "head": head}, {"features": f_ood, "head": head}, test_sets={})
    grid = [65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0]
    assert [r["params"] for r in res.grid] == [{"percentile": p} for p in grid]
    direct = [
        M.fpr_at_tpr(
            S.ASH(S.Energy(), "p", p, head=head).score(features=f_id),
            S.ASH(S.Energy(), "p", p, head=head).score(features=f_ood),
        )
        for p in grid
    ]
    assert [r["value"] for r in res.grid] == pytest.approx(direct, abs=1e-12)
    best = int(np.argmin(direct))  # first of the minima
    assert res.params == {"percentile": grid[best]} and res.value == pytest.approx(direct[best])
    assert isinstance(res.scorer, S.ASH) and res.scorer.percentile == grid[best] and scorer.percentile == 90.0
    assert res.metric == "fpr95" and res.as_dict()["params"] == res.params
    assert set(res.val_sets) == {"id", "ood"} and all(v.startswith("data:") for v in res.val_sets.values())
    # auroc: highest wins; several OOD sets: the mean
    res2 = S.search(
        scorer,
        {"features": f_id, "head": head},
        {"a": {"features": f_ood, "head": head}, "b": {"features": f_ood[:100], "head": head}},
        metric="auroc",
        grid={"percentile": [70, 95], "variant": ["p", "s"]},
        test_sets={},
    )
    assert len(res2.grid) == 4
    for row in res2.grid:
        s = scorer.replace(**row["params"])
        want = np.mean([M.auroc(s.score(features=f_id), s.score(features=o)) for o in (f_ood, f_ood[:100])])
        assert row["value"] == pytest.approx(want, abs=1e-12)
    assert res2.value == max(r["value"] for r in res2.grid)


def test_fitted_scorers_are_refitted_at_every_point(gen):
    head, f_id, f_ood = shaped_sets(gen)
    f_fit = (rand(gen, 500, 16) + 0.5).relu()
    r = S.ReAct(S.Energy(), head=head).fit(features=f_fit)
    with pytest.raises(ValueError, match="fit_data"):
        S.search(r, {"features": f_id}, {"features": f_ood}, test_sets={})
    res = S.search(r, {"features": f_id}, {"features": f_ood}, fit_data={"features": f_fit}, test_sets={})
    p = res.params["percentile"]
    assert res.scorer.threshold == pytest.approx(np.percentile(f_fit.numpy(), p), abs=1e-12)
    for row in res.grid:  # every point scored with its own threshold
        s = S.ReAct(S.Energy(), row["params"]["percentile"], head=head).fit(features=f_fit)
        assert row["value"] == pytest.approx(M.fpr_at_tpr(s.score(features=f_id), s.score(features=f_ood)), abs=1e-12)
    # the wrapped scorer's grid joins as base.<name>
    d = S.search(
        S.DICE(S.Energy(), head=head),
        {"features": f_id},
        {"features": f_ood},
        grid={"percentile": [30, 70], "base.temperature": [1.0, 2.0]},
        fit_data={"features": f_fit},
        test_sets={},
    )
    assert {(g["params"]["percentile"], g["params"]["base.temperature"]) for g in d.grid} == {
        (30, 1.0),
        (30, 2.0),
        (70, 1.0),
        (70, 2.0),
    }
    assert d.scorer.base.temperature == d.params["base.temperature"]


def test_eps_is_searched_by_select_eps(gen):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4)).double().eval()
    x_id, x_ood = rand(gen, 30, 3, 2, 2) + 1, rand(gen, 30, 3, 2, 2)
    with torch.no_grad():
        z_id, z_ood = net(x_id), net(x_ood)
    grid = {"temperature": [1.0, 1000.0], "eps": [0.0, 0.01, 0.05]}
    res = S.search(
        S.ODIN(),
        {"logits": z_id, "inputs": x_id},
        {"logits": z_ood, "inputs": x_ood},
        grid=grid,
        model=net,
        test_sets={},
    )
    assert len(res.grid) == 6
    for row in res.grid:
        p = row["params"]
        _, direct = S.select_eps(lambda e: S.ODIN(p["temperature"], e), net, x_id, x_ood, [p["eps"]])
        assert row["value"] == pytest.approx(direct[0][1].fpr_at_tpr, abs=1e-12)
    assert (res.scorer.temperature, res.scorer.eps) == (res.params["temperature"], res.params["eps"])
    with pytest.raises(ValueError, match="model"):
        S.search(S.ODIN(), {"logits": z_id}, {"logits": z_ood}, grid=grid, test_sets={})


def make_images(folder, names, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for n in names:
        (folder / n).write_bytes(b"\x89PNG" + rng.bytes(50 + len(n)))
    return folder


def test_refuses_a_validation_set_that_is_a_test_set(gen, tmp_path):
    head, f_id, f_ood = shaped_sets(gen, n=50)
    idv, oodv = {"features": f_id, "head": head}, {"features": f_ood, "head": head}
    scorer = S.ASH(head=head)
    val = make_images(tmp_path / "val", ["a.png", "b.png"], 0)
    ood_val = make_images(tmp_path / "ood_val", ["c.png", "d.png"], 1)
    test = make_images(tmp_path / "test", ["e.png", "f.png"], 2)

    def run(test_sets, val_sets=None):
        return S.search(
            scorer,
            idv,
            oodv,
            grid={"percentile": [90]},
            test_sets=test_sets,
            val_sets=val_sets or {"id": str(val), "ood": str(ood_val)},
        )

    assert run({"inat": str(test)}).params == {"percentile": 90}  # disjoint sets: fine
    with pytest.raises(ValueError, match="'ood' is also test set 'inat'"):
        run({"inat": str(ood_val)})  # the same path
    with pytest.raises(ValueError, match="share 2 file"):
        run({"inat": str(tmp_path)})  # a folder holding the validation folder
    (tmp_path / "val" / "empty").mkdir()
    with pytest.raises(ValueError, match="overlap"):
        S.search(
            scorer,
            idv,
            oodv,
            grid={"percentile": [90]},
            test_sets={"t": str(val / "empty")},
            val_sets={"id": str(tmp_path / "val"), "ood": str(ood_val)},
        )
    listing = tmp_path / "test.txt"
    listing.write_text(f"{val / 'b.png'}\n{test / 'e.png'}\n")
    with pytest.raises(ValueError, match="share 1 file"):
        run({"list": str(listing)})  # a list file naming a validation image
    with pytest.raises(ValueError, match="share"):
        run({"files": [str(test / "e.png"), str(val / "a.png")]})
    shutil.copytree(val, tmp_path / "copy")
    with pytest.raises(ValueError, match="identical file lists"):
        run({"copy": str(tmp_path / "copy")})
    (tmp_path / "renamed").mkdir()
    shutil.copy(ood_val / "c.png", tmp_path / "renamed" / "zz.png")
    with pytest.raises(ValueError, match="identical content"):
        run({"renamed": str(tmp_path / "renamed")})
    with pytest.raises(ValueError, match="same fingerprint"):
        run({"inat": S.fingerprint(str(tmp_path / "copy"))})
    # identities by data: the default val_sets are the validation data themselves
    with pytest.raises(ValueError, match="identical array"):
        S.search(scorer, idv, oodv, grid={"percentile": [90]}, test_sets={"t": {"features": f_ood}})
    S.search(scorer, idv, oodv, grid={"percentile": [90]}, test_sets={"t": {"features": f_ood + 1}})
    with pytest.raises(ValueError, match="cannot compare"):
        S.search(scorer, idv, oodv, grid={"percentile": [90]}, test_sets={"t": str(test)})
    with pytest.raises(ValueError, match="val_sets must name 2"):
        run({"t": str(test)}, val_sets={"id": str(val)})
    with pytest.raises(TypeError, match="test_sets"):
        S.search(scorer, idv, oodv)
    with pytest.raises(ValueError, match="metric"):
        S.search(scorer, idv, oodv, metric="fpr90", test_sets={})


def test_odin_search_space_is_the_papers_grid(gen):
    """ODIN's temperature grid searched from cached logits (eps = 0 stays unperturbed); the chosen
    point is the best of a direct loop over the same grid."""
    assert S.ODIN().search_space() == {"temperature": [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]}
    assert S.ODIN(eps=0.001).search_space()["eps"] == list(S.ODIN_EPS_GRID)
    z_id, z_ood = rand(gen, 40, 6) * 3, rand(gen, 40, 6)
    res = S.search(S.ODIN(), {"logits": z_id}, {"logits": z_ood}, metric="auroc", test_sets={})
    direct = {
        T: M.ood_metrics(S.ODIN(T).score(logits=z_id), S.ODIN(T).score(logits=z_ood)).auroc
        for T in S.ODIN().search_space()["temperature"]
    }
    best = max(direct.values())
    assert res.value == pytest.approx(best, abs=1e-12) and res.scorer.eps == 0
    assert res.params["temperature"] == next(T for T, v in direct.items() if v == best)


def test_grid_points_the_fit_data_cannot_support_are_recorded_not_chosen(gen):
    """knn's grid goes to k = 1000; with 30 fit rows the larger k are skipped with their reason."""
    f_fit, f_id, f_ood = rand(gen, 30, 5), rand(gen, 20, 5), rand(gen, 20, 5) + 2
    res = S.search(S.KNN(), {"features": f_id}, {"features": f_ood}, fit_data={"features": f_fit}, test_sets={})
    ks = S.KNN().search_space()["k"]
    skipped = [r["params"]["k"] for r in res.grid if "skipped" in r]
    assert skipped == [k for k in ks if k > 30] and all(r["value"] is None for r in res.grid if "skipped" in r)
    assert res.params["k"] <= 30 and res.value is not None
    with pytest.raises(ValueError, match="no grid point of knn could be fitted"):
        S.search(S.KNN(), {"features": f_id}, {"features": f_ood}, fit_data={"features": f_fit[:0]}, test_sets={})
