"""The multi-layer Mahalanobis detector (mosx.scores.layers) against direct float64 implementations
of the paper's formulas (loops over samples, layers and classes on purpose, submodules called by
hand), scikit-learn's covariance and logistic regression, and the MOS reference's tuning protocol
(regression on the first m validation images, eps on the next m, FGSM "OOD" samples)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mosx import scores as S
from mosx.metrics import ood_metrics
from mosx.scores import layers as L

sk_cov = pytest.importorskip("sklearn.covariance")


class StemStages(nn.Module):
    """A stem and three stages (tanh: smooth, so input gradients are rarely exactly 0), 16x16 inputs."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Tanh())
        self.stages = nn.Sequential(
            nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.Tanh()),
            nn.Sequential(nn.Conv2d(5, 6, 3, stride=2, padding=1), nn.Tanh()),
            nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.Tanh()),
        )
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def model(gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    return StemStages().double().eval()


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def by_hand(net, x):
    """The pooled stem and stage outputs, calling the submodules one by one."""
    h = net.stem(x)
    out = [h.mean((2, 3))]
    for stage in net.stages:
        h = stage(h)
        out.append(h.mean((2, 3)))
    return out


def gaussians(feats, y):
    """Per layer: class means and the inverse of the tied covariance, by NumPy (full rank)."""
    out = []
    for f in feats:
        f, yn = f.detach().numpy(), y.numpy()
        means = np.stack([f[yn == c].mean(0) for c in range(int(yn.max()) + 1)])
        cov = sum(np.outer(a - means[c], a - means[c]) for a, c in zip(f, yn)) / len(f)
        out.append((torch.tensor(means), torch.tensor(np.linalg.inv(cov))))
    return out


@pytest.fixture
def fitted(gen):
    net = model(gen)
    x, y = rand(gen, 60, 3, 16, 16), torch.arange(60) % 3
    return net, x, y, S.MahalanobisLayers().fit(inputs=x, labels=y, model=net)


# ------------------------------------------------------------------------------ layer features
def test_layer_features_equal_the_submodules_called_by_hand(gen):
    net, x = model(gen), rand(gen, 5, 3, 16, 16)
    names = L.default_layers(net)
    assert names == ["stem", "stages.0", "stages.1", "stages.2"]
    got = L.layer_features(net, x, names)
    for g, w in zip(got, by_hand(net, x)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-14)
    assert [f.shape for f in got] == [(5, 4), (5, 5), (5, 6), (5, 6)]
    # a subset, in the order asked, from one pass that stops after the last of them
    net.head.register_forward_hook(lambda *a: pytest.fail("the forward went past the last layer"))
    torch.testing.assert_close(L.layer_features(net, x, ["stages.1", "stem"])[1], got[0])


def test_pooling_of_token_and_flat_outputs_and_guessed_layers(gen):
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.fc = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):  # x: [N, T, 4]
            t = self.proj(x)
            return self.fc(t.mean(1))

    net, x = Tokens().double(), rand(gen, 3, 7, 4)
    tok, flat = L.layer_features(net, x, ["proj", "fc"])
    torch.testing.assert_close(tok, net.proj(x).mean(1))  # [N, T, C] -> mean over T
    torch.testing.assert_close(flat, net(x))  # 2-D as is

    class TorchvisionLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.maxpool = nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)
            self.layer1, self.layer2, self.fc = nn.Identity(), nn.Identity(), nn.Linear(4, 2)

    assert L.default_layers(TorchvisionLike()) == ["maxpool", "layer1", "layer2"]
    from mosx.models import build_model

    cnn, _ = build_model("small-cnn-8", 3)  # mosx's Classifier around its SmallCNN: no separate stem
    assert L.default_layers(cnn) == [f"backbone.stages.{i}" for i in range(4)]


# ------------------------------------------------------------------------------ layer scores
def test_unperturbed_layer_scores_equal_the_formula(gen, fitted):
    net, x, y, s = fitted
    assert s.layer_names == ["stem", "stages.0", "stages.1", "stages.2"]
    x_test = rand(gen, 9, 3, 16, 16)
    got = s.layer_scores(x_test, model=net)
    assert got.shape == (9, 4) and got.dtype == torch.float64
    feats, test_feats = by_hand(net, x), by_hand(net, x_test)
    for layer, ((means, prec), ft) in enumerate(zip(gaussians(feats, y), test_feats)):
        want = [-min(float((f - mu) @ prec @ (f - mu)) for mu in means) for f in ft.detach()]
        np.testing.assert_allclose(got[:, layer], want, rtol=1e-9, atol=1e-9)
        # second formulation: the reference's route, sklearn's EmpiricalCovariance on class-centred
        # features, its precision_ and the -0.5 factor (which only rescales)
        f, yn = feats[layer].detach().numpy(), y.numpy()
        centred = f - means.numpy()[yn]
        emp = sk_cov.EmpiricalCovariance(assume_centered=False).fit(centred)
        z = ft.detach().numpy()[:, None, :] - means.numpy()[None]
        gauss = -0.5 * np.einsum("ncd,de,nce->nc", z, emp.precision_, z)
        np.testing.assert_allclose(got[:, layer], 2 * gauss.max(1), rtol=1e-8, atol=1e-8)
    # batching does not change anything
    torch.testing.assert_close(s.layer_scores(x_test, net, batch_size=4), got, rtol=0, atol=1e-12)


def test_perturbation_matches_autograd_per_layer(gen, fitted):
    net, x, y, s = fitted
    eps = 0.01
    x_test = rand(gen, 6, 3, 16, 16)
    net.train()  # the scorer evaluates in eval mode and restores the mode
    got = s.replace(eps=eps).layer_scores(x_test, net)
    assert net.training
    net.eval()
    stats = gaussians(by_hand(net, x), y)
    for i, xi in enumerate(x_test):
        for layer, (means, prec) in enumerate(stats):
            xg = xi[None].clone().requires_grad_(True)
            f = by_hand(net, xg)[layer][0]
            d = torch.stack([(f - mu) @ prec @ (f - mu) for mu in means]).min()  # d_l(x)
            (g,) = torch.autograd.grad(d, xg)
            x_t = xg.detach() - eps * torch.sign(g)  # x_l = x - eps sign(grad_x d_l(x))
            f_t = by_hand(net, x_t)[layer][0].detach()
            want = -min(float((f_t - mu) @ prec @ (f_t - mu)) for mu in means)
            np.testing.assert_allclose(float(got[i, layer]), want, rtol=1e-8, atol=1e-9)
    assert not torch.allclose(got, s.layer_scores(x_test, net))  # the perturbation matters


# ------------------------------------------------------------------------------ regression
def test_regression_is_sklearns_decision_function_and_the_references_order(gen, fitted):
    from sklearn.linear_model import LogisticRegressionCV

    net, x, y, s = fitted
    id_x, ood_x, test_x = rand(gen, 40, 3, 16, 16), rand(gen, 40, 3, 16, 16) * 2.5 + 0.5, rand(gen, 30, 3, 16, 16)
    s.fit_regression(net, id_x, ood_x)
    # an independent regression on the formula's layer scores, the reference's values (-0.5 d) as inputs
    stats = gaussians(by_hand(net, x), y)

    def reference_scores(xs):
        cols = []
        for (means, prec), ft in zip(stats, by_hand(net, xs)):
            z = ft.detach()[:, None, :] - means[None]
            cols.append((-0.5 * torch.einsum("ncd,de,nce->nc", z, prec, z)).amax(1))
        return torch.stack(cols, 1).numpy()

    train = np.concatenate([reference_scores(id_x), reference_scores(ood_x)])
    kw = dict(Cs=10, cv=5, scoring="accuracy", solver="lbfgs", max_iter=100)
    params = LogisticRegressionCV().get_params()
    if isinstance(params.get("l1_ratios"), str):  # scikit-learn >= 1.8: L2 is l1_ratios=(0,)
        kw.update(l1_ratios=(0.0,), use_legacy_attributes=False)
    reg = LogisticRegressionCV(**kw).fit(train, np.r_[np.zeros(40), np.ones(40)])
    got = s.score(inputs=test_x, model=net)
    want = -reg.decision_function(reference_scores(test_x))  # log-odds of ID
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(s.regressor.coef_, reg.coef_, rtol=1e-6, atol=1e-8)
    # the reference's score -P(OOD) orders the samples the same way (where it has no ties)
    ref = -reg.predict_proba(reference_scores(test_x))[:, 1]
    np.testing.assert_allclose(1 / (1 + np.exp(-got.numpy())), 1 + ref, rtol=1e-7, atol=1e-9)
    i, j = np.triu_indices(len(ref), 1)
    keep = ref[i] != ref[j]
    assert keep.sum() > 100
    np.testing.assert_array_equal(np.sign(got.numpy()[i] - got.numpy()[j])[keep], np.sign(ref[i] - ref[j])[keep])
    # score_all passes the model through; higher = more ID on these data
    out = S.score_all({"m": s}, {"inputs": test_x, "model": net}, batch_size=7)["m"]
    torch.testing.assert_close(out, got, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------ FGSM and tuning
def test_adversarial_inputs_equal_fgsm_by_hand(gen):
    net, x, y = model(gen), rand(gen, 7, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    want = []
    for xi, yi in zip(x, y):
        xi = xi[None].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(net(xi), yi[None]), xi)
        want.append(xi.detach()[0] + 0.05 * torch.sign(g[0]))  # x + 0.05 sign(grad_x CE)
    want = torch.stack(want)
    torch.testing.assert_close(L.adversarial_inputs(net, x, y), want, rtol=0, atol=1e-15)
    torch.testing.assert_close(L.adversarial_inputs(net, x, y, batch_size=3), want, rtol=0, atol=1e-15)
    clamped = L.adversarial_inputs(net, x, y, clamp=(0.0, 1.0))  # the reference's clamp, when asked
    torch.testing.assert_close(clamped, want.clamp(0, 1), rtol=0, atol=0)
    assert want.min() < 0 and clamped.min() == 0


def test_tuning_reads_only_the_first_2m_validation_samples_and_matches_the_protocol(gen):
    net, m = model(gen), 10
    x_fit, y_fit = rand(gen, 45, 3, 16, 16), torch.arange(45) % 3
    x_val, y_val = rand(gen, 2 * m, 3, 16, 16), torch.arange(2 * m) % 3

    def batches(x, y, size, poison_after=None):  # an iterable of (x, y) batches; fails if read too far
        for lo in range(0, len(x), size):
            yield x[lo : lo + size], y[lo : lo + size]
        if poison_after is not None:
            pytest.fail("read past the first 2m validation samples")

    res = L.tune_mahalanobis_layers(net, batches(x_fit, y_fit, 10), batches(x_val, y_val, 8, True), m=m, batch_size=10)
    grid = list(L.MAHALANOBIS_LAYERS_EPS_GRID)
    assert [r["params"]["eps"] for r in res.grid] == grid and res.params["eps"] in grid
    assert res.scorer.eps == res.params["eps"] and res.scorer.ready and res.metric == "fpr95"
    fprs = [r["value"] for r in res.grid]
    assert res.value == min(fprs) and grid[fprs.index(min(fprs))] == res.params["eps"]  # ties: earliest
    # extra rows past 2m (NaN: they would poison any score) change nothing
    padded = torch.cat([x_val, torch.full((5, 3, 16, 16), float("nan"), dtype=torch.float64)])
    some = (0.0, 0.005)  # (each point costs a LogisticRegressionCV, about 0.5 s here)
    again = L.tune_mahalanobis_layers(
        net, x_fit, padded, torch.cat([y_val, torch.zeros(5, dtype=torch.long)]), some, m, fit_labels=y_fit
    )
    assert [r["value"] for r in again.grid] == [fprs[grid.index(e)] for e in some]
    # by hand: statistics, FGSM halves, a regression per eps, FPR95 on the second half
    s = S.MahalanobisLayers().fit(inputs=x_fit, labels=y_fit, model=net)
    adv = [L.adversarial_inputs(net, x_val[h], y_val[h]) for h in (slice(0, m), slice(m, None))]
    for row in (r for r in res.grid if r["params"]["eps"] in some):
        t = s.replace(eps=row["params"]["eps"]).fit_regression(net, x_val[:m], adv[0])
        r = ood_metrics(t.score(inputs=x_val[m:], model=net), t.score(inputs=adv[1], model=net))
        assert row["metrics"]["fgsm"]["fpr_at_tpr"] == pytest.approx(r.fpr_at_tpr, abs=1e-12)
        assert row["metrics"]["fgsm"]["auroc"] == pytest.approx(r.auroc, abs=1e-9)


# ------------------------------------------------------------------------------ errors, registry
def test_clear_errors(gen, fitted, monkeypatch):
    net, x, y, s = fitted
    with pytest.raises(RuntimeError, match=r"call fit\(\.\.\.\)"):
        S.MahalanobisLayers().score(inputs=x[:2], model=net)
    with pytest.raises(RuntimeError, match=r"call fit\(inputs=\.\.\., labels=\.\.\., model=\.\.\.\)"):
        S.MahalanobisLayers().layer_scores(x[:2], net)
    with pytest.raises(RuntimeError, match=r"call fit_regression\(model, id_inputs, ood_inputs\)"):
        s.score(inputs=x[:2], model=net)
    s.fit_regression(net, x[:20], x[20:40] * 3)
    with pytest.raises(RuntimeError, match="fitted at eps=0.0, the scorer has eps=0.01"):
        s.replace(eps=0.01).score(inputs=x[:2], model=net)
    with pytest.raises(RuntimeError, match=r"call fit\("):  # other layers: the statistics must be refitted
        s.replace(layers=["stem"]).layer_scores(x[:2], net)
    assert "MahalanobisLayers(eps=0.0, regularization=0.0, layers=None" in repr(s)
    with pytest.raises(ValueError, match="has no submodule 'stages.9'"):
        S.MahalanobisLayers(layers=["stem", "stages.9"]).fit(inputs=x, labels=y, model=net)
    with pytest.raises(ValueError, match=r"fit has 60 inputs but labels of shape \(59,\)"):
        S.MahalanobisLayers().fit(inputs=x, labels=y[:59], model=net)
    with pytest.raises(ValueError, match="fit needs `labels`"):
        S.MahalanobisLayers().fit(inputs=x, model=net)
    with pytest.raises(ValueError, match="eps and regularization must be >= 0"):
        S.MahalanobisLayers(eps=-0.01)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        s.replace(eps=-1.0).layer_scores(x[:2], net)
    with pytest.raises(ValueError, match=r"cannot tell the stem and stages of Sequential .* give layers=\[\.\.\.\]"):
        S.MahalanobisLayers().fit(inputs=x, labels=y, model=nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()))
    with pytest.raises(ValueError, match=r"adversarial_inputs has 60 inputs but labels of shape \(3,\)"):
        L.adversarial_inputs(net, x, y[:3])
    with pytest.raises(ValueError, match="needs 2m = 1000 validation samples, got 60"):
        L.tune_mahalanobis_layers(net, x, x, y, fit_labels=y)
    with pytest.raises(TypeError, match="does not read"):
        s.score(inputs=x[:2], model=net, logits=x[:2, 0, 0])
    monkeypatch.setitem(__import__("sys").modules, "sklearn.linear_model", None)
    with pytest.raises(ImportError, match="needs scikit-learn for its logistic regression: pip install scikit-learn"):
        s.fit_regression(net, x[:20], x[20:40])


def test_registry_spec_strings_and_the_evaluator(gen):
    from mosx.evaluate.run import _build_scorers

    assert "mahalanobis_layers" in S.scorer_names()
    s = S.build_scorer("mahalanobis_layers:eps=0.001")
    assert isinstance(s, S.MahalanobisLayers) and s.eps == 0.001 and s.layers is None
    s = S.build_scorer("mahalanobis_layers:layers=stem+stages.1,dtype=float32,regularization=0.01")
    assert s.layers == ["stem", "stages.1"] and s.dtype == torch.float32 and s.regularization == 0.01
    assert s.search_space() == {} and s.needs == ("inputs", "model") and not s.ready
    # a spec is tuned by the evaluator (image_fit.py); a fitted, ready scorer is used as given
    assert list(_build_scorers(["mahalanobis_layers"], None, False)) == ["mahalanobis_layers"]
    net, x, y = model(gen), rand(gen, 30, 3, 16, 16), torch.arange(30) % 3
    fitted = S.MahalanobisLayers().fit(inputs=x, labels=y, model=net)
    from mosx.evaluate.image_fit import needs_image_fit

    assert needs_image_fit(fitted)  # statistics without a regression: still to be tuned
    fitted.fit_regression(net, x[:15], x[15:] * 3)
    assert not needs_image_fit(fitted) and list(_build_scorers([fitted], None, False)) == ["mahalanobis_layers"]


def _folders(root, rng, per_class):
    import os

    from test_evaluate import _png

    for c, rgb in {"cat": (200, 40, 40), "dog": (40, 200, 40), "eel": (40, 40, 200)}.items():
        os.makedirs(root / c)
        for i in range(per_class):
            _png(root / c / f"{i}.png", rgb, rng)


def test_the_evaluator_tunes_it_as_the_reference_from_fit_and_validation_images(gen, tmp_path):
    """`mosx eval --scores mahalanobis_layers --fit-data TRAIN --search id=VAL`: statistics on the fit
    images, the regression and eps on the ID validation images and their FGSM versions; the scores
    equal the Python protocol run by hand on the same images; missing sets are clear errors."""
    import os

    from test_evaluate import _png, common, load_images

    from mosx import evaluate as E

    rng = np.random.default_rng(1)
    for name, n in (("id", 3), ("train", 6), ("val", 4)):
        _folders(tmp_path / name, rng, n)
    os.makedirs(tmp_path / "far")
    for i in range(4):
        _png(tmp_path / "far" / f"{i}.png", (128, 128, 128), rng)
    net = model(gen).float()
    opts = common(tmp_path, scores=["mahalanobis_layers"])
    sets = (str(tmp_path / "id"), {"far": str(tmp_path / "far")})
    with pytest.raises(ValueError, match=r"mahalanobis_layers.*fit set \(--fit-data"):
        E.evaluate(net, *sets, **opts)
    with pytest.raises(ValueError, match=r"ID validation set \(--search id="):
        E.evaluate(net, *sets, fit_data=str(tmp_path / "train"), **opts)
    res = E.evaluate(net, *sets, fit_data=str(tmp_path / "train"), search={"id": str(tmp_path / "val")}, **opts)
    rec = res.search["mahalanobis_layers"]
    assert rec["m"] == 6 and [r["params"]["eps"] for r in rec["grid"]] == list(S.MAHALANOBIS_LAYERS_EPS_GRID)
    # the same protocol by hand: fit images, the first 2m validation images in the evaluator's order
    from mosx.evaluate.image_fit import validation_order

    train = E.image_list(str(tmp_path / "train"), "train")
    val = E.image_list(str(tmp_path / "val"), "val")
    order = validation_order(len(val))  # the evaluator takes the validation images in this order
    by_hand = S.tune_mahalanobis_layers(
        net,
        [(load_images(train), torch.as_tensor(train.labels))],
        [(load_images(val)[order], torch.as_tensor(val.labels)[order])],
        m=6,
    )
    assert rec["params"] == by_hand.params and rec["value"] == pytest.approx(by_hand.value)
    for name in ("id", "far"):
        want = by_hand.scorer.score(inputs=load_images(E.image_list(str(tmp_path / name), name)), model=net)
        np.testing.assert_allclose(res.scores["mahalanobis_layers"][name], want, rtol=1e-4, atol=1e-4)
    # a fit folder holding only some of the classes would shift the labels: refused
    _folders(tmp_path / "partial", rng, 2)
    import shutil

    shutil.rmtree(tmp_path / "partial" / "cat")
    with pytest.raises(ValueError, match=r"fit set's class folders \(2\) are not the model's classes \(3\)"):
        E.evaluate(net, *sets, fit_data=str(tmp_path / "partial"), search={"id": str(tmp_path / "val")}, **opts)
    # eps fixed by the spec: only the regression is fitted
    res = E.evaluate(
        net,
        *sets,
        fit_data=str(tmp_path / "train"),
        search={"id": str(tmp_path / "val")},
        **{**opts, "scores": ["mahalanobis_layers:eps=0.002"], "out_dir": str(tmp_path / "out2")},
    )
    assert [r["params"]["eps"] for r in res.search["mahalanobis_layers:eps=0.002"]["grid"]] == [0.002]


def test_the_evaluator_scores_with_a_fitted_scorer(gen, tmp_path):
    import os

    from test_evaluate import _png, common, load_images

    from mosx import evaluate as E

    rng = np.random.default_rng(0)
    for c, rgb in {"cat": (200, 40, 40), "dog": (40, 200, 40), "eel": (40, 40, 200)}.items():
        os.makedirs(tmp_path / "id" / c)
        for i in range(3):
            _png(tmp_path / "id" / c / f"{i}.png", rgb, rng)
    os.makedirs(tmp_path / "far")
    for i in range(4):
        _png(tmp_path / "far" / f"{i}.png", (128, 128, 128), rng)
    net = model(gen).float()
    x, y = torch.randn(30, 3, 16, 16, generator=gen), torch.arange(30) % 3
    s = S.MahalanobisLayers(eps=0.002).fit(inputs=x, labels=y, model=net).fit_regression(net, x[:15], x[15:] * 3)
    res = E.evaluate(net, str(tmp_path / "id"), {"far": str(tmp_path / "far")}, scores=[s], **common(tmp_path))
    for name in ("id", "far"):
        want = s.score(inputs=load_images(E.image_list(str(tmp_path / name), name)), model=net)
        np.testing.assert_allclose(res.scores["mahalanobis_layers"][name], want, rtol=1e-5, atol=1e-5)


def test_fgsm_on_a_grouped_model_follows_the_group_cross_entropy(gen):
    """A grouped model's logits are not class logits: the evaluator's FGSM loss is the group
    cross-entropy of the class ids (by hand: the sum over groups of each slice's cross-entropy)."""
    import mosx
    from mosx.evaluate.image_fit import _group_loss

    g = mosx.Groups.from_sizes([1, 2])  # classes 0 | 1, 2; 5 logits with the others slots
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = StemStages(classes=g.num_logits).double().eval()
    x, y = rand(gen, 6, 3, 16, 16), torch.tensor([0, 1, 2, 2, 1, 0])
    got = S.adversarial_inputs(net, x, y, noise=0.05, loss=_group_loss(g))
    xg = x.clone().requires_grad_(True)
    z = net(xg)
    # by hand: group 0 = logits [others, class 0], group 1 = [others, class 1, class 2]
    t0 = torch.where(y == 0, 1, 0)
    t1 = torch.where(y == 1, 1, torch.where(y == 2, 2, 0))
    loss = F.cross_entropy(z[:, 0:2], t0, reduction="sum") + F.cross_entropy(z[:, 2:5], t1, reduction="sum")
    (grad,) = torch.autograd.grad(loss, xg)
    torch.testing.assert_close(got, x + 0.05 * torch.sign(grad), rtol=0, atol=0)
    assert _group_loss(None) is None
