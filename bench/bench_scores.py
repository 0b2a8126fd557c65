"""Speed of every scorer on cached ImageNet-sized outputs, read through mosx.scores.score_all /
fit_all as the evaluator does: fp16 logits (1,000 classes, 1,008 for MOS) and post-ReLU 2,048-d
features, random, on the CPU (and the GPU when present).

    pytest bench/bench_scores.py --benchmark-only                      # 10k rows scored, fit on 10k
    MOSX_BENCH_SCALE=imagenet pytest bench/bench_scores.py --benchmark-only
    MOSX_BENCH_QUICK=1 ...                                             # CI: 500 rows, 256-d, one round

Scales (rows scored / rows fitted / feature width):
  quick     500 / 2,000 / 256
  default   10,000 / 10,000 / 2,048
  imagenet  90,000 (50k ID + 40k OOD test rows, scored as one cache) / MOSX_BENCH_FIT_ROWS (default
            1,281,167, ImageNet's training set) / 2,048. The fit cache is 10.4 GB of fp16 at full size
            (5.2 GB of it features); MOSX_BENCH_FIT_ROWS=128000 gives a tenth of it on a small machine.

The fitted scorers get a fit benchmark (fit_all on the fit rows); every scorer is scored after a
fit on the fit rows. KNN is compared with one matrix product over the same data (full mode: a 100k
x 512 bank, 10k queries; median of 3): test_knn_against_one_matrix_product prints the ratio and
fails above 3x; ViM likewise against the product of the scored features with its residual basis.
"""

import os

import pytest
import torch

import mosx
from mosx import scores as S

QUICK = os.environ.get("MOSX_BENCH_QUICK", "0") == "1"  # CI: small sizes, one round
SCALE = "quick" if QUICK else os.environ.get("MOSX_BENCH_SCALE", "default")
if SCALE not in ("quick", "default", "imagenet"):
    raise ValueError(f"MOSX_BENCH_SCALE must be quick, default or imagenet, got {SCALE!r}")
C = 1000
N, F, D = {
    "quick": (500, 2000, 256),  # fit rows >= C: SHE needs a correct sample of every class
    "default": (10_000, 10_000, 2048),
    "imagenet": (90_000, int(os.environ.get("MOSX_BENCH_FIT_ROWS", "1281167")), 2048),
}[SCALE]
ROUNDS, WARMUP = (1, 0) if SCALE != "default" else (2, 1)  # imagenet: one timed run each (minutes)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _rows(gen, n, width, make, block=65_536):
    """[n, width] fp16 drawn in row blocks, so the float32 draw never exists whole."""
    out = torch.empty(n, width, dtype=torch.float16)
    for lo in range(0, n, block):
        out[lo : lo + block] = make(torch.randn(min(block, n - lo), width, generator=gen))
    return out


def _cache(seed, n, groups):
    """Rows of a trained-looking cache: every class labelled about n / C times, its logit raised so
    that most rows are classified correctly (SHE keeps only those)."""
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % C)[torch.randperm(n, generator=gen)]
    logits = _rows(gen, n, C, lambda z: z * 3)
    logits[torch.arange(n), labels] += 24  # far above the max of 1,000 N(0, 9) draws: every row correct
    return {
        "logits": logits,
        "grouped": _rows(gen, n, groups.num_logits, lambda z: z * 3),
        "features": _rows(gen, n, D, torch.relu),
        "labels": labels,
    }


@pytest.fixture(scope="module")
def cache():
    """The rows scored (the test sets), with the head and grouping the scorers use."""
    gen = torch.Generator().manual_seed(0)
    groups = mosx.Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    head = S.LinearHead(torch.randn(C, D, generator=gen) * 0.02, torch.zeros(C))
    return {**_cache(1, N, groups), "head": head, "groups": groups}


@pytest.fixture(scope="module")
def fit_cache(cache):
    """The rows fitted on (ImageNet's training set at full scale); the scored rows when sizes match."""
    if F == N:
        return cache
    return {**_cache(2, F, cache["groups"]), "head": cache["head"], "groups": cache["groups"]}


SPECS = [
    "mos",
    "msp",
    "maxlogit",
    "energy",
    "odin:temperature=1000",
    "gradnorm",
    "kl_matching",
    "mahalanobis",
    "mahalanobis:dtype=float32",
    "react-energy",
    # issue 15
    "entropy",
    "gen",
    "vim",
    "knn",
    "nnguide",
    "rmd",
    "fdbd",
    "nci",
    "she",
    "kl_matching:templates=labels",
]
FIT_SPECS = [
    "kl_matching",
    "mahalanobis",
    "vim",
    "knn",
    "nnguide",
    "rmd",
    "she",
    "fdbd",
    "nci",
    "kl_matching:templates=labels",
]


def _data(c, spec, labels=True):
    d = {
        "logits": c["grouped"] if spec == "mos" else c["logits"],
        "features": c["features"],
        "head": c["head"],
    }
    if labels:
        d["labels"] = c["labels"]
    return d


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("device", DEVICES)
def test_score(benchmark, cache, fit_cache, spec, device):
    s = S.build_scorer(spec, groups=cache["groups"], head=cache["head"])
    S.fit_all({spec: s}, _data(fit_cache, spec), device=device)
    benchmark.group = f"scores {N} rows (fit on {F}) {device}"
    data = _data(cache, spec, labels=False)
    out = benchmark.pedantic(
        lambda: S.score_all({spec: s}, data, device=device)[spec], rounds=ROUNDS, warmup_rounds=WARMUP
    )
    assert out.shape == (N,) and torch.isfinite(out).all()


@pytest.mark.parametrize("spec", FIT_SPECS)
@pytest.mark.parametrize("device", DEVICES)
def test_fit(benchmark, fit_cache, spec, device):
    data = _data(fit_cache, spec)
    benchmark.group = f"fit {F} rows {device}"
    s = benchmark.pedantic(
        lambda: S.fit_all({spec: S.build_scorer(spec)}, data, device=device)[spec], rounds=ROUNDS, warmup_rounds=0
    )
    assert s.fitted


def _median_seconds(fn, repeats):
    import time

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _against_product(device, product, scorer, what):
    """Time a scorer against the bare matrix product over the same data (a warm-up each, then the
    median of 3; one run in quick mode), print both and their ratio, and fail above 3x (not in quick
    mode, whose sizes are too small to time)."""

    def synced(fn):
        def run():
            fn()
            if device == "cuda":
                torch.cuda.synchronize()

        return run

    product, scorer = synced(product), synced(scorer)
    product(), scorer()  # warm-up
    repeats = 1 if QUICK else 3
    t_mm, t_s = _median_seconds(product, repeats), _median_seconds(scorer, repeats)
    ratio = t_s / t_mm
    print(f"\n{what} on {device}: score {t_s:.3f} s, product {t_mm:.3f} s, ratio {ratio:.2f} (median of {repeats})")
    if not QUICK:
        assert ratio < 3.0


@pytest.mark.parametrize("device", DEVICES)
def test_knn_against_one_matrix_product(device):
    """KNN's exact blocked search vs the bare product queries @ bank.T over the same data (in
    1024-row query blocks so that its [10k, 100k] output need not exist at once)."""
    M, Q, Dk = (5_000, 500, 64) if QUICK else (100_000, 10_000, 512)
    gen = torch.Generator().manual_seed(1)
    bank = torch.randn(M, Dk, generator=gen).relu().to(device)
    queries = torch.randn(Q, Dk, generator=gen).relu().to(device)
    knn = S.KNN(k=50).fit(features=bank)

    def product():
        for lo in range(0, Q, 1024):
            queries[lo : lo + 1024] @ knn._bank.T

    _against_product(device, product, lambda: knn.score(features=queries), f"knn k=50, {M} x {Dk} bank, {Q} queries")


@pytest.mark.parametrize("device", DEVICES)
def test_vim_against_one_matrix_product(cache, fit_cache, device):
    """ViM's score on the cached fp16 logits and features vs the bare product of the features with
    its residual basis ([N, D] x [D, D - dim]) over the same rows, cast as ViM casts them."""
    vim = S.ViM().fit(features=fit_cache["features"], head=cache["head"], device=device)
    data = {"logits": cache["logits"].to(device), "features": cache["features"].to(device)}
    basis = vim._residual_space.to(device, torch.float32)
    _against_product(
        device,
        lambda: data["features"].float() @ basis,
        lambda: vim.score(**data),
        f"vim, {N} x {D} features, residual basis {tuple(basis.shape)}",
    )


# ------------------------------------------------------------------------------ shaping wrappers (issue 15)
WRAPPER_SPECS = [
    "react-energy",
    "ash-energy:variant=p",
    "ash-energy:variant=b",
    "ash-energy",
    "scale-energy",
    "dice-energy",
    "react-mos",
    "ash-mos",
    "scale-mos",
    "dice-mos",
]


@pytest.fixture(scope="module")
def grouped_head(cache):
    gen = torch.Generator().manual_seed(1)
    return S.LinearHead(
        torch.randn(cache["groups"].num_logits, D, generator=gen) * 0.02, torch.zeros(cache["groups"].num_logits)
    )


@pytest.mark.parametrize("spec", WRAPPER_SPECS)
@pytest.mark.parametrize("device", DEVICES)
def test_shaping_wrappers(benchmark, cache, fit_cache, grouped_head, spec, device):
    """Shape the fp16 features, apply the head (the grouped one under MOS), score; fit on the fit rows."""
    head = grouped_head if spec.split(":")[0].endswith("-mos") else cache["head"]
    s = S.build_scorer(spec, groups=cache["groups"], head=head)
    S.fit_all({spec: s}, {"features": fit_cache["features"], "head": head}, device=device)
    data = {"features": cache["features"], "head": head}
    benchmark.group = f"shaping {N} rows {device}"
    out = benchmark.pedantic(
        lambda: S.score_all({spec: s}, data, device=device)[spec], rounds=ROUNDS, warmup_rounds=WARMUP
    )
    assert out.shape == (N,) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------ multi-layer Mahalanobis
@pytest.mark.parametrize("eps", [0.0, 0.001])
@pytest.mark.parametrize("device", DEVICES)
def test_mahalanobis_layers_on_images(benchmark, eps, device):
    """mahalanobis_layers reads images through the model, not a cache: the demo's CNN (plain-cnn-16,
    stem + 4 stages, 32 x 32 inputs), 1,000 fit images of 10 classes, scoring 512 images (eps > 0: one
    gradient per layer, as the reference). Quick mode: 200 fit images, 64 scored."""
    from mosx.train.models import build_model

    n_fit, n = (200, 64) if QUICK else (1000, 512)
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = build_model("plain-cnn-16", 10)[0].to(device).eval()
    x = torch.rand(n_fit, 3, 32, 32, generator=gen).to(device)
    y = torch.arange(n_fit, device=device) % 10
    s = S.MahalanobisLayers(eps=eps).fit(inputs=x, labels=y, model=model, device=device)
    s.fit_regression(model, x[:100], x[100:200].flip(-1) * 0.5, batch_size=64)
    imgs = torch.rand(n, 3, 32, 32, generator=gen).to(device)
    benchmark.group = f"mahalanobis_layers {n} images {device}"
    out = benchmark.pedantic(lambda: s.score(inputs=imgs, model=model), rounds=ROUNDS, warmup_rounds=WARMUP)
    assert out.shape == (n,) and torch.isfinite(out).all()
