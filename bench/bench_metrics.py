"""Speed of mosx.metrics on 10M scores (5M ID + 5M OOD).

    pytest bench/bench_metrics.py --benchmark-only
Runs on the CPU, and on the GPU when one is present. MOSX_BENCH_QUICK=1: 100k scores, one round. Continuous scores (all distinct) and heavily
tied scores (rounded to 3 decimals) are both timed.
"""

import os

import pytest
import torch

import mosx.metrics as M

QUICK = os.environ.get("MOSX_BENCH_QUICK", "0") == "1"  # CI: small sizes, one round
N = 50_000 if QUICK else 5_000_000
ROUNDS = 1 if QUICK else 3
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def scores(device, kind):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randn(N, generator=gen) + 1.0
    oods = torch.randn(N, generator=gen)
    if kind == "tied":
        ids, oods = torch.round(ids, decimals=3), torch.round(oods, decimals=3)
    return ids.to(device), oods.to(device)


@pytest.mark.parametrize("kind", ["distinct", "tied"])
@pytest.mark.parametrize("device", DEVICES)
def test_ood_metrics(benchmark, device, kind):
    ids, oods = scores(device, kind)
    benchmark.group = f"metrics {2 * N} {device}"
    m = benchmark.pedantic(M.ood_metrics, args=(ids, oods), rounds=ROUNDS, warmup_rounds=0 if QUICK else 1)
    assert 0.7 < m.auroc < 0.8  # N(1,1) vs N(0,1): AUROC = Phi(1/sqrt 2) = 0.760


@pytest.mark.parametrize("device", DEVICES)
def test_sklearn_roc_auc_for_reference(benchmark, device):
    # The usual way: scikit-learn on the host, one metric only.
    skm = pytest.importorskip("sklearn.metrics")
    import numpy as np

    ids, oods = scores(device, "distinct")
    benchmark.group = f"metrics {2 * N} {device}"

    def run():
        s = torch.cat([ids, oods]).cpu().numpy()
        y = np.r_[np.ones(N), np.zeros(N)]
        return skm.roc_auc_score(y, s)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)


@pytest.mark.parametrize("device", DEVICES)
def test_accumulator_in_batches(benchmark, device):
    """OODMetricsAccumulator fed in 1,000 batches, then compute(): same numbers as ood_metrics."""
    ids, oods = scores(device, "tied")
    s = torch.cat([ids, oods])
    is_id = torch.arange(2 * N, device=device) < N
    perm = torch.randperm(2 * N, generator=torch.Generator().manual_seed(1)).to(device)
    s, is_id = s[perm], is_id[perm]
    batches = list(zip(s.chunk(1000), is_id.chunk(1000)))
    benchmark.group = f"metrics {2 * N} {device}"

    def run():
        acc = M.OODMetricsAccumulator()
        for b, m in batches:
            acc.update(b, m)
        return acc.compute()

    m = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=0)
    assert m == M.ood_metrics(ids, oods)
