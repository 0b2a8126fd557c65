"""Speed of every scorer on cached ImageNet-sized outputs: 10,000 rows of fp16 logits (1,000 classes,
1,008 for MOS) and 2,048-d features, read through mosx.scores.score_all as the evaluator does.

    pytest bench/bench_scores.py --benchmark-only
MOSX_BENCH_QUICK=1: 500 rows, 256-d features, one round.
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


SPECS = ["mos", "msp", "maxlogit", "energy", "odin:temperature=1000", "gradnorm", "kl_matching",
         "mahalanobis", "mahalanobis:dtype=float32", "react-energy"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("device", DEVICES)
def test_score_10k_rows(benchmark, cache, spec, device):
    s = S.build_scorer(spec, groups=cache["groups"], head=cache["head"])
    data = {"logits": cache["grouped"] if spec == "mos" else cache["logits"], "features": cache["features"],
            "labels": cache["labels"], "head": cache["head"]}
    S.fit_all({spec: s}, data, device=device)
    data.pop("labels")
    benchmark.group = f"scores {N} rows {device}"
    out = benchmark.pedantic(lambda: S.score_all({spec: s}, data, device=device)[spec], rounds=1 if QUICK else 2, warmup_rounds=0 if QUICK else 1)
    assert out.shape == (N,) and torch.isfinite(out).all()
