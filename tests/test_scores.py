"""mosx.scores against direct implementations of each paper's formula (loops on purpose)."""

import math

import numpy as np
import pytest
import torch

import mosx
from mosx import scores as S

TOL = 1e-6


def rand(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def softmax_row(z):
    e = np.exp(z - z.max())
    return e / e.sum()


# ------------------------------------------------------------------------------ references
def ref_msp(z):
    return np.array([softmax_row(r).max() for r in z])


def ref_energy(z, T):
    return np.array([T * math.log(sum(math.exp(v / T) for v in r)) for r in z])


def ref_mos(z, sizes):
    out = []
    for r in z:
        others, o = [], 0
        for n in sizes:
            sl = r[o : o + n + 1]
            others.append(math.exp(sl[0]) / sum(math.exp(v) for v in sl))
            o += n + 1
        out.append(-min(others))
    return np.array(out)


def ref_kl_matching(z_fit, z):
    p_fit = np.array([softmax_row(r) for r in z_fit])
    pred = p_fit.argmax(1)
    templates = [p_fit[pred == c].mean(0) for c in range(z.shape[1]) if (pred == c).any()]
    out = []
    for r in z:
        p = softmax_row(r)
        kls = [sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0) for q in templates]
        out.append(-min(kls))
    return np.array(out)


def ref_mahalanobis(f_fit, y_fit, f):
    classes = sorted(set(y_fit.tolist()))
    means = {c: f_fit[y_fit == c].mean(0) for c in classes}
    cov = sum(np.outer(x - means[c], x - means[c]) for x, c in zip(f_fit, y_fit)) / len(f_fit)
    prec = np.linalg.pinv(cov, hermitian=True)
    return np.array([max(-(x - means[c]) @ prec @ (x - means[c]) for c in classes) for x in f])


def ref_gradnorm(feats, weight, bias, T):
    """Per sample: autograd of KL(u || softmax(head(f) / T)) w.r.t. the head's weight, L1 norm."""
    out = []
    for f in feats:
        w = weight.clone().requires_grad_(True)
        z = f @ w.T + bias
        C = z.shape[0]
        kl = (torch.full((C,), 1.0 / C, dtype=z.dtype) * (math.log(1.0 / C) - torch.log_softmax(z / T, 0))).sum()
        (g,) = torch.autograd.grad(kl, w)
        out.append(float(g.abs().sum()))
    return np.array(out)


# ------------------------------------------------------------------------------ logit scores
def test_msp_maxlogit_energy(gen, device):
    z = (rand(gen, 64, 12) * 3).to(device)
    zn = z.cpu().numpy()
    np.testing.assert_allclose(S.MSP().score(logits=z).cpu(), ref_msp(zn), atol=TOL)
    np.testing.assert_allclose(S.MaxLogit().score(logits=z).cpu(), zn.max(1), atol=TOL)
    for T in (1.0, 0.5, 7.0):
        np.testing.assert_allclose(S.Energy(T).score(logits=z).cpu(), ref_energy(zn, T), atol=TOL)
    # float32 and half inputs are computed in float32
    s32 = S.Energy().score(logits=z.float())
    assert s32.dtype == torch.float32
    np.testing.assert_allclose(s32.cpu(), ref_energy(zn, 1.0), rtol=1e-5)


def test_mos(gen, device):
    sizes = [3, 5, 1, 4]
    groups = mosx.Groups.from_sizes(sizes)
    z = (rand(gen, 40, groups.num_logits) * 2).to(device)
    np.testing.assert_allclose(S.MOS(groups).score(logits=z).cpu(), ref_mos(z.cpu().numpy(), sizes), atol=TOL)
    with pytest.raises(ValueError, match="columns"):
        S.MOS(groups).score(logits=z[:, :-1])


def test_odin_without_perturbation_is_temperature_msp(gen):
    z = rand(gen, 30, 9) * 4
    for T in (1.0, 1000.0):
        np.testing.assert_allclose(S.ODIN(T).score(logits=z), ref_msp(z.numpy() / T), atol=TOL)


def test_gradnorm_is_the_gradient_norm(gen, device):
    D, C, T = 7, 5, 1.0
    feats = rand(gen, 25, D).relu()
    w, b = rand(gen, C, D), rand(gen, C)
    for T in (1.0, 2.5):
        want = ref_gradnorm(feats, w, b, T)
        z = feats @ w.T + b
        got = S.GradNorm(T).score(logits=z.to(device), features=feats.to(device))
        np.testing.assert_allclose(got.cpu(), want, rtol=1e-9, atol=TOL)


# ------------------------------------------------------------------------------ fitted scores
def test_kl_matching(gen, device):
    C = 6
    z_fit = rand(gen, 200, C) * 2
    z_fit[:, 5] -= 100  # class 5 is never predicted: no template for it
    z = rand(gen, 30, C) * 2
    k = S.KLMatching().fit(logits=z_fit.to(device))
    assert k._log_templates.shape == (5, C)
    np.testing.assert_allclose(k.score(logits=z.to(device)).cpu(), ref_kl_matching(z_fit.numpy(), z.numpy()), atol=TOL)
    with pytest.raises(ValueError, match="fitted on 6"):
        k.score(logits=z[:, :4].to(device))


@pytest.mark.parametrize("n, d, c", [(300, 8, 4), (12, 30, 3)])  # full rank, and singular (pinv)
def test_mahalanobis(gen, device, n, d, c):
    f_fit = rand(gen, n, d) + 0.5
    y = torch.arange(n) % c
    f_fit += y[:, None].double() * 0.7  # separate the classes a little
    f = rand(gen, 20, d)
    m = S.Mahalanobis().fit(features=f_fit.to(device), labels=y.to(device))
    want = ref_mahalanobis(f_fit.numpy(), y.numpy(), f.numpy())
    np.testing.assert_allclose(m.score(features=f.to(device)).cpu(), want, rtol=1e-7, atol=1e-6)
    with pytest.raises(ValueError, match=f"fitted on {d}"):
        m.score(features=f[:, :-1].to(device))


def test_mahalanobis_float32_option(gen):
    f_fit, f = rand(gen, 200, 6).float(), rand(gen, 30, 6).float()
    y = torch.arange(200) % 4
    a = S.Mahalanobis().fit(features=f_fit, labels=y).score(features=f)
    b = S.build_scorer("mahalanobis:dtype=float32").fit(features=f_fit, labels=y).score(features=f)
    assert a.dtype == torch.float64 and b.dtype == torch.float32
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="dtype"):
        S.Mahalanobis(dtype=torch.float16)


def test_mahalanobis_labels_from_logits_and_regularization(gen):
    f_fit, f = rand(gen, 100, 5), rand(gen, 10, 5)
    z_fit = rand(gen, 100, 3)
    a = S.Mahalanobis().fit(features=f_fit, logits=z_fit).score(features=f)
    b = S.Mahalanobis().fit(features=f_fit, labels=z_fit.argmax(1)).score(features=f)
    torch.testing.assert_close(a, b)
    # regularisation = adding lambda * mean variance to the diagonal before inverting
    reg = S.Mahalanobis(regularization=0.1).fit(features=f_fit, labels=z_fit.argmax(1)).score(features=f)
    y = z_fit.argmax(1).numpy()
    fn = f_fit.numpy()
    means = {c: fn[y == c].mean(0) for c in range(3)}
    cov = sum(np.outer(x - means[c], x - means[c]) for x, c in zip(fn, y)) / len(fn)
    prec = np.linalg.inv(cov + 0.1 * np.trace(cov) / 5 * np.eye(5))
    want = [max(-(x - means[c]) @ prec @ (x - means[c]) for c in range(3)) for x in f.numpy()]
    np.testing.assert_allclose(reg, want, rtol=1e-7)


def test_react_percentile_and_score(gen, device):
    D, C = 10, 4
    f_fit = rand(gen, 500, D).relu() * 3
    f = rand(gen, 40, D).relu() * 3
    head = S.LinearHead(rand(gen, C, D), rand(gen, C))
    for pct in (90.0, 37.5, 100.0, 0.0):
        r = S.ReAct(S.Energy(), pct, head=head).fit(features=f_fit.to(device))
        c = np.percentile(f_fit.numpy(), pct)
        assert r.threshold == pytest.approx(c, abs=1e-12)
        clipped = np.minimum(f.numpy(), c)
        z = clipped @ head.weight.numpy().T + head.bias.numpy()
        np.testing.assert_allclose(r.score(features=f.to(device)).cpu(), ref_energy(z, 1.0), atol=TOL)
    # wraps any logit score; the head can come at score time; a given threshold is kept by fit
    r = S.ReAct(S.MSP(), threshold=0.5).fit(features=f_fit)
    assert r.threshold == 0.5
    z = np.minimum(f.numpy(), 0.5) @ head.weight.numpy().T + head.bias.numpy()
    np.testing.assert_allclose(r.score(features=f, head=head), ref_msp(z), atol=TOL)
    with pytest.raises(ValueError, match="linear head"):
        r.score(features=f)


def test_react_with_gradnorm_uses_clipped_features(gen):
    D, C = 6, 5
    f_fit, f = rand(gen, 200, D).relu(), rand(gen, 20, D).relu()
    w, b = rand(gen, C, D), rand(gen, C)
    r = S.ReAct(S.GradNorm(), 80, head=S.LinearHead(w, b)).fit(features=f_fit)
    clipped = f.clamp(max=r.threshold)
    np.testing.assert_allclose(r.score(features=f), ref_gradnorm(clipped, w, b, 1.0), rtol=1e-9)


def test_percentile_matches_numpy_on_large_input(gen):
    x = torch.randn(3_000_000, generator=gen)  # bigger than torch.quantile accepts
    for q in (0.0, 12.3, 50.0, 90.0, 99.99, 100.0):
        assert float(S._percentile(x, q)) == pytest.approx(np.percentile(x.numpy(), q), abs=1e-7)


# ------------------------------------------------------------------------------ perturbations
class TinyNet(torch.nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).mean((2, 3)))


def tiny(gen, classes=4):
    torch.manual_seed(int(torch.randint(0, 2**30, (1,), generator=gen)))
    return TinyNet(classes).double().eval()


def test_odin_perturbation_against_per_sample_loop(gen):
    net = tiny(gen)
    x = rand(gen, 9, 3, 5, 5)
    T, eps = 10.0, 0.01
    want = []
    for xi in x:
        xi = xi[None].clone().requires_grad_(True)
        z = net(xi)[0]
        log_s = torch.log_softmax(z / T, 0).max()
        (g,) = torch.autograd.grad(log_s, xi)
        x_t = xi.detach() - eps * torch.sign(-g)  # x~ = x - eps sign(-grad log S)
        want.append(float(torch.softmax(net(x_t)[0] / T, 0).max().detach()))
    got = S.ODIN(T, eps).score(inputs=x, model=net)
    np.testing.assert_allclose(got, want, atol=1e-12)
    # the perturbation matters: eps = 0 gives different scores
    assert not torch.allclose(got, S.ODIN(T, 0.0).score(logits=net(x).detach()))
    with pytest.raises(ValueError, match="needs `inputs` and `model`"):
        S.ODIN(T, eps).score(logits=net(x))


def test_mahalanobis_perturbation_against_per_sample_loop(gen):
    net = tiny(gen)
    x_fit, x = rand(gen, 60, 3, 5, 5), rand(gen, 7, 3, 5, 5)
    feats = S.model_outputs(net, x_fit)[1].detach()
    y = torch.arange(60) % 4
    eps = 0.02
    m = S.Mahalanobis(eps=eps).fit(features=feats, labels=y)
    fn, yn = feats.numpy(), y.numpy()
    means = torch.tensor(np.stack([fn[yn == c].mean(0) for c in range(4)]))
    cov = sum(np.outer(a - fn[yn == c].mean(0), a - fn[yn == c].mean(0)) for a, c in zip(fn, yn)) / 60
    prec = torch.tensor(np.linalg.pinv(cov, hermitian=True))

    def feat(xi):
        return torch.tanh(net.conv(xi)).mean((2, 3))[0]

    want = []
    for xi in x:
        xi = xi[None].clone().requires_grad_(True)
        f = feat(xi)
        d = torch.stack([(f - mu) @ prec @ (f - mu) for mu in means])
        (g,) = torch.autograd.grad(-d.min(), xi)  # gradient of the confidence M(x) = -min_c d_c
        x_t = xi.detach() + eps * torch.sign(g)  # x^ = x + eps sign(grad M)
        f_t = feat(x_t).detach()
        want.append(max(float(-(f_t - mu) @ prec @ (f_t - mu)) for mu in means))
    np.testing.assert_allclose(m.score(inputs=x, model=net), want, rtol=1e-8, atol=1e-9)


def test_select_eps_picks_the_best_of_the_grid(gen):
    net = tiny(gen)
    id_x = rand(gen, 40, 3, 5, 5)
    ood_x = rand(gen, 30, 3, 5, 5) * 3
    grid = [0.0, 0.01, 0.1]
    best, results = S.select_eps(lambda e: S.ODIN(10.0, e), net, [id_x[:20], id_x[20:]], [(ood_x, None)], grid)
    assert [r[0] for r in results] == grid
    from mosx.metrics import ood_metrics

    for eps, m in results:  # each row is the metric of that eps's scores
        s_id = S.ODIN(10.0, eps).score(inputs=id_x, model=net) if eps else S.ODIN(10.0).score(logits=net(id_x).detach())
        s_ood = (
            S.ODIN(10.0, eps).score(inputs=ood_x, model=net) if eps else S.ODIN(10.0).score(logits=net(ood_x).detach())
        )
        assert m.auroc == pytest.approx(ood_metrics(s_id, s_ood).auroc, abs=1e-9)
    fprs = [m.fpr_at_tpr for _, m in results]
    assert dict(results)[best].fpr_at_tpr == min(fprs)
    best_a, _ = S.select_eps(lambda e: S.ODIN(10.0, e), net, id_x, ood_x, grid, metric="auroc")
    assert dict(results)[best_a].auroc == max(m.auroc for _, m in results)


# ------------------------------------------------------------------------------ model plumbing
def test_model_outputs_and_linear_head(gen):
    net = tiny(gen)
    x = rand(gen, 5, 3, 5, 5)
    z, f = S.model_outputs(net, x)
    torch.testing.assert_close(z, net(x))
    torch.testing.assert_close(f, torch.tanh(net.conv(x)).mean((2, 3)))
    torch.testing.assert_close(S.linear_head(net)(f), z)

    class Pair(TinyNet):  # returns (logits, features)
        def forward(self, x):
            h = torch.tanh(self.conv(x)).mean((2, 3))
            return self.fc(h), h

    class TimmLike(TinyNet):
        def forward_features(self, x):
            return torch.tanh(self.conv(x))

        def forward_head(self, x, pre_logits=False):
            h = x.mean((2, 3))
            return h if pre_logits else self.fc(h)

        def get_classifier(self):
            return self.fc

    for cls in (Pair, TimmLike):
        other = cls().double()
        other.load_state_dict(net.state_dict())
        z2, f2 = S.model_outputs(other, x)
        torch.testing.assert_close(z2, z)
        torch.testing.assert_close(f2, f)
    conv = torch.nn.Conv2d(6, 4, 1).double()
    h = S.LinearHead.from_module(conv)
    torch.testing.assert_close(h(f), conv(f[:, :, None, None]).flatten(1))


# ------------------------------------------------------------------------------ many at once
def test_score_all_matches_single_scorers(gen):
    C, D, N = 8, 6, 1000
    groups = mosx.Groups.from_sizes([3, 5])
    zg = rand(gen, N, groups.num_logits).half()
    z = rand(gen, N, C).half()
    f = rand(gen, N, D).relu().half()
    y = torch.randint(0, C, (N,), generator=gen)
    head = S.LinearHead(rand(gen, C, D).float(), rand(gen, C).float())
    flat = {
        "msp": S.MSP(),
        "energy": S.Energy(2.0),
        "maxlogit": S.MaxLogit(),
        "odin": S.ODIN(1000),
        "kl": S.KLMatching(),
        "maha": S.Mahalanobis(),
        "gradnorm": S.GradNorm(),
        "react": S.ReAct(S.Energy()),
    }
    S.fit_all(flat, {"logits": z, "features": f, "labels": y, "head": head})
    timings = {}
    out = S.score_all(flat, {"logits": z.numpy(), "features": f, "head": head}, batch_size=128, timings=timings)
    assert set(timings) == set(flat) and all(t >= 0 for t in timings.values())
    data = {"logits": z.float(), "features": f.float(), "head": head}
    for name, s in flat.items():
        assert out[name].shape == (N,)
        mine = {k: v for k, v in data.items() if k in s.accepts}  # a direct call takes only what it reads
        torch.testing.assert_close(out[name], s.score(**mine), rtol=1e-5, atol=1e-5)
    mos = S.score_all({"mos": S.MOS(groups)}, {"logits": zg}, batch_size=300)["mos"]
    np.testing.assert_allclose(mos, ref_mos(zg.double().numpy(), [3, 5]), atol=1e-5)


def test_build_scorer():
    assert isinstance(S.build_scorer("msp"), S.MSP)
    e = S.build_scorer("energy:temperature=2.5")
    assert isinstance(e, S.Energy) and e.temperature == 2.5
    o = S.build_scorer("odin:temperature=1000,eps=0.0014")
    assert (o.temperature, o.eps, o.needs) == (1000.0, 0.0014, ("inputs", "model"))
    r = S.build_scorer("react-energy:percentile=95,temperature=3")
    assert isinstance(r, S.ReAct) and r.percentile == 95 and r.base.temperature == 3 and r.name == "react-energy"
    m = S.build_scorer("mos", groups=[2, 3])
    assert m.groups.num_logits == 7
    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        S.build_scorer("nope")
    with pytest.raises(ValueError, match="needs groups"):
        S.build_scorer("mos")
    with pytest.raises(ValueError, match="key=value"):
        S.build_scorer("energy:2")
    with pytest.raises(ValueError, match="unexpected keyword"):
        S.build_scorer("msp:temperature=2")


# ------------------------------------------------------------------------------ registry
def scorer_classes(cls=S.Scorer):
    """Every Scorer subclass defined in the mosx.scores package (found by walking the class tree)."""
    for sub in cls.__subclasses__():
        if sub.__module__.startswith("mosx.scores."):
            yield sub
        yield from scorer_classes(sub)


def test_registry_lists_every_scorer_and_builds_each_name():
    assert set(scorer_classes()) == set(S.SCORERS.values()) | set(S.WRAPPERS.values())
    # the order of the --scores help and of build_scorer's "known:" list
    assert S.scorer_names() == (
        "mos",
        "msp",
        "maxlogit",
        "energy",
        "odin",
        "kl_matching",
        "mahalanobis",
        "gradnorm",
        "mahalanobis_layers",
        "entropy",
        "gen",
        "vim",
        "knn",
        "nnguide",
        "rmd",
        "she",
        "fdbd",
        "nci",
    )
    assert S.wrapper_names() == ("react", "dice", "ash", "scale")
    for name in S.scorer_names():
        s = S.build_scorer(name, groups=[2, 3])
        assert type(s) is S.SCORERS[name] and s.name == name == type(s).spec_name
        for w in S.wrapper_names():
            if "inputs" in s.needs:  # mahalanobis_layers reads images: the wrappers refuse it clearly
                with pytest.raises(ValueError, match="perturbs inputs"):
                    S.build_scorer(f"{w}-{name}")
                continue
            r = S.build_scorer(f"{w}-{name}", groups=[2, 3])
            assert type(r) is S.WRAPPERS[w] and type(r.base) is S.SCORERS[name] and r.name == f"{w}-{name}"
    with pytest.raises(
        ValueError,
        match=r"known: mos, msp, .*, gradnorm, .*, nci \(and react-<name>, dice-<name>, ash-<name>, scale-<name>\)",
    ):
        S.build_scorer("react-nope")


def test_a_new_scorer_class_registers_itself():
    class Scaled(S.Scorer):
        """scale * the largest logit (test only)."""

        spec_name = "test_scaled"

        def __init__(self, scale: float = 1.0):
            super().__init__()
            self.scale = scale

        def _score(self, logits=None, **_):
            return self.scale * logits.amax(dim=1)

    try:
        assert S.scorer_names()[-1] == "test_scaled" and Scaled.name == "test_scaled"
        s = S.build_scorer("test_scaled:scale=0.5")
        assert isinstance(s, Scaled) and s.scale == 0.5
        torch.testing.assert_close(s.score(logits=torch.tensor([[1.0, 4.0]])), torch.tensor([2.0]))
        assert isinstance(S.build_scorer("react-test_scaled").base, Scaled)
    finally:
        del S.SCORERS["test_scaled"]
    with pytest.raises(ValueError, match="'msp' is taken"):
        type("OtherMSP", (S.Scorer,), {"spec_name": "msp"})
    assert S.SCORERS["msp"] is S.MSP


# ------------------------------------------------------------------------------ errors
def test_shape_and_fit_errors(gen):
    z, f = rand(gen, 10, 4), rand(gen, 10, 3)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        S.MSP().score(logits=z[0])
    with pytest.raises(ValueError, match="needs `logits`"):
        S.Energy().score(features=f)
    with pytest.raises(TypeError, match="floating point"):
        S.MaxLogit().score(logits=torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="row counts differ"):
        S.GradNorm().score(logits=z, features=f[:5])
    with pytest.raises(RuntimeError, match="fit"):
        S.KLMatching().score(logits=z)
    with pytest.raises(RuntimeError, match="fit"):
        S.Mahalanobis().score(features=f)
    with pytest.raises(RuntimeError, match="fit"):
        S.ReAct().score(features=f, head=S.LinearHead(rand(gen, 4, 3)))
    with pytest.raises(ValueError, match="labels must be"):
        S.Mahalanobis().fit(features=f, labels=torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="needs `labels`"):
        S.Mahalanobis().fit(features=f)
    with pytest.raises(ValueError, match="features must be 2-D"):
        S.Mahalanobis().fit(features=f[0], labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        S.Energy(0)
    with pytest.raises(ValueError, match="percentile"):
        S.ReAct(percentile=120)
    with pytest.raises(ValueError, match="perturbs inputs"):
        S.ReAct(S.ODIN(1000, 0.01))
    with pytest.raises(ValueError, match=r"needs \['features'"):
        S.score_all({"maha": S.Mahalanobis().fit(features=f, labels=torch.arange(10) % 2)}, {"logits": z})
    with pytest.raises(RuntimeError, match="must be fitted"):
        S.score_all({"kl": S.KLMatching()}, {"logits": z})
    with pytest.raises(ValueError, match="rows"):
        S.score_all({"g": S.GradNorm()}, {"logits": z, "features": f[:4]})
    with pytest.raises(ValueError, match=r"needs \['labels'\]"):
        S.fit_all({"maha": S.Mahalanobis()}, {"features": f})


def test_streaming_fit_from_a_memmap(gen, tmp_path):
    # more rows than one block (65,536): the fitted statistics must equal an in-memory fit
    n, d, c = 70_000, 6, 5
    f = (rand(gen, n, d) + torch.arange(n).remainder(c)[:, None]).half()
    z = rand(gen, n, c).half()
    y = torch.arange(n) % c
    for name, arr in (("f", f), ("z", z)):
        mm = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=np.float16, shape=tuple(arr.shape))
        mm[:] = arr.numpy()
        mm.flush()
    f_mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    z_mm = np.load(tmp_path / "z.npy", mmap_mode="r")
    a = S.Mahalanobis().fit(features=f_mm, labels=y.numpy())
    b = S.Mahalanobis().fit(features=f.double(), labels=y)
    probe = rand(gen, 50, d)
    torch.testing.assert_close(a.score(features=probe), b.score(features=probe), rtol=1e-9, atol=1e-9)
    k1 = S.KLMatching().fit(logits=z_mm)
    k2 = S.KLMatching().fit(logits=z.double())
    torch.testing.assert_close(k1._log_templates, k2._log_templates, rtol=1e-9, atol=1e-9)
    # through fit_all, with labels from the logits' argmax
    m = S.fit_all({"m": S.Mahalanobis()}, {"features": f_mm, "logits": z_mm})["m"]
    want = S.Mahalanobis().fit(features=f.double(), labels=z.float().argmax(1))
    torch.testing.assert_close(m.score(features=probe), want.score(features=probe), rtol=1e-9, atol=1e-9)


def test_react_percentile_of_fp16_features_streams_exactly(gen, tmp_path):
    f = (torch.randn(70_000, 4, generator=gen) * 3).relu().half()  # many ties at 0, > one block
    f[5, 1] = -0.0
    mm = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float16, shape=tuple(f.shape))
    mm[:] = f.numpy()
    mm.flush()
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    for q in (0.0, 10.0, 37.5, 50.0, 90.0, 99.9, 100.0):
        want = np.percentile(f.double().numpy(), q)
        assert S._percentile_fp16(mm, q) == pytest.approx(want, abs=1e-12)
        assert S._percentile_fp16(f, q) == pytest.approx(want, abs=1e-12)
    r = S.fit_all({"r": S.ReAct(S.Energy(), 90)}, {"features": mm})["r"]
    assert r.threshold == pytest.approx(np.percentile(f.double().numpy(), 90), abs=1e-12)
    bad = f.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        S._percentile_fp16(bad, 50)
