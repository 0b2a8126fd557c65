"""The streaming accumulator (exactly ood_metrics, across ranks too) and the open-set
classification rates OSCR / CCR@FPR against direct computations."""

import math
import os

import numpy as np
import pytest
import torch

from mosx import metrics as M


def tied_scores(gen, n, scale=1.0, step=0.25):
    """Scores on a coarse grid: many ties inside each set and between the sets."""
    return ((torch.randn(n, generator=gen, dtype=torch.float64) * scale) / step).round() * step


def feed(acc, gen, a, b):
    """Give the accumulator the ID and OOD scores mixed, in random batches (masks and whole batches)."""
    s = torch.cat([a, b])
    is_id = torch.cat([torch.ones(len(a), dtype=torch.bool), torch.zeros(len(b), dtype=torch.bool)])
    perm = torch.randperm(len(s), generator=gen)
    s, is_id = s[perm], is_id[perm]
    lo = 0
    while lo < len(s):
        hi = min(len(s), lo + int(torch.randint(1, 60, (1,), generator=gen)))
        acc.update(s[lo:hi], is_id[lo:hi])
        lo = hi
    acc.update(torch.zeros(0), torch.zeros(0, dtype=torch.bool))  # an empty batch is fine


@pytest.mark.parametrize("opts", [{}, {"positive": "ood", "fpr_rule": "first", "aupr": "trapezoid"}, {"tpr": 0.8}])
def test_accumulator_is_exactly_ood_metrics(gen, opts):
    for _ in range(5):
        a, b = tied_scores(gen, 700) + 0.4, tied_scores(gen, 500, 1.3)
        acc = M.OODMetricsAccumulator(**opts)
        feed(acc, gen, a, b)
        assert (acc.num_id, acc.num_ood) == (700, 500)
        assert acc.compute() == M.ood_metrics(a, b, **opts)  # every field identical, not just close
    # whole batches by one bool; float16 and integer scores
    acc = M.OODMetricsAccumulator(**opts)
    h_a, h_b = a.half(), b.half()
    acc.update(h_a[:300], True)
    acc.update(h_b, False)
    acc.update(h_a[300:].numpy(), np.ones(400, dtype=bool))
    assert acc.compute() == M.ood_metrics(h_a, h_b, **opts)
    acc = M.OODMetricsAccumulator(**opts)
    ia, ib = (a * 4).long(), (b * 4).long()
    acc.update(ia, True)
    acc.update(ib, False)
    assert acc.compute() == M.ood_metrics(ia, ib, **opts)
    acc.reset()
    assert acc.num_id == 0


def test_accumulator_errors():
    acc = M.OODMetricsAccumulator()
    acc.update(torch.tensor([1.0, 2.0]), True)
    with pytest.raises(ValueError, match="no OOD scores"):
        acc.compute()
    with pytest.raises(TypeError, match="bool"):
        acc.update(torch.tensor([1.0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="shape"):
        acc.update(torch.tensor([1.0, 2.0]), torch.tensor([True]))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.tensor([0.0]), False)
        acc.update(torch.tensor([float("nan")]), False)
        acc.compute()
    with pytest.raises(RuntimeError, match="process group"):
        b = M.OODMetricsAccumulator(distributed=True)
        b.update(torch.tensor([1.0]), True)
        b.update(torch.tensor([0.0]), False)
        b.compute()
    with pytest.raises(ValueError, match="positive"):
        M.OODMetricsAccumulator(positive="x")


def _rank(rank, world, init, a, b, correct, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        acc = M.OODMetricsAccumulator()
        # uneven shards; rank 1 gets no OOD scores at all
        ia = a[:100] if rank == 0 else a[100:]
        ib = b if rank == 0 else b[:0]
        ic = correct[:100] if rank == 0 else correct[100:]
        acc.update(ia.float(), True, correct=ic)
        if ib.numel():
            acc.update(ib.float(), False)
        # rank 1 holds only OOD scores, rank 0 only ID scores without flags: every rank still takes
        # part in every gather, and both raise the same error instead of one of them hanging
        lone = M.OODMetricsAccumulator()
        if rank == 0:
            lone.update(ia.float(), True)
        else:
            lone.update(ib.float() if ib.numel() else torch.tensor([0.0]), False)
        try:
            lone.oscr()
            lone_error = None
        except ValueError as e:
            lone_error = str(e)
        local = M.OODMetricsAccumulator(distributed=False)
        local.update(ia.float(), True)
        local.update(torch.tensor([0.0]), False)
        result = {
            "all": acc.compute(),
            "oscr": acc.oscr(),
            "ccr": acc.ccr_at_fpr(),
            "local_id": local.compute().num_id,
            "lone_error": lone_error,
        }
        torch.save(result, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_accumulator_across_two_gloo_processes(gen, tmp_path):
    a, b = tied_scores(gen, 250) + 0.3, tied_scores(gen, 180)
    init = f"file://{tmp_path / 'pg'}"
    correct = torch.rand(250, generator=gen) < 0.7
    torch.multiprocessing.spawn(_rank, args=(2, init, a, b, correct, str(tmp_path)), nprocs=2, join=True)
    want = M.ood_metrics(a.float(), b.float())
    for r in (0, 1):
        got = torch.load(tmp_path / f"{r}.pt", weights_only=False)
        assert got["all"] == want
        assert got["oscr"] == M.oscr(a.float(), b.float(), correct)
        assert got["ccr"] == M.ccr_at_fpr(a.float(), b.float(), correct)
        assert "100 ID scores came without `correct`" in got["lone_error"]
    assert torch.load(tmp_path / "0.pt", weights_only=False)["local_id"] == 100


# ------------------------------------------------------------------------------ OSCR / CCR@FPR
def ref_oscr(a, b, correct):
    """Direct: the (FPR, CCR) point of every threshold (each distinct score, from the top, after
    +inf), joined by straight segments, area by the trapezoid rule."""
    a, b = list(map(float, a)), list(map(float, b))
    thresholds = [math.inf] + sorted(set(a) | set(b), reverse=True)
    pts = []
    for t in thresholds:
        ccr = sum(1 for s, ok in zip(a, correct) if ok and s >= t) / len(a)
        fpr = sum(1 for s in b if s >= t) / len(b)
        pts.append((fpr, ccr))
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))


def ref_ccr(a, b, correct, level):
    m = math.ceil(level * len(b))
    t = sorted(map(float, b), reverse=True)[m - 1]
    return sum(1 for s, ok in zip(map(float, a), correct) if ok and s > t) / len(a)


def test_oscr_against_the_direct_curve(gen):
    for _ in range(4):
        a, b = tied_scores(gen, 200) + 0.5, tied_scores(gen, 150)
        correct = torch.rand(200, generator=gen) < 0.7
        assert M.oscr(a, b, correct) == pytest.approx(ref_oscr(a, b, correct.tolist()), abs=1e-12)
    assert M.oscr(a, b, torch.ones(200, dtype=torch.bool)) == pytest.approx(M.auroc(a, b), abs=1e-15)
    assert M.oscr(a, b, torch.zeros(200, dtype=torch.bool)) == 0.0
    assert M.oscr(torch.tensor([2.0, 1.0]), torch.tensor([0.0]), torch.tensor([True, False])) == 0.5


def test_ccr_at_fpr_against_openood_rule(gen):
    a, b = tied_scores(gen, 300) + 0.5, tied_scores(gen, 1000)
    correct = torch.rand(300, generator=gen) < 0.8
    levels = [0.1, 0.01, 0.001, 0.0001, 0.37, 1.0]
    got = M.ccr_at_fpr(a, b, correct, levels)
    assert got == pytest.approx([ref_ccr(a, b, correct.tolist(), lv) for lv in levels], abs=1e-15)
    assert M.ccr_at_fpr(a, b, correct, 0.05) == pytest.approx(ref_ccr(a, b, correct.tolist(), 0.05), abs=1e-15)
    assert len(M.ccr_at_fpr(a, b, correct)) == 4
    with pytest.raises(ValueError, match="id_correct"):
        M.ccr_at_fpr(a, b, correct[:5], 0.1)
    with pytest.raises(TypeError, match="bool"):
        M.oscr(a, b, correct.long())
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        M.ccr_at_fpr(a, b, correct, 0.0)


def test_accumulator_open_set_rates_are_exact(gen):
    """OSCR and CCR@FPR from the accumulator equal the one-shot functions on the same samples,
    with the correct flags fed in mixed batches (their OOD rows dropped) and in whole ID batches."""
    for _ in range(3):
        a, b = tied_scores(gen, 400) + 0.5, tied_scores(gen, 300)
        correct = torch.rand(400, generator=gen) < 0.75
        s = torch.cat([a, b])
        is_id = torch.cat([torch.ones(400, dtype=torch.bool), torch.zeros(300, dtype=torch.bool)])
        flags = torch.cat([correct, torch.rand(300, generator=gen) < 0.5])  # OOD rows' flags: ignored
        perm = torch.randperm(700, generator=gen)
        acc = M.OODMetricsAccumulator()
        for lo in range(0, 600, 37):
            idx = perm[lo : min(lo + 37, 600)]
            acc.update(s[idx], is_id[idx], correct=flags[idx])
        rest = perm[600:]
        acc.update(s[rest][is_id[rest]], True, correct=flags[rest][is_id[rest]].numpy())
        acc.update(s[rest][~is_id[rest]], False)
        a_seen = torch.cat([s[perm[:600]][is_id[perm[:600]]], s[rest][is_id[rest]]])
        c_seen = torch.cat([flags[perm[:600]][is_id[perm[:600]]], flags[rest][is_id[rest]]])
        assert acc.oscr() == M.oscr(a_seen, b, c_seen) == pytest.approx(ref_oscr(a, b, correct.tolist()), abs=1e-12)
        assert acc.ccr_at_fpr([0.1, 0.05]) == M.ccr_at_fpr(a, b, correct, [0.1, 0.05])
        assert acc.ccr_at_fpr(0.05) == M.ccr_at_fpr(a, b, correct, 0.05)


def test_accumulator_open_set_errors():
    acc = M.OODMetricsAccumulator()
    acc.update(torch.tensor([1.0, 2.0]), True, correct=torch.tensor([True, False]))
    acc.update(torch.tensor([3.0]), True)  # this ID batch came without flags
    acc.update(torch.tensor([0.0]), False)
    assert acc.compute().num_id == 3  # the detection metrics do not need the flags
    with pytest.raises(ValueError, match="1 ID scores came without `correct`"):
        acc.oscr()
    with pytest.raises(TypeError, match="correct must be bool"):
        acc.update(torch.tensor([1.0]), True, correct=torch.tensor([1]))
    with pytest.raises(ValueError, match="correct has shape"):
        acc.update(torch.tensor([1.0, 2.0]), True, correct=torch.tensor([True]))
