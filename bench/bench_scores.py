"""Speed of every scorer on cached ImageNet-sized outputs: 10,000 rows of fp16 logits (1,000 classes,
1,008 for MOS) and 2,048-d features, read through mosx.scores.score_all as the evaluator does.

    pytest bench/bench_scores.py --benchmark-only
MOSX_BENCH_QUICK=1: 500 rows, 256-d features, one round.

The fitted scorers also get a fit benchmark (fit_all on the same rows), and KNN is compared with
one matrix product over the same data (full mode: a 100k x 512 bank, 10k queries; median of 3):
test_knn_against_one_matrix_product prints the ratio and fails above 3x.
"""

import os

import pytest
import torch

import mosx
from mosx import scores as S

QUICK = os.environ.get("MOSX_BENCH_QUICK", "0") == "1"  # CI: small sizes, one round
N, C, D = (500, 1000, 256) if QUICK else (10_000, 1000, 2048)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def cache():
    gen = torch.Generator().manual_seed(0)
    groups = mosx.Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    return {
        "logits": (torch.randn(N, C, generator=gen) * 3).half(),
        "grouped": (torch.randn(N, groups.num_logits, generator=gen) * 3).half(),
        "features": torch.randn(N, D, generator=gen).relu().half(),
        "labels": torch.randint(0, C, (N,), generator=gen),
        "head": S.LinearHead(torch.randn(C, D, generator=gen) * 0.02, torch.zeros(C)),
        "groups": groups,
    }


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
    "kl_matching:templates=labels",
]
FIT_SPECS = ["vim", "knn", "nnguide", "rmd", "fdbd", "nci", "kl_matching:templates=labels"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("device", DEVICES)
def test_score_10k_rows(benchmark, cache, spec, device):
    s = S.build_scorer(spec, groups=cache["groups"], head=cache["head"])
    data = {
        "logits": cache["grouped"] if spec == "mos" else cache["logits"],
        "features": cache["features"],
        "labels": cache["labels"],
        "head": cache["head"],
    }
    S.fit_all({spec: s}, data, device=device)
    data.pop("labels")
    benchmark.group = f"scores {N} rows {device}"
    out = benchmark.pedantic(
        lambda: S.score_all({spec: s}, data, device=device)[spec],
        rounds=1 if QUICK else 2,
        warmup_rounds=0 if QUICK else 1,
    )
    assert out.shape == (N,) and torch.isfinite(out).all()


@pytest.mark.parametrize("spec", FIT_SPECS)
@pytest.mark.parametrize("device", DEVICES)
def test_fit_10k_rows(benchmark, cache, spec, device):
    data = {"logits": cache["logits"], "features": cache["features"], "labels": cache["labels"], "head": cache["head"]}
    benchmark.group = f"fit {N} rows {device}"
    s = benchmark.pedantic(
        lambda: S.fit_all({spec: S.build_scorer(spec)}, data, device=device)[spec],
        rounds=1 if QUICK else 2,
        warmup_rounds=0,
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


@pytest.mark.parametrize("device", DEVICES)
def test_knn_against_one_matrix_product(device):
    """KNN's exact blocked search vs the bare product queries @ bank.T over the same data (in
    1024-row query blocks so that its [10k, 100k] output need not exist at once)."""
    M, Q, Dk = (5_000, 500, 64) if QUICK else (100_000, 10_000, 512)
    gen = torch.Generator().manual_seed(1)
    bank = torch.randn(M, Dk, generator=gen).relu().to(device)
    queries = torch.randn(Q, Dk, generator=gen).relu().to(device)
    knn = S.KNN(k=50).fit(features=bank)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def product():
        for lo in range(0, Q, 1024):
            queries[lo : lo + 1024] @ knn._bank.T
        sync()

    def search():
        knn.score(features=queries)
        sync()

    product(), search()  # warm-up
    repeats = 1 if QUICK else 3
    t_mm, t_knn = _median_seconds(product, repeats), _median_seconds(search, repeats)
    ratio = t_knn / t_mm
    print(
        f"\nknn k=50, {M} x {Dk} bank, {Q} queries on {device}: search {t_knn:.3f} s, "
        f"product {t_mm:.3f} s, ratio {ratio:.2f} (median of {repeats})"
    )
    if not QUICK:
        assert ratio < 3.0


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
def test_shaping_wrappers(benchmark, cache, grouped_head, spec, device):
    """Shape the fp16 features, apply the head (the grouped one under MOS), score: fit on the same rows."""
    head = grouped_head if spec.split(":")[0].endswith("-mos") else cache["head"]
    s = S.build_scorer(spec, groups=cache["groups"], head=head)
    data = {"features": cache["features"], "head": head}
    S.fit_all({spec: s}, data, device=device)
    benchmark.group = f"shaping {N} rows {device}"
    out = benchmark.pedantic(
        lambda: S.score_all({spec: s}, data, device=device)[spec],
        rounds=1 if QUICK else 2,
        warmup_rounds=0 if QUICK else 1,
    )
    assert out.shape == (N,) and torch.isfinite(out).all()
