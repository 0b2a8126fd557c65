"""The feature-shaping wrappers (ReAct, ASH, SCALE, DICE) against direct fp64 implementations of
their papers' formulas (loops over samples on purpose), composed with MSP, Energy and MOS."""

import math
import warnings

import numpy as np
import pytest
import torch

import mosx
from mosx import scores as S

SIZES = [3, 2, 4]  # a grouping of 9 classes: 9 + 3 = 12 grouped logits


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def relu_features(gen, n, d, ties=True):
    """Non-negative features with many exact zeros and, with `ties`, many tied values."""
    f = (rand(gen, n, d) * 2).relu()
    return (f * 2).round() / 2 if ties else f


# ------------------------------------------------------------------------------ references
def ref_msp(z):
    out = []
    for r in z:
        e = [math.exp(v - max(r)) for v in r]
        out.append(max(e) / sum(e))
    return np.array(out)


def ref_energy(z):
    return np.array([max(r) + math.log(sum(math.exp(v - max(r)) for v in r)) for r in z])


def ref_mos(z, sizes=SIZES):
    out = []
    for r in z:
        others, o = [], 0
        for n in sizes:
            sl = r[o : o + n + 1]
            m = max(sl)
            others.append(math.exp(sl[0] - m) / sum(math.exp(v - m) for v in sl))
            o += n + 1
        out.append(-min(others))
    return np.array(out)


BASES = {  # name -> (scorer factory, reference of the logits, grouped head?)
    "msp": (lambda: S.MSP(), ref_msp, False),
    "energy": (lambda: S.Energy(), ref_energy, False),
    "mos": (lambda: S.MOS(SIZES), ref_mos, True),
}


def kept_indices(row, percentile):
    """ASH / SCALE's kept set: the k largest entries, ties to the lower index (a sort by (-value, index))."""
    d = len(row)
    k = max(1, d - int(np.round(d * percentile / 100.0)))
    order = sorted(range(d), key=lambda j: (-row[j], j))
    return set(order[:k]), k


def ref_ash(f, variant, percentile):
    out = []
    for row in f:
        kept, k = kept_indices(list(row), percentile)
        s1 = sum(row)
        s2 = sum(row[j] for j in kept)
        new = []
        for j, v in enumerate(row):
            if j not in kept:
                new.append(0.0)
            elif variant == "p":
                new.append(v)
            elif variant == "b":
                new.append(s1 / k)
            else:
                new.append(v * math.exp(s1 / s2) if s2 > 0 else 0.0)
        out.append(new)
    return np.array(out)


def ref_scale(f, percentile):
    out = []
    for row in f:
        kept, _ = kept_indices(list(row), percentile)
        s1, s2 = sum(row), sum(row[j] for j in kept)
        out.append([v * math.exp(s1 / s2) if s2 > 0 else v for v in row])
    return np.array(out)


def ref_react(f_fit, f, percentile):
    c = np.percentile(f_fit, percentile)
    return np.minimum(f, c)


def ref_dice_weight(f_fit, w, percentile):
    mean = f_fit.mean(0)
    contrib = np.array([[w[c, j] * mean[j] for j in range(w.shape[1])] for c in range(w.shape[0])])
    thresh = np.percentile(contrib, percentile)
    return np.where(contrib > thresh, w, 0.0)


def head_for(gen, grouped, d):
    c = mosx.Groups.from_sizes(SIZES).num_logits if grouped else 7
    return S.LinearHead(rand(gen, c, d), rand(gen, c))


def logits(f, head):
    return f @ head.weight.numpy().T + head.bias.numpy()


# ------------------------------------------------------------------------------ formulas
def test_top_k_keeps_ties_at_the_lower_index():
    from mosx.scores.shaping_ash import _top_k_mask

    f = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 3.0, 1.0, 1.0]])
    want = torch.tensor(
        [[False, True, True, False, False], [True, True, False, False, False], [True, False, True, False, False]]
    )
    torch.testing.assert_close(_top_k_mask(f, 2), want)
    assert _top_k_mask(f, 5).all()
    want3 = torch.tensor(
        [[False, True, True, True, False], [True, True, True, False, False], [True, True, True, False, False]]
    )
    torch.testing.assert_close(_top_k_mask(f, 3), want3)


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("variant", ["p", "b", "s"])
def test_ash_against_the_formula(gen, device, base, variant):
    make, ref, grouped = BASES[base]
    f = relu_features(gen, 40, 23)
    head = head_for(gen, grouped, 23)
    for pct in (90.0, 65.0, 0.0, 100.0, 37.5):
        a = S.ASH(make(), variant, pct, head=head)
        got = a.score(features=f.to(device)).cpu().numpy()
        np.testing.assert_allclose(got, ref(logits(ref_ash(f.numpy(), variant, pct), head)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("base", list(BASES))
def test_scale_against_the_formula(gen, device, base):
    make, ref, grouped = BASES[base]
    f = relu_features(gen, 40, 19)
    f[3] = 0.0  # an all-zero sample: the factor is taken as 1
    head = head_for(gen, grouped, 19)
    for pct in (85.0, 65.0, 0.0, 100.0):
        got = S.SCALE(make(), pct, head=head).score(features=f.to(device)).cpu().numpy()
        np.testing.assert_allclose(got, ref(logits(ref_scale(f.numpy(), pct), head)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("base", list(BASES))
def test_react_against_the_formula(gen, device, base):
    make, ref, grouped = BASES[base]
    f_fit, f = relu_features(gen, 300, 11, ties=False), relu_features(gen, 30, 11, ties=False)
    head = head_for(gen, grouped, 11)
    for pct in (90.0, 50.0):
        r = S.ReAct(make(), pct, head=head).fit(features=f_fit.to(device))
        got = r.score(features=f.to(device)).cpu().numpy()
        np.testing.assert_allclose(
            got, ref(logits(ref_react(f_fit.numpy(), f.numpy(), pct), head)), rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize("base", list(BASES))
def test_dice_against_the_formula(gen, device, base):
    make, ref, grouped = BASES[base]
    f_fit, f = relu_features(gen, 200, 13), relu_features(gen, 30, 13)
    head = head_for(gen, grouped, 13)
    for pct in (70.0, 90.0, 0.0, 100.0, 33.3):
        d = S.DICE(make(), pct, head=head).fit(features=f_fit.to(device))
        np.testing.assert_allclose(d.mean.cpu(), f_fit.numpy().mean(0), rtol=1e-12)
        w = ref_dice_weight(f_fit.numpy(), head.weight.numpy(), pct)
        np.testing.assert_array_equal(d.mask().cpu().numpy(), w != 0)
        want = ref(f.numpy() @ w.T + head.bias.numpy())
        np.testing.assert_allclose(d.score(features=f.to(device)).cpu().numpy(), want, rtol=1e-10, atol=1e-10)
    # p = 70 keeps about 30% of the weights
    d = S.DICE(make(), 70.0, head=head).fit(features=f_fit)
    assert abs(float(d.mask().double().mean()) - 0.3) < 0.02


def test_wrappers_on_float32_and_fp16_caches_match_fp64(gen):
    f = relu_features(gen, 500, 32, ties=False).float()
    head = S.LinearHead(rand(gen, 7, 32).float(), rand(gen, 7).float())
    scorers = {
        "ash": S.ASH(S.Energy(), "s", 90, head=head),
        "scale": S.SCALE(S.Energy(), head=head),
        "dice": S.DICE(S.Energy(), head=head),
        "react": S.ReAct(S.Energy(), head=head),
    }
    S.fit_all(scorers, {"features": f, "head": head})
    out = S.score_all(scorers, {"features": f.half(), "head": head}, batch_size=128)
    for name, s in scorers.items():
        want = s.score(features=f.half().double(), head=S.LinearHead(head.weight.double(), head.bias.double()))
        torch.testing.assert_close(out[name].double(), want, rtol=1e-4, atol=1e-4)


def test_dice_mean_streams_from_an_fp16_memmap(gen, tmp_path):
    f = relu_features(gen, 20_000, 6, ties=False).half()
    mm = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float16, shape=tuple(f.shape))
    mm[:] = f.numpy()
    mm.flush()
    d = S.fit_all({"d": S.DICE()}, {"features": np.load(tmp_path / "f.npy", mmap_mode="r")})["d"]
    np.testing.assert_allclose(d.mean.numpy(), f.double().numpy().mean(0), rtol=1e-12)


# ------------------------------------------------------------------------------ composition
def test_build_from_spec_strings():
    a = S.build_scorer("ash-energy:variant=p,percentile=65,temperature=2")
    assert isinstance(a, S.ASH) and (a.variant, a.percentile, a.base.temperature) == ("p", 65.0, 2.0)
    assert a.name == "ash-energy"
    s = S.build_scorer("scale-msp:percentile=80")
    assert isinstance(s, S.SCALE) and s.percentile == 80.0 and isinstance(s.base, S.MSP)
    d = S.build_scorer("dice-mos:percentile=50", groups=SIZES)
    assert isinstance(d, S.DICE) and isinstance(d.base, S.MOS) and d.percentile == 50.0
    assert S.build_scorer("ash-mos", groups=SIZES).name == "ash-mos"
    defaults = (S.ASH(), S.SCALE(), S.DICE())
    assert [(type(x.base), x.percentile) for x in defaults] == [(S.Energy, 90.0), (S.Energy, 85.0), (S.Energy, 70.0)]
    assert S.ASH().variant == "s"
    for w in ("ash", "scale", "dice", "react"):
        assert w in S.wrapper_names()


def test_wrapped_scorers_that_fit_are_fitted_on_the_shaped_data(gen):
    f_fit, f = relu_features(gen, 300, 10), relu_features(gen, 20, 10)
    head = S.LinearHead(rand(gen, 5, 10), rand(gen, 5))
    for w in (
        S.ASH(S.KLMatching(), "p", 60, head=head),
        S.SCALE(S.KLMatching(), 60, head=head),
        S.DICE(S.KLMatching(), 60, head=head),
        S.ReAct(S.KLMatching(), 60, head=head),
    ):
        assert w.needs_fit and not w.fitted
        with pytest.raises(RuntimeError, match="fit"):
            w.score(features=f)
        w.fit(features=f_fit)
        shaped_head = w._shaped_head(head)
        direct = S.KLMatching().fit(logits=shaped_head(w._shape(f_fit)))
        torch.testing.assert_close(w.score(features=f), direct.score(logits=shaped_head(w._shape(f))))
    # Mahalanobis over the shaped features, classes from the labels
    y = torch.arange(300) % 5
    m = S.ASH(S.Mahalanobis(), "p", 50, head=head)
    assert "labels" in m.fit_needs
    m.fit(features=f_fit, labels=y)
    want = S.Mahalanobis().fit(features=m._shape(f_fit), labels=y).score(features=m._shape(f))
    torch.testing.assert_close(m.score(features=f), want)


def test_the_head_comes_from_the_constructor_fit_or_score(gen):
    f = relu_features(gen, 20, 8)
    head = S.LinearHead(rand(gen, 4, 8), rand(gen, 4))
    want = S.ASH(head=head).score(features=f)
    torch.testing.assert_close(S.ASH().score(features=f, head=head), want)
    torch.testing.assert_close(S.ASH().fit(head=head).score(features=f), want)
    torch.testing.assert_close(S.ASH().score(features=f, head=torch.nn.Linear(8, 4).double()).shape, want.shape)
    for w in (S.ASH(), S.SCALE(), S.DICE().fit(features=f)):
        with pytest.raises(ValueError, match="linear head"):
            w.score(features=f)


# ------------------------------------------------------------------------------ hyperparameters
def test_search_space_and_replace(gen):
    assert S.ASH().search_space() == {"percentile": [65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0]}
    assert S.SCALE().search_space() == {"percentile": [65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0]}
    assert S.DICE().search_space() == {"percentile": [10.0, 30.0, 50.0, 70.0, 90.0]}
    assert S.ReAct().search_space()["percentile"] == [10.0, 65.0, 80.0, 85.0, 90.0, 95.0, 99.0]
    f_fit, f = relu_features(gen, 200, 9, ties=False), relu_features(gen, 10, 9)
    head = S.LinearHead(rand(gen, 4, 9), rand(gen, 4))
    # ReAct: a new percentile drops the fitted threshold (refit before scoring)
    r = S.ReAct(S.Energy(), 90, head=head).fit(features=f_fit)
    r2 = r.replace(percentile=50)
    assert r.threshold == pytest.approx(np.percentile(f_fit.numpy(), 90)) and not r2.fitted
    r2.fit(features=f_fit)
    assert r2.threshold == pytest.approx(np.percentile(f_fit.numpy(), 50))
    # DICE: the mean stays, the mask follows the percentile
    d = S.DICE(S.Energy(), 70, head=head).fit(features=f_fit)
    d2 = d.replace(percentile=20)
    assert d2.fitted and d2.mask().sum() > d.mask().sum()
    torch.testing.assert_close(
        d2.score(features=f), S.DICE(S.Energy(), 20, head=head).fit(features=f_fit).score(features=f)
    )
    # base.<name> reaches the wrapped scorer, on a copy
    a = S.ASH(S.Energy(), head=head)
    a2 = a.replace(**{"base.temperature": 2.0, "variant": "b"})
    assert (a.base.temperature, a2.base.temperature, a2.variant) == (1.0, 2.0, "b") and a2.base is not a.base
    with pytest.raises(ValueError, match="variant"):
        a.replace(variant="x")
    with pytest.raises(ValueError, match="percentile"):
        d.replace(percentile=101)
    with pytest.raises(AttributeError, match="no hyperparameter"):
        a.replace(nope=1)


# ------------------------------------------------------------------------------ errors
def test_bad_input_gets_clear_errors(gen):
    f = relu_features(gen, 10, 6)
    head = S.LinearHead(rand(gen, 3, 6), rand(gen, 3))
    for cls in (S.ASH, S.SCALE, S.DICE, S.ReAct):
        for bad in (-1, 100.5, "x"):
            with pytest.raises(ValueError, match="percentile"):
                cls(percentile=bad)
        with pytest.raises(ValueError, match="perturbs inputs"):
            cls(S.ODIN(1000, 0.01))
    with pytest.raises(ValueError, match="variant"):
        S.ASH(variant="q")
    with pytest.raises(RuntimeError, match="fit"):
        S.DICE(head=head).score(features=f)
    with pytest.raises(ValueError, match="takes 6 features"):
        S.DICE(head=head).fit(features=relu_features(gen, 10, 5)).score(features=relu_features(gen, 10, 5))
    with pytest.raises(ValueError, match="NaN"):
        S.ASH(head=head).score(features=torch.full((2, 6), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="features must be 2-D"):
        S.SCALE(head=head).score(features=f[0])


def test_signed_features_warn_or_raise(gen):
    f = rand(gen, 10, 6)  # signed: not post-ReLU
    head = S.LinearHead(rand(gen, 3, 6), rand(gen, 3))
    for w in (S.ASH(variant="b", head=head), S.ASH(variant="s", head=head), S.SCALE(head=head)):
        with pytest.raises(ValueError, match="non-negative, post-ReLU"):
            w.score(features=f)
    for w in (S.ASH(variant="p", head=head), S.DICE(head=head), S.ReAct(head=head)):
        with pytest.warns(UserWarning, match="non-negative, post-ReLU"):
            w.fit(features=f) if w.needs_fit else None
            w.score(features=f)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per scorer
            w.score(features=f)


# ------------------------------------------------------------------------------ a trained model
class MLP(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU()
        )
        self.fc = torch.nn.Linear(64, out)

    def forward(self, x):
        return self.fc(self.body(x))


def trained(gen, grouped):
    """An MLP trained on 9 Gaussian blobs on a circle (grouped: group softmax over SIZES)."""
    torch.manual_seed(int(torch.randint(0, 2**30, (1,), generator=gen)))
    g = mosx.Groups.from_sizes(SIZES)
    angle = torch.arange(9, dtype=torch.float64) * (2 * math.pi / 9)
    centres = torch.stack([angle.cos(), angle.sin()], 1) * 4
    y = torch.arange(900) % 9
    x = centres[y] + 0.5 * rand(gen, 900, 2)
    net = MLP(g.num_logits if grouped else 9)  # trained in float32 (fast), evaluated in float64
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(120):
        opt.zero_grad()
        z = net(x.float())
        loss = mosx.group_cross_entropy(z, y, g) if grouped else torch.nn.functional.cross_entropy(z, y)
        loss.backward()
        opt.step()
    return net.double().eval(), x, centres


def test_on_a_tiny_trained_model(gen):
    """Through a trained model's cached features and its own head: each wrapper's score equals the
    formula applied to the model's features and logits, and separates ID from far-away OOD points."""
    for grouped in (False, True):
        net, x_fit, centres = trained(gen, grouped)
        x_id = centres[torch.arange(400) % 9] + 0.5 * rand(gen, 400, 2)
        x_ood = rand(gen, 400, 2) * 0.4  # the empty centre of the circle
        x_ood2 = rand(gen, 400, 2) / rand(gen, 400, 2).norm(dim=1, keepdim=True) * 9  # far outside it
        with torch.no_grad():
            feats = {
                k: S.model_outputs(net, v)[1]
                for k, v in (("fit", x_fit), ("id", x_id), ("ood", x_ood), ("far", x_ood2))
            }
        head = S.linear_head(net)
        fc = lambda f: net.fc(torch.as_tensor(f)).detach().numpy()
        bases = (
            {"mos": (lambda: S.MOS(SIZES), ref_mos)}
            if grouped
            else {"msp": (lambda: S.MSP(), ref_msp), "energy": (lambda: S.Energy(), ref_energy)}
        )
        for bname, (make, ref) in bases.items():
            f_fit = feats["fit"].numpy()
            shapes = {
                "ash-p": (S.ASH(make(), "p", 65), lambda f: ref_ash(f, "p", 65)),
                "ash-s": (S.ASH(make(), "s", 90), lambda f: ref_ash(f, "s", 90)),
                "ash-b": (S.ASH(make(), "b", 65), lambda f: ref_ash(f, "b", 65)),
                "scale": (S.SCALE(make(), 85), lambda f: ref_scale(f, 85)),
                "react": (S.ReAct(make(), 90), lambda f: ref_react(f_fit, f, 90)),
            }
            for name, (w, shape) in shapes.items():
                S.fit_all({name: w}, {"features": feats["fit"], "head": head})
                out = S.score_all({name: w}, {"features": torch.cat([feats["id"], feats["ood"]]), "head": head})[name]
                f_all = torch.cat([feats["id"], feats["ood"]]).numpy()
                np.testing.assert_allclose(out.numpy(), ref(fc(shape(f_all))), rtol=1e-9, atol=1e-9)
            dice = S.DICE(make(), 70).fit(features=feats["fit"], head=head)
            w_masked = ref_dice_weight(f_fit, net.fc.weight.detach().numpy(), 70)
            f_id = feats["id"].numpy()
            want = ref(f_id @ w_masked.T + net.fc.bias.detach().numpy())
            np.testing.assert_allclose(dice.score(features=feats["id"]).numpy(), want, rtol=1e-9, atol=1e-9)
            # the trained model tells its blobs from the empty centre of the circle through the wrappers
            # (AUROC >= 0.92 over six seeds). Not asserted, measured weak on this 64-feature toy: ASH-S
            # under MSP (exp(s1/s2) saturates the softmax: AUROC 0.62-0.86) and ASH-B under MOS (0.60-0.99)
            weak = {("ash-s", "msp"), ("ash-b", "mos")}
            for name, w in [(k, v[0]) for k, v in shapes.items()] + [("dice", dice)]:
                if (name, bname) not in weak:
                    s_id = w.score(features=feats["id"], head=head)
                    assert mosx.metrics.auroc(s_id, w.score(features=feats["ood"], head=head)) > 0.85, (name, bname)
            # far outside the circle a ReLU network is overconfident; clipping (ReAct) curbs it, as its paper says
            plain = (
                make().score(logits=net.fc(feats["id"]).detach()),
                make().score(logits=net.fc(feats["far"]).detach()),
            )
            react = shapes["react"][0]
            clipped = react.score(features=feats["id"], head=head), react.score(features=feats["far"], head=head)
            assert mosx.metrics.auroc(*clipped) > mosx.metrics.auroc(*plain), (grouped, bname)
