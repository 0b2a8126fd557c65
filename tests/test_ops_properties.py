"""Property tests (hypothesis): the public ops against mosx.reference on random layouts, dtypes,
strides, NaN/inf placements, targets and ignore indices (rules: docs/semantics.md)."""

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mosx
from mosx import Groups, reference

SETTINGS = settings(max_examples=300, deadline=None)
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
# tolerance of the op's output vs the reference run in float64 on the same (rounded) values
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2}
SPECIALS = [float("nan"), float("inf"), float("-inf")]


@st.composite
def cases(draw, specials=True):
    sizes = draw(st.lists(st.integers(1, 9), min_size=1, max_size=6))  # groups of one class included
    g = Groups.from_sizes(sizes)
    n = draw(st.integers(0, 9))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, g.num_logits, generator=gen, dtype=torch.float64) * draw(st.sampled_from([0.1, 3.0, 30.0]))
    if specials and n:
        for _ in range(draw(st.integers(0, 4))):
            i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, g.num_logits - 1))
            x[i, j] = draw(st.sampled_from(SPECIALS))
    layout = draw(st.sampled_from(["contiguous", "row_strided", "transposed"]))
    x = x.to(dtype)
    if layout == "row_strided":  # every other row of a wider buffer, unit inner stride
        big = torch.zeros(2 * n, g.num_logits + 3, dtype=dtype)
        big[::2, 1 : 1 + g.num_logits] = x
        x = big[::2, 1 : 1 + g.num_logits]
    elif layout == "transposed":
        x = x.t().contiguous().t()
    return g, x, gen


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@SETTINGS
@given(cases())
def test_softmax_and_log_softmax(case):
    g, x, _ = case
    for log in (False, True):
        got = mosx.group_softmax(x, g, log=log)
        assert got.shape == x.shape and got.dtype == x.dtype
        ref = reference.group_softmax(x.double(), g, log=log)
        tol = TOL[x.dtype] * (4 if log else 1)
        torch.testing.assert_close(got.double(), ref.to(x.dtype).double(), equal_nan=True, atol=tol, rtol=tol)
        # rule: a slice with a NaN or +inf, or only -inf, is NaN everywhere; other groups unaffected
        for a, b in g.slices.tolist():
            s = x[:, a:b].double()
            bad = torch.isnan(s).any(1) | (s == float("inf")).any(1) | (s == float("-inf")).all(1)
            assert torch.isnan(got[:, a:b][bad]).all()
            assert not torch.isnan(got[:, a:b][~bad]).any()


@SETTINGS
@given(cases())
def test_score(case):
    g, x, _ = case
    got = mosx.group_softmax_score(x, g)
    assert got.shape == (x.shape[0],) and got.dtype == acc(x.dtype)
    ref = reference.group_softmax_score(x.double(), g)
    torch.testing.assert_close(got.double(), ref, equal_nan=True, atol=TOL[x.dtype], rtol=TOL[x.dtype])
    # rule: NaN as soon as one group's softmax is NaN
    p = reference.group_softmax(x.double(), g)
    assert torch.equal(torch.isnan(got), torch.isnan(p).any(1))


@SETTINGS
@given(cases())
def test_predict(case):
    g, x, _ = case
    cls, prob, grp = mosx.group_predict(x, g, return_group=True)
    rcls, rprob, rgrp = reference.group_predict(x.double(), g)
    torch.testing.assert_close(prob.double(), rprob, equal_nan=True, atol=TOL[x.dtype], rtol=TOL[x.dtype])
    nan = torch.isnan(rprob)
    # rule: the first NaN group wins, at its first class (exact); elsewhere ties may differ
    assert torch.equal(cls[nan], rcls[nan]) and torch.equal(grp[nan], rgrp[nan])
    assert torch.equal(g.tensors("cpu")["class_group"][cls], grp)
    if x.dtype == torch.float64:
        exact = reference.group_softmax(x.double(), g)
        chosen = exact.gather(1, g.tensors("cpu")["class_logit"][cls].unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(chosen, rprob, equal_nan=True, atol=1e-9, rtol=1e-9)


@SETTINGS
@given(
    cases(),
    st.sampled_from(["ids", "labels"]),
    st.sampled_from([-100, -1, 0, 1, 3, 10**6]),
    st.sampled_from(["mean", "sum", "none"]),
    st.booleans(),
)
def test_cross_entropy(case, form, ignore_index, reduction, mixup):
    g, x, gen = case
    n = x.shape[0]

    def draw_targets():
        t = torch.randint(0, g.num_classes, (n,), generator=gen)
        if form == "ids":
            t[torch.rand(n, generator=gen) < 0.3] = ignore_index
            return t
        lab = g.group_labels(t)
        if ignore_index < 0 or ignore_index > max(g.sizes):  # else it is a valid label, not a marker
            lab[torch.rand(n, g.num_groups, generator=gen) < 0.3] = ignore_index
        return lab

    t = draw_targets()
    kw = dict(reduction=reduction, ignore_index=ignore_index)
    if mixup:
        kw.update(mix_targets=draw_targets(), mix_lambda=float(torch.rand(1, generator=gen)))
    xg = x.detach().clone().requires_grad_()
    got = mosx.group_cross_entropy(xg, t, g, **kw)
    xr = x.detach().double().requires_grad_()
    ref = reference.group_cross_entropy(xr, t, g, **kw)
    tol = 1e-9 if x.dtype == torch.float64 else (2e-5 if x.dtype == torch.float32 else 1e-4)
    torch.testing.assert_close(got.double(), ref, equal_nan=True, atol=tol, rtol=tol)
    if n:
        (gx,) = torch.autograd.grad(got.sum(), xg)
        (rx,) = torch.autograd.grad(ref.sum(), xr)
        gtol = 1e-9 if x.dtype == torch.float64 else (1e-5 if x.dtype == torch.float32 else 2e-2)
        # Rows of finite logits: as the reference. (On a NaN row that is ignored, torch's autograd
        # of the reference gives NaN through log_softmax; the rule below says 0.)
        fin = torch.isfinite(x).all(1)
        torch.testing.assert_close(gx[fin].double(), rx[fin].to(x.dtype).double(), atol=gtol, rtol=gtol)
        if form == "ids":  # rows ignored in every target set get no gradient
            # (NaN rows included: the fused backward used to give NaN on their NaN slices)
            ignored = t == ignore_index
            if mixup:
                ignored &= kw["mix_targets"] == ignore_index
            assert (gx[ignored] == 0).all()


@settings(max_examples=25, deadline=None)
@given(cases(specials=False))
def test_second_derivatives_match_reference(case):
    g, x, _ = case
    assume(x.shape[0] > 0)  # torch.autograd.functional.hessian cannot stack an empty batch
    x = x.double()[:3]
    w = torch.randn(x.shape, dtype=torch.float64)
    for fused, ref in (
        (lambda z: (mosx.group_softmax(z, g) * w).sum(), lambda z: (reference.group_softmax(z, g) * w).sum()),
        (
            lambda z: (mosx.group_softmax_score(z, g) * w[:, 0]).sum(),
            lambda z: (reference.group_softmax_score(z, g) * w[:, 0]).sum(),
        ),
    ):
        h = torch.autograd.functional.hessian(fused, x.contiguous())
        hr = torch.autograd.functional.hessian(ref, x.contiguous())
        torch.testing.assert_close(h, hr, atol=1e-8, rtol=1e-7)
