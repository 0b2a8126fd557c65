"""Fused mosx ops vs the plain-PyTorch reference loops (mosx.reference), on every device built."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mosx
from mosx import Groups, reference

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Fused kernels compute half inputs in float32, so they are compared with the reference run on the
# same values upcast to float32; tolerances are those of float32 (and of rounding the output).
SCORE_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
OUT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def random_sizes(gen, num_groups, max_size):
    return torch.randint(1, max_size + 1, (num_groups,), generator=gen).tolist()


GROUPINGS = {
    "imagenet": lambda g: list(mosx.IMAGENET_TAXONOMY_SIZES),
    "one_group": lambda g: [int(torch.randint(1, 40, (1,), generator=g))],
    "singletons": lambda g: [1] * 7,
    "uneven": lambda g: random_sizes(g, 11, 60) + [1, 1],
    "hundreds": lambda g: random_sizes(g, 300, 6),
    "wide": lambda g: [6000, 4100, 3, 1],
}


def make_logits(gen, n, groups, dtype, device, scale=4.0):
    x = torch.randn(n, groups.num_logits, generator=gen, dtype=torch.float64) * scale
    return x.to(dtype).to(device)


def batch_sizes(gen, num_logits):
    cap = 64 if num_logits > 5000 else 300
    return [0, 1, int(torch.randint(2, cap, (1,), generator=gen))]


@pytest.fixture(params=list(GROUPINGS))
def groups(request, gen):
    return Groups.from_sizes(GROUPINGS[request.param](gen))


# ------------------------------------------------------------------------ hand-computed semantics
def worked_example():
    """Two groups: group 0 = classes {0, 1}, group 1 = class {2}; logits [others, c0, c1 | others, c2]."""
    g = Groups.from_sizes([2, 1])
    x = torch.tensor(
        [[0.0, 0.0, math.log(2), 0.0, math.log(3)], [math.log(3), 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64
    )
    return g, x


def test_worked_example_score_predict_loss(device):
    g, x = worked_example()
    x = x.to(device)
    # row 0: group 0 probs [1/4, 1/4, 1/2], group 1 [1/4, 3/4]; row 1: [3/5, 1/5, 1/5], [1/2, 1/2]
    score = mosx.group_softmax_score(x, g)
    torch.testing.assert_close(score.cpu(), torch.tensor([-0.25, -0.5], dtype=torch.float64))
    pred, conf = mosx.group_predict(x, g)
    assert pred.tolist() == [2, 2]  # row 1: group 0's best is 1/5 < group 1's 1/2
    torch.testing.assert_close(conf.cpu(), torch.tensor([0.75, 0.5], dtype=torch.float64))
    # row 0 is class 1 (label 2 in group 0, others in group 1); row 1 is class 2
    t = torch.tensor([1, 2], device=device)
    per_sample = mosx.group_cross_entropy(x, t, g, reduction="none")
    expect = torch.tensor([math.log(2) + math.log(4), -math.log(3 / 5) + math.log(2)], dtype=torch.float64)
    torch.testing.assert_close(per_sample.cpu(), expect)
    torch.testing.assert_close(mosx.group_cross_entropy(x, t, g).cpu(), expect.mean())
    torch.testing.assert_close(mosx.group_cross_entropy(x, t, g, reduction="sum").cpu(), expect.sum())
    probs = mosx.group_softmax(x, g)
    torch.testing.assert_close(probs[0].cpu(), torch.tensor([0.25, 0.25, 0.5, 0.25, 0.75], dtype=torch.float64))


# ------------------------------------------------------------------------ forward vs reference
def test_score_matches_reference(groups, gen, device):
    for dtype in DTYPES:
        for n in batch_sizes(gen, groups.num_logits):
            x = make_logits(gen, n, groups, dtype, device)
            got = mosx.group_softmax_score(x, groups)
            ref = reference.group_softmax_score(
                x.to(torch.float64 if dtype == torch.float64 else torch.float32), groups
            )
            assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert got.shape == (n,)
            torch.testing.assert_close(got, ref, atol=SCORE_TOL[dtype], rtol=SCORE_TOL[dtype])


def test_score_vs_reference_in_input_dtype(gen, device):
    # The reference run entirely in half precision agrees to half-precision accuracy.
    g = Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    for dtype, tol in [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)]:
        x = make_logits(gen, 64, g, dtype, device)
        torch.testing.assert_close(
            mosx.group_softmax_score(x, g), reference.group_softmax_score(x, g).float(), atol=tol, rtol=tol
        )


def test_predict_matches_reference(groups, gen, device):
    for dtype in DTYPES:
        for n in batch_sizes(gen, groups.num_logits):
            x = make_logits(gen, n, groups, dtype, device)
            xr = x.to(torch.float64)
            cls, prob, grp = mosx.group_predict(x, groups, return_group=True)
            rcls, rprob, rgrp = reference.group_predict(xr, groups)
            assert cls.dtype == torch.int64 and cls.shape == (n,)
            tol = SCORE_TOL[dtype]
            torch.testing.assert_close(prob.double(), rprob, atol=tol, rtol=tol)
            # Where the class differs, the two candidates must be tied to within rounding: the
            # exact probability of the fused choice equals the exact best probability.
            exact = reference.group_softmax(xr, groups)
            chosen = exact.gather(1, groups.tensors(device)["class_logit"][cls].unsqueeze(1)).squeeze(1)
            torch.testing.assert_close(chosen, rprob, atol=tol, rtol=tol)
            same = cls == rcls
            assert same.float().mean() >= 0.9 if n else True
            assert torch.equal(grp[same], rgrp[same])
            assert torch.equal(groups.tensors(device)["class_group"][cls], grp)


def test_predict_ties_pick_the_first_class(gen, device):
    # Integer logits tie everywhere: within a group the first of the largest class logits wins,
    # as in the reference's torch.max (wide groups take the vectorised argmax path).
    g = Groups.from_sizes([40, 3, 100, 17])
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = torch.randint(-3, 3, (64, g.num_logits), generator=gen).to(dtype).to(device)
        x[:, 0] = 10.0  # group 0's others logit: its classes lose, so other groups decide
        x[5, 46:146] = float("-inf")  # a row whose wide group holds only -inf class logits
        cls, prob = mosx.group_predict(x, g)
        ref_cls, ref_prob, _ = reference.group_predict(x.to(torch.float64), g)
        torch.testing.assert_close(prob.double(), ref_prob, atol=1e-6, rtol=1e-6)
        assert torch.equal(cls.cpu(), ref_cls.cpu())


def test_softmax_matches_reference(groups, gen, device):
    for dtype in DTYPES:
        x = make_logits(gen, batch_sizes(gen, groups.num_logits)[2], groups, dtype, device)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for log in (False, True):
            got = mosx.group_softmax(x, groups, log=log)
            ref = reference.group_softmax(x.to(acc), groups, log=log).to(dtype)
            assert got.dtype == dtype and got.is_contiguous()
            torch.testing.assert_close(got.to(acc), ref.to(acc), atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])


@pytest.mark.parametrize("form", ["class_ids", "group_labels"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_reference(groups, gen, device, form, reduction):
    for dtype in DTYPES:
        n = batch_sizes(gen, groups.num_logits)[2]
        x = make_logits(gen, n, groups, dtype, device)
        t = torch.randint(0, groups.num_classes, (n,), generator=gen)
        t[torch.rand(n, generator=gen) < 0.1] = -100
        t = t.to(device)
        if form == "group_labels":
            t = groups.group_labels(t)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        got = mosx.group_cross_entropy(x, t, groups, reduction=reduction)
        ref = reference.group_cross_entropy(x.to(acc), t, groups, reduction=reduction)
        tol = 1e-9 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(got, ref.to(got.dtype), atol=tol, rtol=tol)


def test_cross_entropy_per_group_ignore(gen, device):
    # [N, K] labels with entries ignored in some groups only: each group averages over its own.
    g = Groups.from_sizes([3, 5, 1, 2])
    x = make_logits(gen, 40, g, torch.float64, device)
    lab = torch.stack([torch.randint(0, s + 1, (40,), generator=gen) for s in g.sizes], dim=1)
    lab[torch.rand(40, 4, generator=gen) < 0.3] = -1
    lab = lab.to(device)
    got = mosx.group_cross_entropy(x, lab, g, ignore_index=-1)
    ref = reference.group_cross_entropy(x, lab, g, ignore_index=-1)
    torch.testing.assert_close(got, ref)


def test_cross_entropy_mixup(groups, gen, device):
    n = 33
    x = make_logits(gen, n, groups, torch.float64, device)
    ta = torch.randint(0, groups.num_classes, (n,), generator=gen).to(device)
    tb = ta[torch.randperm(n, generator=gen).to(device)]
    lam = float(torch.rand(1, generator=gen))
    for reduction in ("mean", "none"):
        got = mosx.group_cross_entropy(x, ta, groups, mix_targets=tb, mix_lambda=lam, reduction=reduction)
        ref = reference.group_cross_entropy(x, ta, groups, mix_targets=tb, mix_lambda=lam, reduction=reduction)
        torch.testing.assert_close(got, ref)


# ------------------------------------------------------------------------ gradients
def test_backward_matches_reference(groups, gen, device):
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        n = batch_sizes(gen, groups.num_logits)[2]
        x = make_logits(gen, n, groups, dtype, device)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        tol = 1e-9 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
        t = torch.randint(0, groups.num_classes, (n,), generator=gen).to(device)
        w = torch.randn(n, groups.num_logits, generator=gen, dtype=acc).to(device)
        cases = [
            (lambda z: mosx.group_cross_entropy(z, t, groups), lambda z: reference.group_cross_entropy(z, t, groups)),
            (
                lambda z: mosx.group_softmax_score(z, groups).sum(),
                lambda z: reference.group_softmax_score(z, groups).sum(),
            ),
            (
                lambda z: (mosx.group_softmax(z, groups) * w).sum(),
                lambda z: (reference.group_softmax(z, groups) * w).sum(),
            ),
            (
                lambda z: (mosx.group_log_softmax(z, groups) * w).sum(),
                lambda z: (reference.group_log_softmax(z, groups) * w).sum(),
            ),
        ]
        for i, (fused, ref) in enumerate(cases):
            a = x.detach().clone().requires_grad_()
            fused(a).backward()
            b = x.detach().to(acc).clone().requires_grad_()
            ref(b).backward()
            assert a.grad.dtype == dtype
            if i >= 2 and dtype != torch.float64:
                # Softmax backward works from the rounded softmax output, as torch's does, and its
                # error grows with the group width (log_softmax: exp(y) * sum(g)). Compared with the
                # float64 truth, it must be no less accurate than torch's own autograd of the reference.
                c = x.detach().clone().requires_grad_()
                ref(c).backward()
                d = x.detach().to(torch.float64).clone().requires_grad_()
                ref(d).backward()
                err = (a.grad.to(torch.float64) - d.grad).abs().max()
                torch_err = (c.grad.to(torch.float64) - d.grad).abs().max()
                slack = 2e-6 if dtype == torch.float32 else 1e-2
                assert err <= 1.5 * torch_err + slack, (err, torch_err)
            else:
                torch.testing.assert_close(a.grad.to(acc), b.grad, atol=tol, rtol=tol)


def test_gradcheck(gen, device):
    g = Groups.from_sizes([3, 1, 4])
    x = make_logits(gen, 5, g, torch.float64, device, scale=1.0).requires_grad_()
    t = torch.tensor([0, 3, 7, 2, -100], device=device)
    tb = torch.tensor([5, 1, 0, 6, 4], device=device)
    lab = g.group_labels(tb)
    assert torch.autograd.gradcheck(lambda z: mosx.group_softmax(z, g), (x,))
    assert torch.autograd.gradcheck(lambda z: mosx.group_log_softmax(z, g), (x,))
    assert torch.autograd.gradcheck(lambda z: mosx.group_softmax_score(z, g), (x,))
    assert torch.autograd.gradcheck(lambda z: mosx.group_cross_entropy(z, t, g, reduction="none"), (x,))
    assert torch.autograd.gradcheck(lambda z: mosx.group_cross_entropy(z, lab, g), (x,))
    assert torch.autograd.gradcheck(lambda z: mosx.group_cross_entropy(z, t, g, mix_targets=tb, mix_lambda=0.3), (x,))


# ------------------------------------------------------------------------ layouts and types
def test_second_derivatives(gen, device):
    # Double backward (create_graph=True) goes through differentiable formulas of each backward:
    # before, group_softmax's was all zeros and group_softmax_score's None.
    g = Groups.from_sizes([3, 1, 4])
    x = torch.randn(5, g.num_logits, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    t = torch.tensor([0, 3, 7, -100, 5], device=device)
    t2 = torch.tensor([1, 2, -100, 6, 0], device=device)
    labels = g.group_labels(t)
    labels[1, 2] = -100
    fns = {
        "softmax": lambda x: mosx.group_softmax(x, g),
        "log_softmax": lambda x: mosx.group_log_softmax(x, g),
        "score": lambda x: mosx.group_softmax_score(x, g),
        "ce_ids": lambda x: mosx.group_cross_entropy(x, t, g, reduction="none"),
        "ce_labels": lambda x: mosx.group_cross_entropy(x, labels, g, reduction="sum"),
        "ce_mixup": lambda x: mosx.group_cross_entropy(x, t, g, mix_targets=t2, mix_lambda=0.3),
    }
    for name, fn in fns.items():
        assert torch.autograd.gradgradcheck(fn, (x,)), name
    # and the Hessian matches the reference's
    for name, ref in (
        ("softmax", lambda x: reference.group_softmax(x, g)),
        ("score", lambda x: reference.group_softmax_score(x, g)),
    ):
        w = torch.randn(fns[name](x[:2]).shape, generator=gen, dtype=torch.float64).to(device)
        hess = torch.autograd.functional.hessian(lambda z: (fns[name](z) * w).sum(), x[:2].detach())
        hess_ref = torch.autograd.functional.hessian(lambda z: (ref(z) * w).sum(), x[:2].detach())
        torch.testing.assert_close(hess, hess_ref)


def test_ignored_row_with_nan_logits_has_zero_gradient(device):
    # The fused backward gave NaN on the NaN slice of an ignored row (0 * NaN softmax).
    x = torch.tensor([[float("nan"), -0.5, 0.3, 0.1], [0.1, 0.2, 0.3, 0.4]], device=device, requires_grad=True)
    for t in (torch.tensor([-100, 0]), torch.tensor([[-100, -100], [1, 0]])):
        for reduction in ("sum", "none"):
            loss = mosx.group_cross_entropy(x, t.to(device), [1, 1], reduction=reduction)
            (gx,) = torch.autograd.grad(loss.sum(), x)
            assert (gx[0] == 0).all(), gx
            assert torch.isfinite(gx[1]).all() and (gx[1] != 0).any()
    lab = torch.tensor([[-100, 1], [1, 0]], device=device)  # group 1 of row 0 counts: NaN-free slice
    (gx,) = torch.autograd.grad(mosx.group_cross_entropy(x, lab, [1, 1], reduction="sum"), x)
    assert (gx[0, :2] == 0).all() and torch.isfinite(gx[0, 2:]).all()


def test_raw_backward_ops_refuse_to_be_differentiated():
    # They used to give zeros (softmax) or None (score, cross-entropy) with a warning.
    g = Groups.from_sizes([3, 1, 4])
    t = g.tensors("cpu")
    x = torch.randn(4, g.num_logits, dtype=torch.float64, requires_grad=True)
    y = torch.softmax(x, 1).detach()
    ids = torch.tensor([[0, 3, 7, 2]])
    lse = torch.zeros(4, 3, dtype=torch.float64)
    ops = torch.ops.mosx
    cases = {
        "group_softmax_backward": lambda: ops.group_softmax_backward(x, y, t["offsets"], False),
        "group_softmax_score_backward": lambda: ops.group_softmax_score_backward(
            x[:, 0], x, t["offsets"], torch.zeros(4, dtype=torch.long), lse[:, 0]
        ),
        "group_cross_entropy_backward": lambda: ops.group_cross_entropy_backward(
            torch.ones(1, 4, 3, dtype=torch.float64), x, t["offsets"], ids, t["class_logit"], lse, -100
        ),
    }
    for name, fn in cases.items():
        with pytest.raises(RuntimeError, match=f"mosx.{name} is not differentiable"):
            fn().sum().backward()


def test_mix_lambda_tensor_is_validated(device):
    g = Groups.from_sizes([2, 2])
    x = torch.zeros(3, 6, device=device)
    t = torch.tensor([0, 1, 2], device=device)
    for lam in (1.5, float("nan"), -0.1, torch.tensor(1.5), torch.tensor(float("nan")), torch.tensor([-0.5])):
        with pytest.raises(ValueError, match=r"mix_lambda must be in \[0, 1\]"):
            mosx.group_cross_entropy(x, t, g, mix_targets=t, mix_lambda=lam)
    for lam in (torch.full((3,), 0.5), torch.tensor(1)):
        with pytest.raises(ValueError, match="must hold one floating value"):
            mosx.group_cross_entropy(x, t, g, mix_targets=t, mix_lambda=lam)
    with pytest.raises(TypeError, match="mix_lambda must be a number"):
        mosx.group_cross_entropy(x, t, g, mix_targets=t, mix_lambda="half")
    for lam in ("0.5", True):  # float() would take these
        with pytest.raises(TypeError, match="mix_lambda must be a number"):
            mosx.group_cross_entropy(x, t, g, mix_targets=t, mix_lambda=lam)
    got = mosx.group_cross_entropy(x, t, g, mix_targets=t, mix_lambda=torch.tensor([0.25]))
    assert got.shape == ()
    torch.testing.assert_close(got, mosx.group_cross_entropy(x, t, g, mix_targets=t, mix_lambda=0.25))


def test_cross_entropy_empty_batch(device):
    g = Groups.from_sizes([3, 1, 4])
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = torch.zeros(0, g.num_logits, dtype=dtype, device=device, requires_grad=True)
        for t in (
            torch.zeros(0, dtype=torch.long, device=device),
            torch.zeros(0, g.num_groups, dtype=torch.long, device=device),
        ):
            for reduction in ("mean", "sum", "none"):
                got = mosx.group_cross_entropy(x, t, g, reduction=reduction)
                ref = reference.group_cross_entropy(x.float(), t, g, reduction=reduction)
                torch.testing.assert_close(got.float(), ref, equal_nan=True)
                (gx,) = torch.autograd.grad(got.sum(), x)
                assert gx.shape == (0, g.num_logits) and gx.dtype == dtype
            got = mosx.group_cross_entropy(x, t, g, mix_targets=t, mix_lambda=0.5, reduction="sum")
            assert got.item() == 0.0
    # the raw ops, backward included
    tt = g.tensors(device)
    x = torch.zeros(0, g.num_logits, device=device)
    ids = torch.zeros(2, 0, dtype=torch.long, device=device)
    losses, lse = torch.ops.mosx.group_cross_entropy(x, tt["offsets"], ids, tt["class_logit"], -100)
    assert losses.shape == (2, 0, 3) and lse.shape == (0, 3)
    gx = torch.ops.mosx.group_cross_entropy_backward(losses, x, tt["offsets"], ids, tt["class_logit"], lse, -100)
    assert gx.shape == (0, g.num_logits)


@pytest.mark.parametrize("ignore_index", [1, 3, 7, -1, -100, 10**12])
def test_cross_entropy_class_ids_other_ignore_index(ignore_index, gen, device):
    # A non-default ignore_index, a valid class id included (that class then cannot be a target).
    g = Groups.from_sizes([3, 1, 4, 2])
    x = make_logits(gen, 40, g, torch.float64, device).requires_grad_()
    t = torch.randint(0, g.num_classes, (40,), generator=gen)
    t2 = torch.randint(0, g.num_classes, (40,), generator=gen)
    t[::3] = ignore_index
    t2[1::4] = ignore_index
    t, t2 = t.to(device), t2.to(device)
    for reduction in ("mean", "sum", "none"):
        got = mosx.group_cross_entropy(x, t, g, reduction=reduction, ignore_index=ignore_index)
        ref = reference.group_cross_entropy(x, t, g, reduction=reduction, ignore_index=ignore_index)
        torch.testing.assert_close(got, ref)
        if reduction == "none":
            assert (got[::3] == 0).all()
        (gx,) = torch.autograd.grad(got.sum(), x)
        (rx,) = torch.autograd.grad(ref.sum(), x)
        torch.testing.assert_close(gx, rx)
        assert (gx[::3] == 0).all()
    got = mosx.group_cross_entropy(x, t, g, ignore_index=ignore_index, mix_targets=t2, mix_lambda=0.3)
    ref = reference.group_cross_entropy(x, t, g, ignore_index=ignore_index, mix_targets=t2, mix_lambda=0.3)
    torch.testing.assert_close(got, ref)
    if device.type == "cpu" and ignore_index != -100:  # -100 is not the ignore_index here: out of range
        with pytest.raises(RuntimeError, match="is not ignore_index"):
            mosx.group_cross_entropy(x, torch.full_like(t, -100), g, ignore_index=ignore_index)


def test_non_contiguous_inputs(gen, device):
    g = Groups.from_sizes([5, 2, 9, 1])
    big = make_logits(gen, 50, Groups.from_sizes([40]), torch.float32, device)
    row_strided = big[::2, 3 : 3 + g.num_logits]  # row stride 41, unit inner stride
    col_strided = make_logits(gen, g.num_logits, Groups.from_sizes([24]), torch.float32, device)[:, :25].t()
    for x in (row_strided, col_strided):
        assert not x.is_contiguous()
        xc = x.contiguous()
        torch.testing.assert_close(mosx.group_softmax_score(x, g), mosx.group_softmax_score(xc, g))
        torch.testing.assert_close(mosx.group_softmax(x, g), mosx.group_softmax(xc, g))
        for a, b in zip(mosx.group_predict(x, g), mosx.group_predict(xc, g)):
            torch.testing.assert_close(a, b)
        t = torch.randint(0, g.num_classes, (x.shape[0],), generator=gen).to(device)
        torch.testing.assert_close(mosx.group_cross_entropy(x, t, g), mosx.group_cross_entropy(xc, t, g))


def test_groups_forms_are_equivalent(gen, device):
    g = Groups.from_sizes([4, 2, 7])
    x = make_logits(gen, 9, g, torch.float32, device)
    s = mosx.group_softmax_score(x, g)
    torch.testing.assert_close(mosx.group_softmax_score(x, [4, 2, 7]), s)
    torch.testing.assert_close(mosx.group_softmax_score(x, g.slices), s)
    torch.testing.assert_close(mosx.group_softmax_score(x, g.slices.tolist()), s)


def test_assignment_grouping_maps_to_global_ids(gen, device):
    assign = torch.randint(0, 5, (60,), generator=gen)
    assign[:5] = torch.arange(5)
    g = Groups.from_assignment(assign)
    x = make_logits(gen, 30, g, torch.float32, device)
    cls, _ = mosx.group_predict(x, g)
    rcls, _, _ = reference.group_predict(x, g)
    assert torch.equal(cls, rcls)
    t = torch.randint(0, 60, (30,), generator=gen).to(device)
    torch.testing.assert_close(mosx.group_cross_entropy(x, t, g), reference.group_cross_entropy(x, t, g))


def test_numpy_in_numpy_out(gen):
    g = Groups.from_sizes([3, 2])
    x = make_logits(gen, 7, g, torch.float32, "cpu").numpy()
    s = mosx.group_softmax_score(x, g)
    assert isinstance(s, np.ndarray) and s.shape == (7,)
    np.testing.assert_allclose(s, reference.group_softmax_score(torch.from_numpy(x), g).numpy(), rtol=1e-6)
    cls, prob = mosx.group_predict(x, g)
    assert isinstance(cls, np.ndarray) and cls.dtype == np.int64
    p = mosx.group_softmax(x, g)
    assert isinstance(p, np.ndarray) and p.shape == x.shape
    loss = mosx.group_cross_entropy(x, np.array([0, 1, 2, 3, 4, 0, 1]), g, reduction="none")
    assert isinstance(loss, np.ndarray) and loss.shape == (7,)
    # no copy on the way in: the kernel read the caller's buffer
    x[0, 1] = 50.0  # a class logit of group 0: its others probability drops to ~0
    assert mosx.group_softmax_score(x, g)[0] > s[0] + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_and_inf_propagate_like_reference(dtype, device):
    # Half inputs read exp from a table of every 16-bit value; NaN / inf must still take the exact path.
    g = Groups.from_sizes([2, 3, 1])
    x = torch.zeros(6, g.num_logits, dtype=dtype, device=device)
    x[0, 1] = float("nan")
    x[1, 4] = float("inf")
    x[2, :3] = float("-inf")
    x[3, 0] = float("-inf")  # one -inf entry is fine: others prob of group 0 is exactly 0
    x[4, 5] = -1e30  # -inf in half precision
    x[4, 4] = float("-inf")  # a -inf class logit of group 1
    x[5, 7] = float("nan")  # the one-class group: its others logit is NaN
    x32 = x.float()
    got = mosx.group_softmax_score(x, g)
    torch.testing.assert_close(got, reference.group_softmax_score(x32, g), equal_nan=True)
    assert torch.isnan(got[:3]).all() and got[3].item() == 0.0 and torch.isfinite(got[4]) and torch.isnan(got[5])
    torch.testing.assert_close(
        mosx.group_softmax(x, g).float(),
        reference.group_softmax(x32, g),
        equal_nan=True,
        atol=OUT_TOL[dtype],
        rtol=OUT_TOL[dtype],
    )
    _, prob = mosx.group_predict(x, g)
    assert torch.isnan(prob[0]) and torch.isfinite(prob[3:5]).all()
    t = torch.tensor([0, 1, 2, 3, 4, 0], device=device)
    torch.testing.assert_close(
        mosx.group_cross_entropy(x, t, g, reduction="none"),
        reference.group_cross_entropy(x32, t, g, reduction="none"),
        equal_nan=True,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_predict_nan_and_inf_class_matches_reference(dtype, device):
    # The rule (docs/semantics.md): the first group whose softmax is NaN (a NaN or +inf in its
    # slice, or only -inf) wins, at its first class; the score's min_group is that group too.
    g = Groups.from_sizes([3, 2, 4, 20])
    L = g.num_logits
    gen = torch.Generator().manual_seed(13)
    rows = []
    for bad in (float("nan"), float("inf")):
        for j in range(L):  # one NaN / +inf at every position of zero logits and of random ones
            for base in (torch.zeros(L), torch.randn(L, generator=gen) * 3):
                r = base.clone()
                r[j] = bad
                rows.append(r)
    for a, b in g.slices.tolist():  # a group of only -inf, and NaN in two groups at once
        r = torch.randn(L, generator=gen)
        r[a:b] = float("-inf")
        rows.append(r)
        r = torch.randn(L, generator=gen)
        r[b - 1] = float("nan")
        r[-1] = float("nan")
        rows.append(r)
    x = torch.stack(rows).to(dtype).to(device)
    xr = x.double()
    cls, prob, grp = mosx.group_predict(x, g, return_group=True)
    rcls, rprob, rgrp = reference.group_predict(xr, g)
    zero = torch.zeros(1, L, dtype=torch.float64)
    zero[0, 1] = float("nan")  # the example, groups [3, 2, 4]
    assert reference.group_predict(zero[:, :12], [3, 2, 4])[0].tolist() == [0]
    assert cls.tolist() == rcls.tolist()
    assert grp.tolist() == rgrp.tolist()
    torch.testing.assert_close(prob.double(), rprob, equal_nan=True, atol=1e-5, rtol=1e-5)
    # Every row here has a NaN group, and the prediction is its first class.
    nan_group = torch.isnan(reference.group_softmax(xr, g)[:, g.tensors(device)["offsets"][:-1]])
    first = nan_group.to(torch.uint8).argmax(1)
    assert nan_group.any(1).all() and grp.tolist() == first.tolist()
    assert cls.tolist() == g.tensors(device)["logit_class"][g.tensors(device)["offsets"][first] + 1].tolist()
    score, min_group, _ = torch.ops.mosx.group_softmax_score(x, g.tensors(device)["offsets"])
    assert torch.isnan(score).all() and min_group.tolist() == first.tolist()


def shifted_group_logits(gen, n, groups, shifts):
    """float64 N(0, 1) logits with every group moved by one of `shifts` (one per group), each row
    putting the groups at its own permutation of the shifts."""
    x = torch.randn(n, groups.num_logits, generator=gen, dtype=torch.float64)
    shift = torch.tensor(shifts, dtype=torch.float64)
    for i in range(n):
        perm = shift[torch.randperm(len(shift), generator=gen)]
        for k, (a, b) in enumerate(groups.slices.tolist()):
            x[i, a:b] += perm[k]
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_logits_far_from_zero(dtype, gen, device):
    # Groups whose logits sit far below or above 0 agree with the float32 reference: the CPU kernels
    # sum exp(x) unshifted (half inputs: from a table of every 16-bit value) while that sum stays in
    # float's comfortable range, and must fall back to the max-shifted sum outside it.
    g = Groups.from_sizes([5, 17, 1, 40, 3, 9, 2, 30])
    x = shifted_group_logits(gen, 50, g, [-120.0, -60.0, -38.0, 0.0, 20.0, 64.0, 71.0, 100.0])
    x = x.to(dtype).to(device)
    x32 = x.float()
    torch.testing.assert_close(
        mosx.group_softmax_score(x, g),
        reference.group_softmax_score(x32, g),
        atol=SCORE_TOL[dtype],
        rtol=SCORE_TOL[dtype],
    )
    torch.testing.assert_close(
        mosx.group_log_softmax(x, g).float(),
        reference.group_log_softmax(x32, g),
        atol=OUT_TOL[dtype] * 4,
        rtol=OUT_TOL[dtype],
    )
    _, prob = mosx.group_predict(x, g)
    _, ref_prob, _ = reference.group_predict(x32, g)
    torch.testing.assert_close(prob, ref_prob, atol=SCORE_TOL[dtype], rtol=SCORE_TOL[dtype])
    t = torch.randint(0, g.num_classes, (x.shape[0],), generator=gen).to(device)
    torch.testing.assert_close(
        mosx.group_cross_entropy(x, t, g, reduction="none"),
        reference.group_cross_entropy(x32, t, g, reduction="none"),
        atol=1e-4,
        rtol=1e-5,
    )


def test_logits_inside_the_sweep_range_with_extreme_group_sums(gen, device):
    # float32 rows with every |x| <= 87 take the CPU's one-sweep path for all groups at once; a group
    # whose unshifted sum still leaves float's comfortable range (logits near 80, or all below -40)
    # must fall back to the shifted sum on its own, and rows with one logit past 87 (or an inf) must
    # leave the sweep while the other rows of the batch stay on it.
    g = Groups.from_sizes([5, 17, 1, 40, 3, 9, 2, 30])
    x = shifted_group_logits(gen, 60, g, [-80.0, -45.0, -38.0, 0.0, 20.0, 64.0, 71.0, 82.0])
    x = x.clamp(-86.9, 86.9)
    x[::7, 3] = 87.5  # just past the sweep's range
    x[1::7, -1] = -90.0
    x[2::7, 60] = -math.inf  # a masked-out logit
    x[3::7, 10] = 400.0  # far enough past it that an unclamped exp would wrap to a finite value
    x[4::7, 70] = -400.0
    x = x.float().to(device)
    torch.testing.assert_close(
        mosx.group_softmax_score(x, g), reference.group_softmax_score(x, g), atol=1e-5, rtol=1e-5
    )
    cls, prob = mosx.group_predict(x, g)
    ref_cls, ref_prob, _ = reference.group_predict(x, g)
    torch.testing.assert_close(prob, ref_prob, atol=1e-5, rtol=1e-5)
    assert torch.equal(cls, ref_cls)
    t = torch.randint(0, g.num_classes, (x.shape[0],), generator=gen).to(device)
    torch.testing.assert_close(
        mosx.group_cross_entropy(x, t, g, reduction="none"),
        reference.group_cross_entropy(x, t, g, reduction="none"),
        atol=1e-4,
        rtol=1e-5,
    )


def test_group_ends_at_every_position_of_a_vector(gen, device):
    # The CPU's float32 sweep reads rows 16 logits at a time and splits each vector at the group ends
    # inside it: group ends at every lane, several ends in one vector (groups of 2), rows shorter than
    # a vector, and rows that end mid-vector or on a vector boundary.
    layouts = [[1] * k for k in (1, 3, 7, 8, 12)] + [[2] * 5, [7, 1, 1, 6], [14], [15], [16, 1]]
    layouts += [random_sizes(gen, int(torch.randint(1, 12, (1,), generator=gen)), 9) for _ in range(25)]
    for sizes in layouts:
        g = Groups.from_sizes(sizes)
        x = make_logits(gen, 9, g, torch.float32, device)
        torch.testing.assert_close(
            mosx.group_softmax_score(x, g),
            reference.group_softmax_score(x, g),
            atol=1e-6,
            rtol=1e-5,
            msg=lambda m: f"sizes {sizes}: {m}",
        )
        cls, prob = mosx.group_predict(x, g)
        ref_cls, ref_prob, _ = reference.group_predict(x, g)
        assert torch.equal(cls, ref_cls), sizes
        torch.testing.assert_close(prob, ref_prob, atol=1e-6, rtol=1e-5)
        t = torch.randint(0, g.num_classes, (x.shape[0],), generator=gen).to(device)
        torch.testing.assert_close(
            mosx.group_cross_entropy(x, t, g, reduction="none"),
            reference.group_cross_entropy(x, t, g, reduction="none"),
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize("size", [6, 20, 33])
def test_identical_groups_tie_to_the_first(size, gen, device):
    # Groups holding bit-identical logits have equal probabilities, and score and prediction give
    # the tie to the first group, as the reference does. (The CPU's float32 sweep rounds each
    # group's sum in lanes set by where the group starts, so such rows are decided on per-group
    # sums instead.)
    g = Groups.from_sizes([size - 1] * 8)
    block = torch.randn(400, size, generator=gen, dtype=torch.float64) * 3
    x = block.repeat(1, 8).float().to(device)
    score, min_group, _ = torch.ops.mosx.group_softmax_score(x, g.offsets.to(device))
    assert (min_group == 0).all()
    cls, prob = mosx.group_predict(x, g)
    ref_cls, ref_prob, _ = reference.group_predict(x, g)
    assert torch.equal(cls, ref_cls)
    torch.testing.assert_close(prob, ref_prob, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(score, reference.group_softmax_score(x, g), atol=1e-6, rtol=1e-5)


def test_very_wide_group_is_as_accurate_as_float32_allows(gen, device):
    # A group of 200k classes in float32: its sum of exps is accumulated in blocks, so the score
    # stays within a few float32 roundings of the float64 truth (measured: 2.9e-7 for mosx, 1.9e-6
    # for torch's float32 softmax; one long accumulation per lane gave 1.7e-6).
    g = Groups.from_sizes([200_000, 7])
    x = (torch.randn(8, g.num_logits, generator=gen) * 2).to(device)
    truth = reference.group_softmax_score(x.double(), g)
    rel = ((mosx.group_softmax_score(x, g).double() - truth).abs() / truth.abs()).max().item()
    assert rel < 1e-6


def test_cpu_kernel_variant_follows_environment():
    variant = torch.ops.mosx._cpu_kernels()
    if os.environ.get("MOSX_CPU_KERNELS") == "baseline":
        assert variant == "baseline"
    else:
        assert variant in ("avx2", "baseline")


def test_baseline_cpu_kernels_pass_the_same_tests():
    # The float CPU kernels exist in two compiled variants (AVX2, picked where the CPU has it, and
    # portable); this runs the core comparisons again in a fresh process forced onto the portable one.
    if torch.ops.mosx._cpu_kernels() == "baseline":
        pytest.skip("already running the baseline kernels")
    tests = (
        "cpu and (kernel_variant or score_matches or predict or softmax_matches or "
        "cross_entropy_matches or backward_matches or nan_and_inf or far_from_zero or worked_example or "
        "sweep_range or every_position or very_wide or identical_groups)"
    )
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__, "-k", tests],
        env={**os.environ, "MOSX_CPU_KERNELS": "baseline"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout


# ------------------------------------------------------------------------ bad input
def test_bad_logits_rank_dtype_width(device):
    g = Groups.from_sizes([2, 2])
    with pytest.raises(ValueError, match="2-D"):
        mosx.group_softmax_score(torch.zeros(6, device=device), g)
    with pytest.raises(ValueError, match="2-D"):
        mosx.group_softmax_score(torch.zeros(2, 3, 6, device=device), g)
    with pytest.raises(TypeError, match="float64/float32/float16/bfloat16"):
        mosx.group_softmax_score(torch.zeros(2, 6, dtype=torch.int64, device=device), g)
    with pytest.raises(ValueError, match="7 columns but the groups need 6"):
        mosx.group_softmax_score(torch.zeros(2, 7, device=device), g)


def test_bad_labels(device):
    g = Groups.from_sizes([2, 2])
    x = torch.zeros(3, 6, device=device)
    if device.type == "cpu":  # CPU kernels check every label; CUDA returns NaN (no device sync)
        with pytest.raises(RuntimeError, match="target class 4 at row 1 is out of range"):
            mosx.group_cross_entropy(x, torch.tensor([0, 4, 1], device=device), g)
        with pytest.raises(RuntimeError, match="per-group label 3 at row 0, group 1 is out of range"):
            mosx.group_cross_entropy(x, torch.tensor([[0, 3], [1, 0], [0, 0]], device=device), g)
    with pytest.raises(ValueError, match=r"\[N, K\] = \[3, 2\]"):
        mosx.group_cross_entropy(x, torch.zeros(3, 3, dtype=torch.long, device=device), g)
    with pytest.raises(ValueError, match="has 2 entries but logits have 3 rows"):
        mosx.group_cross_entropy(x, torch.zeros(2, dtype=torch.long, device=device), g)
    with pytest.raises(TypeError, match="integer class ids"):
        mosx.group_cross_entropy(x, torch.zeros(3, device=device), g)
    with pytest.raises(ValueError, match="reduction"):
        mosx.group_cross_entropy(x, torch.zeros(3, dtype=torch.long, device=device), g, reduction="avg")
    with pytest.raises(ValueError, match="mix_lambda"):
        t = torch.zeros(3, dtype=torch.long, device=device)
        mosx.group_cross_entropy(x, t, g, mix_targets=t, mix_lambda=1.5)
    with pytest.raises(ValueError, match="both mix_targets and mix_lambda"):
        mosx.group_cross_entropy(x, torch.zeros(3, dtype=torch.long, device=device), g, mix_lambda=0.5)


def test_bad_offsets_reach_the_op_directly():
    # Users calling torch.ops.mosx.* get the checks of the C++ layer.
    x = torch.zeros(2, 6)
    ops = torch.ops.mosx
    with pytest.raises(RuntimeError, match="offsets must be int64"):
        ops.group_softmax_score(x, torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"offsets\[0\] must be 0"):
        ops.group_softmax_score(x, torch.tensor([1, 3, 6]))
    with pytest.raises(RuntimeError, match="group 1 spans logits"):
        ops.group_softmax_score(x, torch.tensor([0, 5, 5, 6]))
    with pytest.raises(RuntimeError, match="increase"):
        ops.group_softmax_score(x, torch.tensor([0, 4, 3, 6]))
    with pytest.raises(RuntimeError, match="offsets end at 5 but logits have 6 columns"):
        ops.group_softmax_score(x, torch.tensor([0, 3, 5]))
    with pytest.raises(RuntimeError, match="1-D int64 tensor of K \\+ 1 >= 2"):
        ops.group_softmax_score(x, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="logits must be a 2-D"):
        ops.group_softmax_score(torch.zeros(6), torch.tensor([0, 6]))


# Cases that crashed the process (issue 12): run in a subprocess, so a crash fails the test
# instead of killing the run. Each case must raise RuntimeError or ValueError naming the problem.
_RAW_CASES = r"""
import sys, torch, mosx
ops = torch.ops.mosx
x = torch.zeros(3, 7, dtype=DTYPE)
bad = torch.tensor([0, 6917529027641081856, -6917529027641081856, 7])
good = torch.tensor([0, 3, 7])
lc = torch.tensor([-1, 0, 1, -1, 2, 3, 4])
cl = torch.tensor([1, 2, 4, 5, 6])
ids = torch.zeros(1, 3, dtype=torch.long)
meta = lambda t: t.to("meta")
acc = torch.float64 if DTYPE == torch.float64 else torch.float32
cases = {
    "softmax wrap": lambda: ops.group_softmax(x, bad, False),
    "softmax_backward wrap": lambda: ops.group_softmax_backward(x, x, bad, True),
    "score wrap": lambda: ops.group_softmax_score(x, bad),
    "score_backward wrap": lambda: ops.group_softmax_score_backward(
        torch.ones(3, dtype=acc), x, bad, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=acc)),
    "predict wrap": lambda: ops.group_predict(x, bad, lc),
    "ce wrap": lambda: ops.group_cross_entropy(x, bad, ids, cl, -100),
    "ce_backward wrap": lambda: ops.group_cross_entropy_backward(
        torch.ones(1, 3, 3, dtype=acc), x, bad, ids, cl, torch.zeros(3, 3, dtype=acc), -100),
    "softmax meta offsets": lambda: ops.group_softmax(x, meta(good), False),
    "softmax_backward meta grad": lambda: ops.group_softmax_backward(meta(x), x, good, False),
    "score meta offsets": lambda: ops.group_softmax_score(x, meta(good)),
    "score_backward meta min_group": lambda: ops.group_softmax_score_backward(
        torch.ones(3, dtype=acc), x, good, meta(torch.zeros(3, dtype=torch.long)), torch.zeros(3, dtype=acc)),
    "predict meta logit_class": lambda: ops.group_predict(x, good, meta(lc)),
    "ce meta targets": lambda: ops.group_cross_entropy(x, good, meta(ids), cl, -100),
    "ce_backward meta lse": lambda: ops.group_cross_entropy_backward(
        torch.ones(1, 3, 2, dtype=acc), x, good, ids, cl, meta(torch.zeros(3, 2, dtype=acc)), -100),
    "score_backward min_group int32": lambda: ops.group_softmax_score_backward(
        torch.ones(3, dtype=acc), x, good, torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=acc)),
    "score_backward min_group out of range": lambda: ops.group_softmax_score_backward(
        torch.ones(3, dtype=acc), x, good, torch.tensor([0, 2, 1]), torch.zeros(3, dtype=acc)),
    "score_backward min_lse shape": lambda: ops.group_softmax_score_backward(
        torch.ones(3, dtype=acc), x, good, torch.zeros(3, dtype=torch.long), torch.zeros(3, 1, dtype=acc)),
    "ce_backward lse shape": lambda: ops.group_cross_entropy_backward(
        torch.ones(1, 3, 2, dtype=acc), x, good, ids, cl, torch.zeros(2, 3, dtype=acc), -100),
    "ce_backward grad_losses int": lambda: ops.group_cross_entropy_backward(
        torch.ones(1, 3, 2, dtype=torch.long), x, good, ids, cl, torch.zeros(3, 2, dtype=acc), -100),
    "ce class_logit short": lambda: ops.group_cross_entropy(x, good, ids, cl[:2], -100),
    "ce class_logit to others": lambda: ops.group_cross_entropy(x, good, ids, torch.tensor([0, 2, 4, 5, 6]), -100),
    "ce class_logit huge": lambda: ops.group_cross_entropy(x, good, ids, torch.tensor([2**62, 2, 4, 5, 6]), -100),
    "ce class id huge": lambda: ops.group_cross_entropy(x, good, torch.full((1, 3), 2**62), cl, -100),
    "ce label huge": lambda: ops.group_cross_entropy(x, good, torch.full((1, 3, 2), -2**62), cl, -100),
    "masked_weight scores shape": lambda: ops.masked_weight(x, x[:2], 0.5),
    "masked_weight_backward mask shape": lambda: ops.masked_weight_backward(
        x, x, x, torch.ones(3, dtype=torch.bool), True, True),
}
for name, fn in cases.items():
    try:
        fn()
    except (RuntimeError, ValueError) as e:
        print(f"{name}: raised {str(e).splitlines()[0]}")
    else:
        print(f"{name}: NO ERROR")
print("END")
"""

_RAW_EXPECT = {
    "wrap": "is past the end of the logits",
    "meta": " on meta but ",
    "min_group int32": "min_group must be int64",
    "min_group out of range": "is not a group index",
    "shape": "must have shape",
    "grad_losses int": "grad_losses must be float64",
    "class_logit short": "class_logit has 2 entries",
    "class_logit to others": "is the others slot of group 0",
    "class_logit huge": "is not a logit position",
    "class id huge": "target class 4611686018427387904 at row 0 is out of range",
    "label huge": "per-group label -4611686018427387904 at row 0, group 0 is out of range",
    "masked_weight scores shape": "scores have shape",
    "mask shape": "mask has shape",
}


@pytest.mark.parametrize("variant", ["default", "baseline"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_raw_ops_reject_what_crashed_them(variant, dtype):
    env = {**os.environ}
    if variant == "baseline":
        env["MOSX_CPU_KERNELS"] = "baseline"
    r = subprocess.run(
        [sys.executable, "-c", _RAW_CASES.replace("DTYPE", f"torch.{dtype}")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout[-2000:]} {r.stderr[-2000:]}"
    lines = r.stdout.splitlines()
    assert lines[-1] == "END"
    for line in lines[:-1]:
        name, got = line.split(": ", 1)
        want = _RAW_EXPECT[max((k for k in _RAW_EXPECT if k in name), key=len)]
        assert got.startswith("raised") and want in got, line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_mismatch():
    g = Groups.from_sizes([2, 2])
    x = torch.zeros(3, 6)
    with pytest.raises(RuntimeError, match="offsets are on"):
        torch.ops.mosx.group_softmax_score(x, g.tensors("cuda")["offsets"])
    with pytest.raises(ValueError, match="are on"):
        mosx.group_cross_entropy(x, torch.zeros(3, dtype=torch.long, device="cuda"), g)


# ------------------------------------------------------------------------ op registration
def _opcheck_cases(device):
    g = Groups.from_sizes([3, 1, 5])
    t = g.tensors(device)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, g.num_logits, generator=gen, dtype=torch.float64).to(device)
    xg = x.clone().requires_grad_()
    y = torch.softmax(x, dim=1)
    ids = torch.tensor([[0, 3, 8, 2, -100, 5]], device=device)
    labels = g.group_labels(ids[0]).unsqueeze(0)
    lse = torch.randn(6, 3, dtype=torch.float64, device=device)
    ops = torch.ops.mosx
    return [
        (ops.group_softmax.default, (xg, t["offsets"], False)),
        (ops.group_softmax.default, (xg, t["offsets"], True)),
        (ops.group_softmax_backward.default, (x, y, t["offsets"], False)),
        (ops.group_softmax_score.default, (xg, t["offsets"])),
        (
            ops.group_softmax_score_backward.default,
            (x[:, 0].clone(), x, t["offsets"], torch.tensor([0, 1, 2, 0, 1, 2], device=device), lse[:, 0].clone()),
        ),
        (ops.group_predict.default, (x, t["offsets"], t["logit_class"])),
        (ops.group_cross_entropy.default, (xg, t["offsets"], ids, t["class_logit"], -100)),
        (ops.group_cross_entropy.default, (xg, t["offsets"], torch.cat([labels, labels]), t["class_logit"], -100)),
        (
            ops.group_cross_entropy_backward.default,
            (
                torch.rand(1, 6, 3, dtype=torch.float64, device=device),
                x,
                t["offsets"],
                ids,
                t["class_logit"],
                lse,
                -100,
            ),
        ),
    ]


def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(gen, device):
    g = Groups.from_sizes([4, 3, 2])

    def step(x, t):
        loss = mosx.group_cross_entropy(x, t, g)
        return loss, mosx.group_softmax_score(x, g), mosx.group_predict(x, g)[0]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = make_logits(gen, 8, g, torch.float32, device).requires_grad_()
    t = torch.randint(0, g.num_classes, (8,), generator=gen).to(device)
    got = compiled(x, t)
    ref = step(x, t)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    got[0].backward()
    ga = x.grad.clone()
    x.grad = None
    ref[0].backward()
    torch.testing.assert_close(ga, x.grad)


@pytest.mark.slow
def test_torch_compile_inductor(gen, device):
    g = Groups.from_sizes([4, 3, 2])
    f = torch.compile(lambda x: mosx.group_softmax_score(x * 2.0, g) + 1.0, fullgraph=True)
    x = make_logits(gen, 8, g, torch.float32, device)
    torch.testing.assert_close(f(x), mosx.group_softmax_score(x * 2.0, g) + 1.0)
