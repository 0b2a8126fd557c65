"""mosx.metrics against scikit-learn and direct NumPy implementations of each convention."""

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

import mosx.metrics as M

TOL = 1e-6


# ------------------------------------------------------------------------------ NumPy references
def np_curve(pos, neg):
    """Counts at every distinct threshold, descending, from a plain loop over the thresholds."""
    thr = np.unique(np.concatenate([pos, neg]))[::-1]
    tps = np.array([(pos >= t).sum() for t in thr], dtype=np.float64)
    fps = np.array([(neg >= t).sum() for t in thr], dtype=np.float64)
    return thr, tps, fps


def np_fpr_first(pos, neg, level):
    """FPR at the highest threshold whose TPR is >= level (OpenOOD / pytorch-ood rule)."""
    _, tps, fps = np_curve(pos, neg)
    for tp, fp in zip(tps, fps):
        if tp / len(pos) >= level:
            return fp / len(neg)
    raise AssertionError("unreachable: the last threshold has TPR 1")


def np_fpr_nearest(pos, neg, level):
    """The MOS / Outlier Exposure reference rule, written out: thresholds from the first one that
    reaches recall 1 upwards, first minimum of |recall - level| in that order."""
    _, tps, fps = np_curve(pos, neg)
    recall = tps / len(pos)
    full = int(np.argmax(tps == len(pos)))
    best, best_d = None, None
    for i in range(full, -1, -1):  # lowest threshold first, as the reference orders them
        d = abs(recall[i] - level)
        if best_d is None or d < best_d:
            best, best_d = i, d
    return fps[best] / len(neg)


def np_detection_error(pos, neg):
    _, tps, fps = np_curve(pos, neg)
    errs = [0.5] + [0.5 * (1 - tp / len(pos)) + 0.5 * fp / len(neg) for tp, fp in zip(tps, fps)]
    return min(errs)


def sk_values(ids, oods):
    y = np.r_[np.ones(len(ids)), np.zeros(len(oods))]
    s = np.r_[ids, oods]
    out = {
        "auroc": skm.roc_auc_score(y, s),
        "ap_in": skm.average_precision_score(y, s),
        "ap_out": skm.average_precision_score(1 - y, -s),
    }
    p, r, _ = skm.precision_recall_curve(y, s)
    out["trap_in"] = skm.auc(r, p)
    p, r, _ = skm.precision_recall_curve(1 - y, -s)
    out["trap_out"] = skm.auc(r, p)
    return out


def sk_fpr_first(ids, oods, level, positive):
    y = np.r_[np.ones(len(ids)), np.zeros(len(oods))]
    s = np.r_[ids, oods]
    if positive == "ood":
        y, s = 1 - y, -s
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    return fpr[np.argmax(tpr >= level)]


# ------------------------------------------------------------------------------ data
def draw(kind, rng):
    if kind == "random":
        return rng.normal(0.5, 1, 700), rng.normal(0, 1, 900)
    if kind == "rounded":  # heavy ties, shared between the two sets
        return np.round(rng.normal(0.5, 1, 500), 1), np.round(rng.normal(0, 1, 800), 1)
    if kind == "few_values":
        return rng.integers(0, 4, 300).astype(np.float64), rng.integers(0, 3, 200).astype(np.float64)
    if kind == "all_equal":
        return np.full(50, 0.3), np.full(70, 0.3)
    if kind == "one_each":
        return np.array([0.2]), np.array([0.7])
    if kind == "one_each_tied":
        return np.array([1.0]), np.array([1.0])
    if kind == "separated":
        return rng.uniform(2, 3, 100), rng.uniform(0, 1, 100)
    if kind == "small_id":
        return rng.normal(0, 1, 7), np.round(rng.normal(0, 1, 400), 1)
    raise ValueError(kind)


KINDS = ["random", "rounded", "few_values", "all_equal", "one_each", "one_each_tied", "separated", "small_id"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_against_sklearn_and_numpy(kind, seed, device):
    rng = np.random.default_rng(seed)
    ids, oods = draw(kind, rng)
    ref = sk_values(ids, oods)
    ti, to = torch.tensor(ids, device=device), torch.tensor(oods, device=device)
    for aupr in ("ap", "trapezoid"):
        for positive in ("id", "ood"):
            for rule in ("nearest", "first"):
                m = M.ood_metrics(ti, to, aupr=aupr, positive=positive, fpr_rule=rule)
                assert m.auroc == pytest.approx(ref["auroc"], abs=TOL)
                key = "ap" if aupr == "ap" else "trap"
                assert m.aupr_in == pytest.approx(ref[key + "_in"], abs=TOL)
                assert m.aupr_out == pytest.approx(ref[key + "_out"], abs=TOL)
                pos, neg = (ids, oods) if positive == "id" else (-oods, -ids)
                want = np_fpr_nearest(pos, neg, 0.95) if rule == "nearest" else np_fpr_first(pos, neg, 0.95)
                assert m.fpr_at_tpr == pytest.approx(want, abs=TOL), (positive, rule)
                if rule == "first":
                    assert m.fpr_at_tpr == pytest.approx(sk_fpr_first(ids, oods, 0.95, positive), abs=TOL)
                assert m.detection_error == pytest.approx(np_detection_error(ids, oods), abs=TOL)
                assert (m.num_id, m.num_ood) == (len(ids), len(oods))


@pytest.mark.parametrize("kind", ["random", "rounded", "few_values", "small_id"])
def test_any_tpr_level(kind):
    rng = np.random.default_rng(5)
    ids, oods = draw(kind, rng)
    levels = [0.01, 0.1, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0] + list(rng.uniform(0, 1, 20))
    for positive in ("id", "ood"):
        pos, neg = (ids, oods) if positive == "id" else (-oods, -ids)
        for rule, ref in (("nearest", np_fpr_nearest), ("first", np_fpr_first)):
            got = M.fpr_at_tpr(ids, oods, levels, positive=positive, fpr_rule=rule)
            want = [ref(pos, neg, lv) for lv in levels]
            np.testing.assert_allclose(got, want, atol=TOL, err_msg=f"{positive} {rule}")
            one = M.fpr_at_tpr(ids, oods, levels[3], positive=positive, fpr_rule=rule)
            assert isinstance(one, float) and one == pytest.approx(want[3], abs=TOL)


def test_nearest_and_first_differ_where_the_reference_does():
    # ID at 10, 9, ..., 1 and OOD between 2 and 1: TPR 0.9 is reached at threshold 2 (FPR 0) and
    # kept down to just above 1 (FPR 1). "first" takes the former, the MOS reference the latter.
    ids = np.arange(10, 0, -1).astype(float)
    oods = np.array([1.5, 1.6, 1.7])
    assert M.fpr_at_tpr(ids, oods, 0.9, fpr_rule="first") == 0.0
    assert M.fpr_at_tpr(ids, oods, 0.9, fpr_rule="nearest") == 1.0
    assert np_fpr_nearest(ids, oods, 0.9) == 1.0


def test_nearest_breaks_distance_ties_towards_higher_tpr():
    # TPR points 0.25 (threshold 4) and 0.75 (threshold 3) lie equally far from 0.5.
    ids = np.array([4.0, 3.0, 3.0, 1.0])
    oods = np.array([2.5, 0.0])
    assert np_fpr_nearest(ids, oods, 0.5) == 0.5
    assert M.fpr_at_tpr(ids, oods, 0.5) == 0.5
    assert M.fpr_at_tpr(-oods, -ids, 0.5) == np_fpr_nearest(-oods, -ids, 0.5)


def test_single_functions_and_roc_curve_match(device):
    rng = np.random.default_rng(3)
    ids, oods = draw("rounded", rng)
    ti, to = torch.tensor(ids, device=device), torch.tensor(oods, device=device)
    m = M.ood_metrics(ti, to)
    assert M.auroc(ti, to) == m.auroc
    assert M.aupr_in(ti, to) == m.aupr_in and M.aupr_out(ti, to) == m.aupr_out
    assert M.detection_error(ti, to) == m.detection_error
    assert M.fpr_at_tpr(ti, to) == m.fpr_at_tpr

    y, s = np.r_[np.ones(len(ids)), np.zeros(len(oods))], np.r_[ids, oods]
    fpr, tpr, thr = M.roc_curve(ti, to)
    sf, st, sthr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr.cpu().numpy(), sf, atol=TOL)
    np.testing.assert_allclose(tpr.cpu().numpy(), st, atol=TOL)
    np.testing.assert_allclose(thr.cpu().numpy()[1:], sthr[1:])
    fpr, tpr, thr = M.roc_curve(ti, to, positive="ood")
    sf, st, sthr = skm.roc_curve(1 - y, -s, drop_intermediate=False)
    np.testing.assert_allclose(fpr.cpu().numpy(), sf, atol=TOL)
    np.testing.assert_allclose(tpr.cpu().numpy(), st, atol=TOL)
    np.testing.assert_allclose(-thr.cpu().numpy()[1:], sthr[1:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int32])
def test_dtypes_keep_ties(dtype):
    gen = torch.Generator().manual_seed(0)
    ids = (torch.randn(600, generator=gen) * 4).to(dtype)
    oods = (torch.randn(500, generator=gen) * 4 - 1).to(dtype)
    i64, o64 = ids.double().numpy(), oods.double().numpy()
    ref = sk_values(i64, o64)
    m = M.ood_metrics(ids, oods)
    assert m.auroc == pytest.approx(ref["auroc"], abs=TOL)
    assert m.aupr_in == pytest.approx(ref["ap_in"], abs=TOL)
    assert m.fpr_at_tpr == pytest.approx(np_fpr_nearest(i64, o64, 0.95), abs=TOL)


def test_numpy_and_mixed_inputs():
    rng = np.random.default_rng(9)
    ids, oods = draw("random", rng)
    a = M.ood_metrics(ids, oods)
    b = M.ood_metrics(torch.tensor(ids), oods.tolist())
    c = M.ood_metrics(ids.astype(np.float32), torch.tensor(oods, dtype=torch.float32))
    assert a == b
    assert c.auroc == pytest.approx(a.auroc, abs=1e-6)
    assert set(a.as_dict()) >= {"auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "detection_error"}


def test_large_counts_are_exact():
    # 2.5M samples with 3 values: exact answers are known in closed form.
    n = 1_250_000
    ids = torch.cat([torch.full((n // 2,), 2.0), torch.full((n - n // 2,), 1.0)])
    oods = torch.cat([torch.full((n // 4,), 1.0), torch.full((n - n // 4,), 0.0)])
    # P(id > ood) + 0.5 P(tie): id=2 beats all; id=1 beats the 0s and ties the 1s.
    want = 0.5 + 0.5 * (0.75 + 0.5 * 0.25)
    assert M.auroc(ids, oods) == pytest.approx(want, abs=1e-12)
    # TPR 1 is reached at threshold 1 with FPR 0.25; TPR 0.5 at threshold 2 with FPR 0.
    assert M.fpr_at_tpr(ids, oods, [0.5, 0.95, 1.0], fpr_rule="first") == [0.0, 0.25, 0.25]


@pytest.mark.parametrize(
    "ids, oods, match",
    [
        ([], [1.0, 2.0], "id_scores is empty"),
        ([1.0, 2.0], np.array([]), "ood_scores is empty"),
        ([1.0, float("nan")], [0.0], r"id_scores contain 1 NaN"),
        ([1.0], [float("nan"), float("nan")], r"ood_scores contain 2 NaN"),
        (np.zeros((3, 2)), [0.0], "id_scores must be 1-D"),
        ([1.0], torch.zeros(2, 1), "ood_scores must be 1-D"),
        (torch.tensor(1.0), [0.0], "must be 1-D"),
        (torch.tensor([True, False]), [0.0], "real numbers"),
    ],
)
def test_bad_input(ids, oods, match):
    with pytest.raises((ValueError, TypeError), match=match):
        M.ood_metrics(ids, oods)


def test_bad_options():
    with pytest.raises(ValueError, match="positive must be one of"):
        M.ood_metrics([1.0], [0.0], positive="in")
    with pytest.raises(ValueError, match="fpr_rule must be one of"):
        M.fpr_at_tpr([1.0], [0.0], fpr_rule="closest")
    with pytest.raises(ValueError, match="aupr must be one of"):
        M.aupr_in([1.0], [0.0], aupr="roc")
    with pytest.raises(ValueError, match=r"TPR levels must lie in \(0, 1\]"):
        M.fpr_at_tpr([1.0], [0.0], [0.5, 1.5])
    with pytest.raises(ValueError, match="one level"):
        M.ood_metrics([1.0], [0.0], tpr=[0.9, 0.95])


def test_infinite_scores_are_ordered():
    ids = np.array([np.inf, 1.0, 0.5, -np.inf])
    oods = np.array([0.7, -np.inf, 0.1])
    ref = sk_values(np.nan_to_num(ids, posinf=1e300, neginf=-1e300), np.nan_to_num(oods, posinf=1e300, neginf=-1e300))
    assert M.auroc(ids, oods) == pytest.approx(ref["auroc"], abs=TOL)


# ------------------------------------------------------------------------------ threshold_at_tpr
def np_threshold(ids, level, rule):
    """threshold_at_tpr written out: the kept ID fractions at every distinct ID score, the chosen
    one, and the threshold "score >= t" that keeps exactly those (nearest: strictly above the
    highest ID score left out, i.e. the next float above it)."""
    vals = np.unique(ids)[::-1]
    kept = np.array([(ids >= v).sum() for v in vals]) / len(ids)
    if rule == "first":
        return vals[int(np.argmax(kept >= level))]
    best, best_d = None, None
    for i in range(len(vals) - 1, -1, -1):  # lowest threshold first, first minimum wins
        d = abs(kept[i] - level)
        if best_d is None or d < best_d:
            best, best_d = i, d
    if best == len(vals) - 1:
        return vals[-1]
    return np.nextafter(vals[best + 1], np.inf, dtype=vals.dtype)


@pytest.mark.parametrize("rule", ["nearest", "first"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threshold_at_tpr_matches_the_fpr_metric(rule, dtype, gen):
    # Coarse scores: many ties within and across the two sets. The kept OOD fraction at the
    # threshold is ood_metrics' FPR, and the kept ID fraction the operating point's TPR.
    for trial in range(150):
        n, m = (int(v) for v in torch.randint(1, 80, (2,), generator=gen))
        ids = (torch.randint(0, 16, (n,), generator=gen).double() / 8).numpy().astype(dtype)
        oods = (torch.randint(0, 16, (m,), generator=gen).double() / 8 - 0.5).numpy().astype(dtype)
        level = 1.0 if trial % 10 == 0 else float(torch.rand((), generator=gen, dtype=torch.float64))
        level = max(level, 1e-3)
        thr = M.threshold_at_tpr(ids, level, fpr_rule=rule)
        assert thr == np_threshold(ids, level, rule)
        top = (ids == ids.max()).sum() / n
        if rule == "nearest" and level < top / 2 and oods.max() > ids.max():
            continue  # the documented exception: ood_metrics picks its TPR-0 point here
        kept_ood = int((oods >= thr).sum()) / m
        assert kept_ood == M.ood_metrics(ids, oods, tpr=level, fpr_rule=rule).fpr_at_tpr
        assert kept_ood == M.fpr_at_tpr(ids, oods, level, fpr_rule=rule)
        # The TPR of the reported operating point: the ROC point of that FPR at the kept ID count.
        fpr, tpr, _ = M.roc_curve(ids, oods)
        kept_id = int((ids >= thr).sum()) / n
        assert bool(((tpr == kept_id) & (fpr == kept_ood)).any())


def test_threshold_at_tpr_examples():
    ids = np.arange(10, 0, -1).astype(np.float32)  # 10, 9, ..., 1
    # TPR 0.9 is kept by "score >= 2": first takes 2; nearest keeps it down to just above 1.
    assert M.threshold_at_tpr(ids, 0.9, fpr_rule="first") == 2.0
    assert M.threshold_at_tpr(ids, 0.9) == float(np.nextafter(np.float32(1), np.float32(2)))
    assert M.threshold_at_tpr(ids, 1.0) == 1.0  # keep everything: the lowest ID score
    assert (ids >= M.threshold_at_tpr(ids, 0.04)).sum() == 1  # never TPR 0: keeps the top sample
    ties = np.array([4.0, 3.0, 3.0, 1.0])  # TPR 0.25 and 0.75 equally far from 0.5: the higher wins
    assert (ties >= M.threshold_at_tpr(ties, 0.5)).sum() == 3
    assert M.threshold_at_tpr(torch.tensor([3, 1, 2]), 1.0) == 1.0  # integer scores
    assert M.threshold_at_tpr(torch.tensor([3.0, 1.0], dtype=torch.float16), 0.5, fpr_rule="first") == 3.0


@pytest.mark.parametrize(
    "args, match",
    [
        (([], 0.95), "empty"),
        (([1.0, float("nan")], 0.95), "NaN"),
        (([1.0, 2.0], 0.0), r"\(0, 1\]"),
        (([1.0, 2.0], 1.5), r"\(0, 1\]"),
        (([[1.0, 2.0]], 0.95), "1-D"),
    ],
)
def test_threshold_at_tpr_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        M.threshold_at_tpr(*args)
    with pytest.raises(ValueError, match="fpr_rule"):
        M.threshold_at_tpr([1.0], 0.5, fpr_rule="last")
    with pytest.raises(TypeError, match="one number"):
        M.threshold_at_tpr([1.0], [0.5, 0.9])
