"""CPU speed of the fused ops vs the reference loop vs torch.compile of the reference.

Layout: the MOS ImageNet taxonomy (1008 logits in 8 groups). Run:
    pytest bench/bench_ops.py --benchmark-json=bench/results/cpu.json
    python bench/report.py bench/results/cpu.json      # markdown table of medians and ratios
"""

import functools

import pytest
import torch
from conftest import QUICK

import mosx
from mosx import reference

GROUPS = mosx.Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
BATCHES = [256] if QUICK else [256, 4096, 65536]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# torch.compile of the reference takes minutes to compile on 2 cores: left out of the quick run.
IMPLS = ["fused", "reference"] + ([] if QUICK else ["compiled_reference"])


@functools.cache
def compiled(fn):
    return torch.compile(fn, dynamic=True)


def ref_score(x):
    return reference.group_softmax_score(x, GROUPS)


def ref_predict(x):
    return reference.group_predict(x, GROUPS)[:2]


def ref_ce(x, t):
    return reference.group_cross_entropy(x, t, GROUPS)


def fused_score(x):
    return mosx.group_softmax_score(x, GROUPS)


def fused_predict(x):
    return mosx.group_predict(x, GROUPS)


def fused_ce(x, t):
    return mosx.group_cross_entropy(x, t, GROUPS)


FUNCS = {
    ("score", "fused"): fused_score,
    ("score", "reference"): ref_score,
    ("predict", "fused"): fused_predict,
    ("predict", "reference"): ref_predict,
    ("ce_fwd_bwd", "fused"): fused_ce,
    ("ce_fwd_bwd", "reference"): ref_ce,
}


def get_fn(op, impl):
    if impl == "compiled_reference":
        return compiled(FUNCS[(op, "reference")])
    return FUNCS[(op, impl)]


def rounds_for(n):
    return 3 if n >= 65536 else (10 if n >= 4096 else 30)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("op", ["score", "predict", "ce_fwd_bwd"])
def test_op(benchmark, op, n, dtype, impl):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, GROUPS.num_logits, generator=g) * 3).to(DTYPES[dtype])
    fn = get_fn(op, impl)
    benchmark.group = f"{op} n={n} {dtype}"
    benchmark.extra_info.update(op=op, n=n, dtype=dtype, impl=impl)
    if op == "ce_fwd_bwd":
        t = torch.randint(0, GROUPS.num_classes, (n,), generator=g)
        x.requires_grad_()

        def run():
            x.grad = None
            fn(x, t).backward()

        run()  # warm-up (and compilation for the compiled reference)
        benchmark.pedantic(run, rounds=1 if QUICK else rounds_for(n), warmup_rounds=0 if QUICK else 1)
        assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    else:
        fn(x)
        out = benchmark.pedantic(fn, args=(x,), rounds=1 if QUICK else rounds_for(n), warmup_rounds=0 if QUICK else 1)
        first = out[0] if isinstance(out, tuple) else out
        assert first.shape == (n,)
