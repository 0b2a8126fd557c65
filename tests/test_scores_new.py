"""The scorers of issue 15 (entropy, GEN, ViM, KNN, NNGuide, RMD, SHE, fDBD, NCI, KL matching with
label templates) against direct implementations of each paper's formula in float64 (loops on
purpose), a second formulation where one exists, a tiny trained model, and the strict keywords of
Scorer.fit / Scorer.score."""

import math

import numpy as np
import pytest
import torch

from mosx import scores as S
from mosx.metrics import auroc
from mosx.scores import neighbors

TOL = 1e-9


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def softmax_row(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def logsumexp_row(z):
    m = z.max()
    return m + math.log(sum(math.exp(v - m) for v in z))


def head_and_data(gen, n, D, C, scale=1.0):
    w, b = rand(gen, C, D), rand(gen, C)
    f = rand(gen, n, D) * scale + 0.3
    return S.LinearHead(w, b), f, f @ w.T + b


# ------------------------------------------------------------------------------ entropy, GEN
def test_entropy_against_the_formula(gen, device):
    z = rand(gen, 50, 9) * 4
    want = [sum(p * math.log(p) for p in softmax_row(r) if p > 0) for r in z.numpy()]
    got = S.Entropy().score(logits=z.to(device)).cpu()
    np.testing.assert_allclose(got, want, atol=TOL)
    # second formulation: -H(p) = sum_c p_c z_c - logsumexp(z)
    p = torch.softmax(z, 1)
    np.testing.assert_allclose(got, (p * z).sum(1) - torch.logsumexp(z, 1), atol=TOL)
    assert (got <= 1e-12).all() and (got >= -math.log(9) - 1e-12).all()


@pytest.mark.parametrize("gamma, M", [(0.1, 100), (0.1, 3), (0.5, 1), (2.0, 7)])
def test_gen_against_the_formula(gen, device, gamma, M):
    z = rand(gen, 40, 7) * 3
    want = []
    for r in z.numpy():
        top = sorted(softmax_row(r), reverse=True)[:M]  # the M largest probabilities, summed
        want.append(-sum(p**gamma * (1 - p) ** gamma for p in top))
    got = S.build_scorer(f"gen:gamma={gamma},M={M}").score(logits=z.to(device)).cpu()
    np.testing.assert_allclose(got, want, atol=TOL)
    if M >= 7:  # every class: the order does not matter
        p = torch.softmax(z, 1)
        np.testing.assert_allclose(got, -(p**gamma * (1 - p) ** gamma).sum(1), atol=TOL)


def test_gen_spec_and_errors():
    g = S.build_scorer("gen:gamma=0.1,M=100")
    assert isinstance(g, S.GEN) and (g.gamma, g.M) == (0.1, 100)
    with pytest.raises(ValueError, match="gamma"):
        S.GEN(gamma=0)
    with pytest.raises(ValueError, match="M must be"):
        S.GEN(M=0)


# ------------------------------------------------------------------------------ ViM
def ref_vim(f_fit, w, b, f, z, dim):
    """The ViM paper's recipe, step by step in NumPy."""
    u = -np.linalg.pinv(w) @ b
    x = f_fit - u
    cov = x.T @ x / len(x)
    evals, evecs = np.linalg.eig(cov)
    order = np.argsort(-evals.real)
    ns = evecs.real[:, order[dim:]]
    z_fit = f_fit @ w.T + b
    alpha = z_fit.max(1).mean() / np.linalg.norm(x @ ns, axis=1).mean()
    v = alpha * np.array([np.linalg.norm((fi - u) @ ns) for fi in f])
    return np.array([logsumexp_row(r) for r in z]) - v, v, alpha


def test_vim_against_the_paper(gen, device):
    D, C, dim = 12, 5, 4
    head, f_fit, _ = head_and_data(gen, 400, D, C)
    f_fit[:, :dim] *= 4  # a clear principal subspace
    f = rand(gen, 30, D) * 2
    z = f @ head.weight.T + head.bias
    want, v, alpha = ref_vim(f_fit.numpy(), head.weight.numpy(), head.bias.numpy(), f.numpy(), z.numpy(), dim)
    m = S.build_scorer(f"vim:dim={dim}").fit(features=f_fit.to(device), head=head)
    assert m.alpha == pytest.approx(alpha, rel=1e-9)
    got = m.score(logits=z.to(device), features=f.to(device)).cpu()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    # second formulation: the paper's OOD probability, the virtual logit's softmax p_v, and
    # score = log((1 - p_v) / p_v); the residual as sqrt(|x|^2 - |P^T x|^2)
    p_v = torch.softmax(torch.cat([z, torch.tensor(v)[:, None]], 1), 1)[:, -1]
    np.testing.assert_allclose(got, torch.log((1 - p_v) / p_v), rtol=1e-7, atol=1e-7)
    x = f - m._origin
    principal = torch.linalg.eigh((f_fit - m._origin).T @ (f_fit - m._origin) / 400)[1][:, -dim:]
    res = ((x * x).sum(1) - ((x @ principal) ** 2).sum(1)).sqrt()
    np.testing.assert_allclose(m.residual(f), res, rtol=1e-7)


def test_vim_default_dim_errors_and_replace(gen):
    head, f_fit, z_fit = head_and_data(gen, 100, 10, 3)
    m = S.ViM().fit(features=f_fit, head=head)
    assert m._fitted_dim == 5  # D // 2 below 768-d features (1000 of 2048, 512 of 768 as the paper)
    assert 5 in m.search_space()["dim"] and all(0 < d < 10 for d in m.search_space()["dim"])
    with pytest.raises(ValueError, match="dim = 10 must be smaller than the feature width 10"):
        S.ViM(dim=10).fit(features=f_fit, head=head)
    with pytest.raises(ValueError, match="fit needs `head`"):
        S.ViM(dim=3).fit(features=f_fit)
    with pytest.raises(ValueError, match="columns but the scorer was fitted on 10"):
        m.score(logits=z_fit, features=f_fit[:, :9])
    # the subspace depends on dim: a replaced dim needs a refit
    m2 = m.replace(dim=3)
    with pytest.raises(RuntimeError, match="fit"):
        m2.score(logits=z_fit, features=f_fit)
    assert m.replace(dim=None).fitted  # unchanged: still fitted


# ------------------------------------------------------------------------------ KNN, NNGuide
def test_knn_against_the_paper(gen, device, monkeypatch):
    bank, q = rand(gen, 300, 8) + 0.2, rand(gen, 70, 8)
    bn = bank.numpy() / np.linalg.norm(bank.numpy(), axis=1, keepdims=True)
    qn = q.numpy() / np.linalg.norm(q.numpy(), axis=1, keepdims=True)
    for k in (1, 7, 300):
        want = [-sorted(np.linalg.norm(bn - r, axis=1))[k - 1] for r in qn]  # minus the k-th distance
        s = S.build_scorer(f"knn:k={k}").fit(features=bank.to(device))
        np.testing.assert_allclose(s.score(features=q.to(device)).cpu(), want, atol=1e-7)
        # blocked: many query blocks and bank blocks of a few rows each give the same numbers
        monkeypatch.setitem(neighbors._BLOCK_ELEMS, torch.device(device).type, 37 * 23)
        np.testing.assert_allclose(s.score(features=q.to(device)).cpu(), want, atol=1e-7)
        monkeypatch.undo()


def test_topk_similarities_blocked_equals_a_full_sort(gen):
    q, bank = rand(gen, 1100, 5), rand(gen, 200, 5)  # more than one query block of 1024 rows
    full = (q @ bank.T).sort(dim=1, descending=True).values[:, :13]
    for elems in (None, 13, 14_000, 10**6):  # bank blocks of 13 rows (= k), 13 rows, 200 rows
        torch.testing.assert_close(neighbors.topk_similarities(q, bank, 13, block_elems=elems), full)
    with pytest.raises(ValueError, match="k must be in"):
        neighbors.topk_similarities(q, bank, 201)


def test_nnguide_against_the_paper(gen, device):
    D, C, k = 6, 4, 5
    head, f_fit, z_fit = head_and_data(gen, 200, D, C)
    f = rand(gen, 25, D)
    z = f @ head.weight.T + head.bias
    fn = f_fit.numpy()
    energy_fit = np.array([logsumexp_row(r) for r in z_fit.numpy()])
    bank = fn / np.linalg.norm(fn, axis=1, keepdims=True) * energy_fit[:, None]
    want = []
    for fi, zi in zip(f.numpy(), z.numpy()):
        sims = sorted(bank @ (fi / np.linalg.norm(fi)), reverse=True)[:k]
        want.append(logsumexp_row(zi) * np.mean(sims))
    s = S.build_scorer(f"nnguide:k={k}").fit(features=f_fit.to(device), logits=z_fit.to(device))
    np.testing.assert_allclose(s.score(features=f.to(device), logits=z.to(device)).cpu(), want, rtol=1e-9, atol=1e-9)


def test_neighbours_fit_from_an_fp16_memmap_and_errors(gen, tmp_path):
    f = (rand(gen, 70_000, 4) + 1).half()  # more than one row block of 65,536
    mm = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float16, shape=tuple(f.shape))
    mm[:] = f.numpy()
    mm.flush()
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    probe = rand(gen, 20, 4).float()
    a = S.fit_all({"knn": S.KNN(k=3)}, {"features": mm})["knn"]
    b = S.KNN(k=3).fit(features=f.float())
    assert a._bank.dtype == torch.float32
    torch.testing.assert_close(a.score(features=probe), b.score(features=probe))
    small = rand(gen, 5, 4)
    with pytest.raises(ValueError, match="k = 50 is larger than the fit set"):
        S.KNN().fit(features=small)
    with pytest.raises(ValueError, match="k = 6 is larger than the fit set"):
        S.KNN(k=2).fit(features=small).replace(k=6).score(features=small)
    with pytest.raises(ValueError, match="k = 10 is larger than the fit set"):
        S.NNGuide().fit(features=small, logits=small)
    with pytest.raises(ValueError, match="fitted on 4"):
        b.score(features=probe[:, :3])
    with pytest.raises(ValueError, match="needs `features`"):
        S.KNN().fit()
    with pytest.raises(ValueError, match="positive integer"):
        S.KNN(k=0)


# ------------------------------------------------------------------------------ RMD, SHE
def ref_rmd(f_fit, y, f):
    classes = sorted(set(y.tolist()))
    means = {c: f_fit[y == c].mean(0) for c in classes}
    cov = sum(np.outer(x - means[c], x - means[c]) for x, c in zip(f_fit, y)) / len(f_fit)
    mu0 = f_fit.mean(0)
    cov0 = sum(np.outer(x - mu0, x - mu0) for x in f_fit) / len(f_fit)
    prec, prec0 = np.linalg.pinv(cov, hermitian=True), np.linalg.pinv(cov0, hermitian=True)
    out = []
    for x in f:
        md0 = (x - mu0) @ prec0 @ (x - mu0)
        rmd = [(x - means[c]) @ prec @ (x - means[c]) - md0 for c in classes]  # RMD_k = MD_k - MD_0
        out.append(-min(rmd))
    return np.array(out)


@pytest.mark.parametrize("n, d, c", [(300, 6, 4), (12, 20, 3)])  # full rank, and singular (pinv)
def test_rmd_against_the_paper(gen, device, n, d, c):
    y = torch.arange(n) % c
    f_fit = rand(gen, n, d) + y[:, None].double() * 0.8
    f = rand(gen, 20, d)
    s = S.RMD().fit(features=f_fit.to(device), labels=y.to(device))
    got = s.score(features=f.to(device)).cpu()
    np.testing.assert_allclose(got, ref_rmd(f_fit.numpy(), y.numpy(), f.numpy()), rtol=1e-7, atol=1e-6)
    # second formulation: the Mahalanobis scorer's distance minus the background term
    maha = S.Mahalanobis().fit(features=f_fit, labels=y).score(features=f)  # -min_k MD_k
    np.testing.assert_allclose(got, maha + s.background_distance(f), rtol=1e-7, atol=1e-6)
    with pytest.raises(ValueError, match="needs `labels`"):
        S.RMD().fit(features=f_fit)
    with pytest.raises(ValueError, match=f"fitted on {d}"):
        s.score(features=f[:, 1:])


def test_she_against_the_paper(gen, device):
    D, C = 5, 3
    head, f_fit, z_fit = head_and_data(gen, 300, D, C)
    y = z_fit.argmax(1).clone()
    y[::4] = (y[::4] + 1) % C  # a quarter misclassified: left out of the patterns
    f = rand(gen, 30, D)
    z = f @ head.weight.T + head.bias
    fn, zn, yn = f_fit.numpy(), z_fit.numpy(), y.numpy()
    patterns = [fn[(yn == c) & (zn.argmax(1) == c)].mean(0) for c in range(C)]
    want = [fi @ patterns[zi.argmax()] for fi, zi in zip(f.numpy(), z.numpy())]
    s = S.SHE().fit(features=f_fit.to(device), labels=y.to(device), logits=z_fit.to(device))
    np.testing.assert_allclose(s.score(features=f.to(device), logits=z.to(device)).cpu(), want, rtol=1e-9, atol=1e-9)
    never = z_fit.clone()
    never[:, 2] = -1e9  # class 2 is never predicted: no pattern
    with pytest.raises(ValueError, match=r"1 class\(es\) have no correctly classified fit sample \(2\)"):
        S.SHE().fit(features=f_fit, labels=y, logits=never)
    with pytest.raises(ValueError, match="labels must be < 3"):
        S.SHE().fit(features=f_fit, labels=y + 3, logits=z_fit)


# ------------------------------------------------------------------------------ fDBD, NCI
def test_fdbd_against_the_paper(gen, device):
    D, C = 6, 5
    head, f_fit, _ = head_and_data(gen, 150, D, C)
    f = rand(gen, 30, D)
    z = f @ head.weight.T + head.bias
    w, b = head.weight.numpy(), head.bias.numpy()
    mu = f_fit.numpy().mean(0)
    for normalizer in ("mean", "norm"):
        want = []
        for fi in f.numpy():
            logit = w @ fi + b
            p = logit.argmax()
            dists = []
            for c in range(C):
                if c == p:
                    continue
                # the boundary {x : (w_p - w_c) x + b_p - b_c = 0}: distance of f as its projection
                nrm = w[p] - w[c]
                proj = fi - ((nrm @ fi + b[p] - b[c]) / (nrm @ nrm)) * nrm
                dists.append(np.linalg.norm(fi - proj))
            ref = np.linalg.norm(fi - mu) if normalizer == "mean" else np.linalg.norm(fi)
            want.append(np.mean(dists) / ref)
        s = S.build_scorer(f"fdbd:normalizer={normalizer}").fit(features=f_fit.to(device), head=head)
        np.testing.assert_allclose(s.score(logits=z.to(device), features=f.to(device)).cpu(), want, rtol=1e-9)
    twin = S.LinearHead(torch.cat([head.weight[:1], head.weight[:1]]), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="identical head weights"):
        S.FDBD().fit(features=f_fit, head=twin)
    with pytest.raises(ValueError, match="the head reads 6-d features, the fit features are 5-d"):
        S.FDBD().fit(features=f_fit[:, :5], head=head)


def test_nci_against_openood_formula(gen, device):
    D, C = 7, 4
    head, f_fit, _ = head_and_data(gen, 120, D, C)
    f = rand(gen, 30, D)
    z = f @ head.weight.T + head.bias
    w = head.weight.numpy()
    mu = f_fit.numpy().mean(0)
    for alpha in (0.0, 1e-4, 0.1):
        want = []
        for fi, zi in zip(f.numpy(), z.numpy()):
            c = fi - mu
            want.append(w[zi.argmax()] @ c / np.linalg.norm(c) + alpha * np.abs(fi).sum())
        s = S.build_scorer(f"nci:alpha={alpha}").fit(features=f_fit.to(device), head=head)
        np.testing.assert_allclose(
            s.score(logits=z.to(device), features=f.to(device)).cpu(), want, rtol=1e-9, atol=1e-12
        )
    with pytest.raises(ValueError, match="alpha"):
        S.NCI(alpha=-1)


# ------------------------------------------------------------------------------ KL matching
def test_kl_matching_with_label_templates(gen, device):
    C = 5
    z_fit, z = rand(gen, 200, C) * 2, rand(gen, 30, C) * 2
    y = torch.randint(0, C - 1, (200,), generator=gen)  # class 4 has no labelled sample: no template
    p_fit = np.array([softmax_row(r) for r in z_fit.numpy()])
    templates = [p_fit[y.numpy() == c].mean(0) for c in range(C - 1)]
    want = [
        -min(sum(pi * math.log(pi / qi) for pi, qi in zip(softmax_row(r), q)) for q in templates) for r in z.numpy()
    ]
    k = S.build_scorer("kl_matching:templates=labels").fit(logits=z_fit.to(device), labels=y.to(device))
    assert k.fit_needs == ("logits", "labels") and k._log_templates.shape == (C - 1, C)
    np.testing.assert_allclose(k.score(logits=z.to(device)).cpu(), want, atol=TOL)
    # the default keeps today's templates (from predictions) and differs from the labelled ones
    default = S.build_scorer("kl_matching").fit(logits=z_fit)
    assert default.templates == "predictions" and not torch.allclose(default.score(logits=z), k.score(logits=z))
    with pytest.raises(ValueError, match="needs `labels`"):
        S.KLMatching(templates="labels").fit(logits=z_fit)
    with pytest.raises(ValueError, match=r"class ids in \[0, 5\)"):
        S.KLMatching(templates="labels").fit(logits=z_fit, labels=y + 5)
    with pytest.raises(ValueError, match="templates must be one of"):
        S.KLMatching(templates="both")
    assert not k.replace(templates="predictions").fitted  # the templates depend on it: refit


# ------------------------------------------------------------------------------ strict keywords
def test_fit_and_score_refuse_data_they_do_not_read(gen):
    z, f, y = rand(gen, 20, 4), rand(gen, 20, 3).relu() + 0.1, torch.arange(20) % 4
    with pytest.raises(TypeError, match="kl_matching: fit\\(\\) got `labels`, which it does not read"):
        S.KLMatching().fit(logits=z, labels=y)
    with pytest.raises(TypeError, match="msp: score\\(\\) got `features`"):
        S.MSP().score(logits=z, features=f)
    with pytest.raises(TypeError, match="knn: fit\\(\\) got `labels`"):
        S.KNN(k=2).fit(features=f, labels=y)
    with pytest.raises(TypeError, match="energy: fit\\(\\) got `features`"):
        S.Energy().fit(features=f)
    # what a scorer does read passes, and None carries no data
    S.Mahalanobis().fit(features=f, logits=z)  # labels from the logits' argmax, as documented
    S.MSP().score(logits=z, features=None)
    S.KLMatching().fit(logits=z, device="cpu")
    # missing data: the scorer's own message, not a complaint about the extra keyword
    with pytest.raises(ValueError, match="needs `inputs` and `model`"):
        S.ODIN(1000, 0.01).score(logits=z)
    # fit_all / score_all hand each scorer only what it declares
    head = S.LinearHead(rand(gen, 4, 3), rand(gen, 4))
    zf = head(f)
    data = {"logits": zf, "features": f, "labels": y, "head": head}
    scorers = {
        "kl": S.KLMatching(),
        "kll": S.KLMatching("labels"),
        "maha": S.Mahalanobis(),
        "vim": S.ViM(dim=1),
        "knn": S.KNN(k=3),
        "react": S.ReAct(S.KLMatching()),
        "msp": S.MSP(),
    }
    S.fit_all(scorers, data)
    out = S.score_all(scorers, {k: v for k, v in data.items() if k != "labels"})
    torch.testing.assert_close(out["kl"], S.KLMatching().fit(logits=zf).score(logits=zf))
    torch.testing.assert_close(out["kll"], S.KLMatching("labels").fit(logits=zf, labels=y).score(logits=zf))
    torch.testing.assert_close(out["vim"], S.ViM(dim=1).fit(features=f, head=head).score(logits=zf, features=f))
    assert set(out) == set(scorers)
    # a wrapper hands its base the shaped logits and features; the base takes what it reads
    r = S.ReAct(S.KLMatching(), threshold=0.5, head=head).fit(features=f)
    want = S.KLMatching().fit(logits=head(f.clamp(max=0.5))).score(logits=head(f.clamp(max=0.5)))
    torch.testing.assert_close(r.score(features=f), want)
    with pytest.raises(TypeError, match="react-kl_matching: fit\\(\\) got `inputs`"):
        S.ReAct(S.KLMatching(), head=head).fit(features=f, inputs=f)
    with pytest.raises(ValueError, match=r"needs \['head'\] to fit"):
        S.fit_all({"vim": S.ViM(dim=1)}, {"features": f})
    with pytest.raises(ValueError, match=r"needs \['labels'\] to fit"):
        S.fit_all({"rmd": S.RMD()}, {"features": f, "logits": zf})


def test_search_spaces():
    assert S.MSP().search_space() == {} and S.Mahalanobis().search_space() == {}
    for spec in ("gen", "vim", "knn", "nnguide", "fdbd", "nci"):
        s = S.build_scorer(spec)
        space = s.search_space()
        assert space and all(isinstance(v, list) and v for v in space.values())
        for k, values in space.items():
            assert hasattr(s, k)
            for v in values:
                s.replace(**{k: v})  # each candidate is a valid value of that hyperparameter
    assert S.build_scorer("knn").search_space()["k"][3] == 50  # the paper's CIFAR value in its grid
    assert S.Entropy().search_space() == {} and S.RMD().search_space() == {} and S.SHE().search_space() == {}


# ------------------------------------------------------------------------------ a tiny trained model
@pytest.fixture(scope="module")
def blobs():
    """A linear classifier trained for a few steps on 4 separable Gaussian blobs in 16-d (ReLU
    features), with OOD blobs of the same spread elsewhere: between two classes and along directions no
    class uses."""
    g = torch.Generator().manual_seed(1234)
    D, C = 16, 4
    centres = torch.zeros(C, D)
    for c in range(C):
        centres[c, 2 * c : 2 * c + 2] = 4.0

    def draw(mu, n):
        return (mu + 0.3 * torch.randn(n, D, generator=g)).relu()

    y_fit = torch.arange(2000) % C
    f_fit = draw(centres[y_fit], 2000)
    torch.manual_seed(0)
    fc = torch.nn.Linear(D, C)
    opt = torch.optim.SGD(fc.parameters(), lr=0.1)
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(fc(f_fit), y_fit).backward()
        opt.step()
    fc.eval()
    y_id = torch.arange(400) % C
    f_id = draw(centres[y_id], 400)
    ood_centres = torch.zeros(2, D)
    ood_centres[0] = (centres[0] + centres[1]) / 2  # between two classes
    ood_centres[1, 10:] = 3.0  # along directions no class uses
    f_ood = torch.cat([draw(ood_centres[0], 200), draw(ood_centres[1], 200)])
    with torch.no_grad():
        return {
            "fit": {"features": f_fit, "labels": y_fit, "logits": fc(f_fit), "head": S.LinearHead.from_module(fc)},
            "id": {"features": f_id, "logits": fc(f_id)},
            "ood": {"features": f_ood, "logits": fc(f_ood)},
            "accuracy": float((fc(f_id).argmax(1) == y_id).float().mean()),
        }


SPECS = [
    "entropy",
    "gen",
    "gen:gamma=0.5,M=2",
    "vim:dim=8",
    "knn:k=10",
    "nnguide:k=10",
    "rmd",
    "she",
    "fdbd",
    "fdbd:normalizer=norm",
    "nci",
    "kl_matching:templates=labels",
]


@pytest.mark.parametrize("spec", SPECS)
def test_a_tiny_trained_model_ranks_id_above_ood(blobs, spec):
    assert blobs["accuracy"] > 0.95
    s = S.build_scorer(spec)
    S.fit_all({spec: s}, blobs["fit"])
    out_id = S.score_all({spec: s}, blobs["id"])[spec]
    out_ood = S.score_all({spec: s}, blobs["ood"])[spec]
    assert torch.isfinite(out_id).all() and torch.isfinite(out_ood).all()
    assert auroc(out_id, out_ood) > 0.9


def test_registry_has_the_new_scorers_in_order():
    names = S.scorer_names()
    new = ("entropy", "gen", "vim", "knn", "nnguide", "rmd", "she", "fdbd", "nci")
    assert names[-len(new) :] == new
    assert names[:8] == ("mos", "msp", "maxlogit", "energy", "odin", "kl_matching", "mahalanobis", "gradnorm")
    for name in new:
        s = S.build_scorer(name)
        assert type(s).spec_name == name == s.name and type(s).__doc__ and "Conventions" in (type(s).__doc__ or "")
