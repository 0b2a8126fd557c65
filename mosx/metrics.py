"""Exact OOD detection metrics in torch: AUROC, AUPR-In/Out, FPR at a TPR, detection error.

Convention (the MOS paper's): **in-distribution (ID) is the positive class and a higher score means
"more ID"**. So, by default,

- TPR = fraction of ID samples kept (score >= threshold),
- FPR = fraction of OOD samples wrongly kept as ID at that threshold,
- FPR95 = FPR at the threshold that keeps 95% of the ID samples.

Other conventions in use, selectable by keyword:

- ``positive="ood"`` (OpenOOD, pytorch-ood, torch-uncertainty): OOD is the positive class, detected
  when the score is *low*. TPR is then the fraction of OOD samples flagged and FPR the fraction of ID
  samples flagged. Only the FPR-at-TPR value depends on this choice; AUROC and the detection error are
  symmetric, and AUPR-In / AUPR-Out are defined by their names (ID positive / OOD positive).
- ``fpr_rule="nearest"`` (default, the MOS / Outlier Exposure reference code): the operating point is
  the ROC point whose TPR is nearest the requested level. Ties in distance go to the higher TPR;
  among points of equal TPR the reference takes the lowest threshold (highest FPR), except at TPR 1
  where it takes the highest threshold reaching TPR 1. mosx reproduces those tie rules exactly.
  ``fpr_rule="first"`` (OpenOOD, pytorch-ood): the FPR at the highest threshold whose TPR is at least
  the level, i.e. the lowest FPR with TPR >= level. (OpenOOD reads this off scikit-learn's
  ``roc_curve`` with ``drop_intermediate=True``, which can differ when both classes share a tied
  score; mosx uses the full curve.)
- ``aupr="ap"`` (default, average precision as in scikit-learn's ``average_precision_score`` and the
  MOS reference) or ``aupr="trapezoid"`` (trapezoid rule over scikit-learn's precision-recall curve,
  as OpenOOD does with ``auc(recall, precision)``).

Exactness: all scores sorted once (on a GPU one torch.sort; on a CPU two value sorts and a linear
merge, which is several times faster than an index sort), counts accumulated in float64 (exact up to
2**53 samples), one curve point per distinct score value, so ties are handled exactly (AUROC counts a
tied ID/OOD pair as one half). Runs wherever the scores live; no Python loop over samples.
Measured on the 2-core development machine (shared, heavily loaded): 10M distinct float32 scores
take about 1.9 s of CPU time for every metric at once (bench/bench_metrics.py).

The detection error is min over thresholds of 0.5 * (1 - TPR) + 0.5 * FPR (equal priors), as in the
Mahalanobis reference code; it does not depend on the convention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "OODMetrics",
    "ood_metrics",
    "auroc",
    "aupr_in",
    "aupr_out",
    "fpr_at_tpr",
    "detection_error",
    "roc_curve",
    "threshold_at_tpr",
]

_POSITIVE = ("id", "ood")
_FPR_RULES = ("nearest", "first")
_AUPR_KINDS = ("ap", "trapezoid")


@dataclass(frozen=True)
class OODMetrics:
    """All metrics of one (ID, OOD) pair, as fractions in [0, 1] (multiply by 100 for the papers' %)."""

    auroc: float
    aupr_in: float
    aupr_out: float
    fpr_at_tpr: float  # FPR at the operating point for `tpr_level` (FPR95 for 0.95)
    detection_error: float
    tpr_level: float
    num_id: int
    num_ood: int
    positive: str = "id"
    fpr_rule: str = "nearest"
    aupr: str = "ap"

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------ input checks
def _as_scores(x, name: str, fn: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            import numpy as np

            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{fn}: {name} must be a 1-D tensor or array of scores, got {type(x).__name__}") from e
    if t.dim() != 1:
        raise ValueError(f"{fn}: {name} must be 1-D (one score per sample), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{fn}: {name} is empty; every metric needs at least one ID and one OOD score")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{fn}: {name} must hold real numbers, got {t.dtype}")
    return t


def _prepare(id_scores, ood_scores, fn: str):
    a = _as_scores(id_scores, "id_scores", fn)
    b = _as_scores(ood_scores, "ood_scores", fn)
    if a.device != b.device:
        # Arrays converted from NumPy land on the CPU: follow the tensor that is on a device.
        if not isinstance(ood_scores, torch.Tensor):
            b = b.to(a.device)
        elif not isinstance(id_scores, torch.Tensor):
            a = a.to(b.device)
        else:
            raise ValueError(f"{fn}: id_scores are on {a.device} but ood_scores on {b.device}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64  # integer scores: float64 holds them exactly up to 2**53
    elif dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # widening keeps every tie and every order
    a, b = a.to(dtype), b.to(dtype)
    for t, name in ((a, "id_scores"), (b, "ood_scores")):
        nan = torch.isnan(t)
        if bool(nan.any()):
            raise ValueError(f"{fn}: {name} contain {int(nan.sum())} NaN value(s); scores must be comparable")
    return a, b


def _check_options(fn, positive=None, fpr_rule=None, aupr=None):
    if positive is not None and positive not in _POSITIVE:
        raise ValueError(f"{fn}: positive must be one of {_POSITIVE}, got {positive!r}")
    if fpr_rule is not None and fpr_rule not in _FPR_RULES:
        raise ValueError(f"{fn}: fpr_rule must be one of {_FPR_RULES}, got {fpr_rule!r}")
    if aupr is not None and aupr not in _AUPR_KINDS:
        raise ValueError(f"{fn}: aupr must be one of {_AUPR_KINDS}, got {aupr!r}")


def _check_levels(tpr, fn: str, device) -> torch.Tensor:
    levels = torch.as_tensor(tpr, dtype=torch.float64).reshape(-1).to(device)
    if levels.numel() == 0:
        raise ValueError(f"{fn}: no TPR level given")
    bad = ~((levels > 0) & (levels <= 1))
    if bool(bad.any()):
        raise ValueError(f"{fn}: TPR levels must lie in (0, 1], got {levels[bad].tolist()}")
    return levels


# ------------------------------------------------------------------------------ the curve
def _sort_descending(a: torch.Tensor, b: torch.Tensor):
    """All scores sorted from high to low, and whether each sorted score came from the ID set."""
    if a.device.type == "cpu":
        return _sort_descending_cpu(a, b)
    s, order = torch.sort(torch.cat([a, b]), descending=True)
    return s, order < a.numel()


def _sort_descending_cpu(a: torch.Tensor, b: torch.Tensor):
    """CPU: a full index sort is the slow part, so avoid it. Each set is sorted by value only
    (NumPy's SIMD sort), then one stable index sort of the two sorted runs, which a run-detecting
    merge sort finishes in linear time, tells which set every position came from."""
    import numpy as np

    neg_a = np.sort(np.negative(a.numpy()))  # ascending of -score = descending of score
    neg_b = np.sort(np.negative(b.numpy()))
    both = np.concatenate([neg_a, neg_b])
    order = np.argsort(both, kind="stable")
    s = np.negative(both[order])
    return torch.from_numpy(s), torch.from_numpy(order < a.numel())


class _Curve:
    """Cumulative counts at every distinct score, from the highest score down (ID = positive).

    tp[i], fp[i]: number of ID / OOD samples with score >= the i-th distinct value; the origin
    (threshold above every score, 0 / 0) is prepended, so tp[0] = fp[0] = 0, tp[-1] = P, fp[-1] = N.
    """

    def __init__(self, id_scores: torch.Tensor, ood_scores: torch.Tensor):
        self.P, self.N = id_scores.numel(), ood_scores.numel()
        s, is_id = _sort_descending(id_scores, ood_scores)
        n = s.numel()
        # Last index of each run of equal scores: one ROC point per distinct value.
        last = torch.ones(n, dtype=torch.bool, device=s.device)
        torch.ne(s[1:], s[:-1], out=last[:-1])
        idx = last.nonzero().squeeze(1)
        g = idx.numel()
        # Written straight into buffers with the origin slot: 10M-row temporaries cost page faults.
        self.tp = torch.zeros(g + 1, dtype=torch.float64, device=s.device)
        self.cnt = torch.zeros(g + 1, dtype=torch.float64, device=s.device)  # tp + fp
        if g == n:  # all scores distinct: no gather needed
            torch.cumsum(is_id, 0, dtype=torch.float64, out=self.tp[1:])
            self.thresholds = s
        else:
            torch.index_select(torch.cumsum(is_id, 0, dtype=torch.float64), 0, idx, out=self.tp[1:])
            self.thresholds = s[idx]
        self.cnt[1:] = idx + 1
        self.fp = self.cnt - self.tp

    def flipped(self):
        """(tp, fp, P, N) of the curve with OOD as the positive class and -score as the score."""
        # Walking the distinct values upwards: OOD counted with score <= value v_i is N - fp[i-1].
        tp = torch.flip(self.N - self.fp[:-1], (0,))
        fp = torch.flip(self.P - self.tp[:-1], (0,))
        zero = tp.new_zeros(1)
        return torch.cat([zero, tp]), torch.cat([zero, fp]), self.N, self.P


def _auroc(tp, fp, P, N):
    # Trapezoids between consecutive points; every term is an integer in float64 (exact below 2**53).
    area = torch.dot(torch.diff(fp), torch.add(tp[1:], tp[:-1]))
    return area / (2.0 * P * N)


def _pr_area(dtp, precision, prev_precision, P, kind):
    """Area under a precision-recall curve given, per point, the positives it adds (recall steps),
    its precision and the precision of the point before it (1 before the first point)."""
    if kind == "ap":
        return torch.dot(dtp, precision) / P
    return (dtp * (precision + prev_precision)).sum() / (2.0 * P)


def _aupr_in(c: _Curve, kind):
    precision = c.tp[1:] / c.cnt[1:]  # every point holds >= 1 sample, so no 0 / 0
    prev = torch.cat([precision.new_ones(1), precision[:-1]]) if kind == "trapezoid" else None
    return _pr_area(torch.diff(c.tp), precision, prev, c.P, kind)


def _aupr_out(c: _Curve, kind):
    # OOD positive, walking the distinct values upwards: the point at value v_i holds the OOD
    # samples with score <= v_i (N - fp[i-1]) among all samples with score <= v_i.
    precision = (c.N - c.fp[:-1]) / ((c.P + c.N) - c.cnt[:-1])
    prev = torch.cat([precision[1:], precision.new_ones(1)]) if kind == "trapezoid" else None
    return _pr_area(torch.diff(c.fp), precision, prev, c.N, kind)


def _fpr_at(tp, fp, P, N, levels, rule):
    """FPR at each TPR level (levels: float64 [M]) on a curve with the origin prepended."""
    if rule == "first":
        tpr = tp / P
        i = torch.searchsorted(tpr, levels, side="left")  # first point with TPR >= level
        return fp[i] / N
    # "nearest" (MOS reference): points without the origin, up to the first reaching TPR 1.
    tpr = tp[1:] / P
    fpr = fp[1:] / N
    full = int(torch.searchsorted(tp[1:], tp.new_tensor([float(P)]), side="left"))
    tpr, fpr = tpr[: full + 1], fpr[: full + 1]
    above = torch.searchsorted(tpr, levels, side="left").clamp_max(full)  # TPR >= level (exists)
    below = (above - 1).clamp_min(0)
    a, b = tpr[above], tpr[below]
    d_above, d_below = torch.abs(a - levels), torch.abs(b - levels)
    # The reference takes the last point (lowest threshold) among those at minimal distance.
    value = torch.where((d_below < d_above) & (above > 0), b, a)
    j = torch.searchsorted(tpr, value, side="right") - 1
    return fpr[j]


def _detection_error(tp, fp, P, N):
    # 0.5 (1 - tp/P) + 0.5 fp/N = (N (P - tp) + P fp) / (2 P N): the minimum is taken over integers.
    return ((P - tp) * N + fp * P).min() / (2.0 * P * N)


# ------------------------------------------------------------------------------ public API
def ood_metrics(
    id_scores,
    ood_scores,
    *,
    tpr: float = 0.95,
    positive: str = "id",
    fpr_rule: str = "nearest",
    aupr: str = "ap",
) -> OODMetrics:
    """Every metric for one ID set and one OOD set, from a single sort of the scores.

    Args:
        id_scores: 1-D tensor or array of the ID set's scores; higher score = more in-distribution.
        ood_scores: 1-D tensor or array of the OOD set's scores, same convention.
        tpr: the TPR level of the FPR metric (0.95 gives FPR95).
        positive: "id" (default, MOS paper) or "ood": which class the TPR/FPR refer to.
        fpr_rule: "nearest" (default, MOS reference) or "first" (OpenOOD / pytorch-ood).
        aupr: "ap" (default, average precision) or "trapezoid".

    Returns an :class:`OODMetrics` with fractions in [0, 1].
    """
    fn = "ood_metrics"
    _check_options(fn, positive, fpr_rule, aupr)
    a, b = _prepare(id_scores, ood_scores, fn)
    levels = _check_levels(tpr, fn, a.device)
    if levels.numel() != 1:
        raise ValueError(f"{fn}: tpr must be one level; use fpr_at_tpr for several")
    c = _Curve(a, b)
    pos_tp, pos_fp, Pp, Np = (c.tp, c.fp, c.P, c.N) if positive == "id" else c.flipped()
    values = torch.stack(
        [
            _auroc(c.tp, c.fp, c.P, c.N),
            _aupr_in(c, aupr),
            _aupr_out(c, aupr),
            _fpr_at(pos_tp, pos_fp, Pp, Np, levels, fpr_rule)[0],
            _detection_error(c.tp, c.fp, c.P, c.N),
        ]
    ).tolist()  # one device -> host copy for everything
    return OODMetrics(
        *values, tpr_level=float(levels[0]), num_id=c.P, num_ood=c.N, positive=positive, fpr_rule=fpr_rule, aupr=aupr
    )


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve (probability that a random ID sample outscores a random OOD one,
    ties counting one half). The same for either choice of positive class."""
    a, b = _prepare(id_scores, ood_scores, "auroc")
    c = _Curve(a, b)
    return float(_auroc(c.tp, c.fp, c.P, c.N))


def aupr_in(id_scores, ood_scores, *, aupr: str = "ap") -> float:
    """Area under the precision-recall curve with ID as the positive class (higher score = ID)."""
    _check_options("aupr_in", aupr=aupr)
    a, b = _prepare(id_scores, ood_scores, "aupr_in")
    return float(_aupr_in(_Curve(a, b), aupr))


def aupr_out(id_scores, ood_scores, *, aupr: str = "ap") -> float:
    """Area under the precision-recall curve with OOD as the positive class (lower score = OOD)."""
    _check_options("aupr_out", aupr=aupr)
    a, b = _prepare(id_scores, ood_scores, "aupr_out")
    return float(_aupr_out(_Curve(a, b), aupr))


def fpr_at_tpr(
    id_scores,
    ood_scores,
    tpr: float | Sequence[float] = 0.95,
    *,
    positive: str = "id",
    fpr_rule: str = "nearest",
):
    """FPR at the given TPR level(s): a float for one level, a list of floats for several.

    With the default ``positive="id"`` this is the fraction of OOD samples kept as ID when the
    threshold keeps `tpr` of the ID samples (the MOS paper's FPR95 for tpr = 0.95).
    """
    fn = "fpr_at_tpr"
    _check_options(fn, positive=positive, fpr_rule=fpr_rule)
    a, b = _prepare(id_scores, ood_scores, fn)
    levels = _check_levels(tpr, fn, a.device)
    c = _Curve(a, b)
    if positive == "id":
        out = _fpr_at(c.tp, c.fp, c.P, c.N, levels, fpr_rule)
    else:
        tp, fp, P, N = c.flipped()
        out = _fpr_at(tp, fp, P, N, levels, fpr_rule)
    vals = out.tolist()
    return vals[0] if isinstance(tpr, (int, float)) or (torch.is_tensor(tpr) and tpr.dim() == 0) else vals


def detection_error(id_scores, ood_scores) -> float:
    """min over thresholds of 0.5 * (1 - TPR) + 0.5 * FPR (equal class priors)."""
    a, b = _prepare(id_scores, ood_scores, "detection_error")
    c = _Curve(a, b)
    return float(_detection_error(c.tp, c.fp, c.P, c.N))


def roc_curve(id_scores, ood_scores, *, positive: str = "id"):
    """The full ROC curve, one point per distinct score plus the origin: (fpr, tpr, thresholds).

    float64 tensors on the scores' device. With ``positive="id"`` the point i counts samples with
    score >= thresholds[i] as ID; thresholds[0] is +inf. With ``positive="ood"`` it counts samples
    with score <= thresholds[i] as OOD; thresholds[0] is -inf.
    """
    _check_options("roc_curve", positive=positive)
    a, b = _prepare(id_scores, ood_scores, "roc_curve")
    c = _Curve(a, b)
    thr = c.thresholds.to(torch.float64)
    if positive == "id":
        return c.fp / c.N, c.tp / c.P, torch.cat([thr.new_full((1,), math.inf), thr])
    tp, fp, P, N = c.flipped()
    return fp / N, tp / P, torch.cat([thr.new_full((1,), -math.inf), torch.flip(thr, (0,))])


def threshold_at_tpr(id_scores, tpr: float = 0.95, *, fpr_rule: str = "nearest") -> float:
    """The score threshold of the operating point that :func:`ood_metrics` reports for `tpr`.

    A sample is kept as ID when ``score >= threshold`` (OOD when ``score < threshold``); the
    threshold is chosen from the ID scores alone so that, on these ID scores and *any* OOD scores
    of the same dtype, the kept ID fraction is the TPR of the operating point that ``fpr_rule``
    picks, and the kept OOD fraction equals ``fpr_at_tpr(id_scores, ood_scores, tpr,
    fpr_rule=fpr_rule)`` (ID positive, higher score = more ID):

    - ``"first"``: the highest threshold whose TPR is at least `tpr`. The threshold is an ID score.
    - ``"nearest"`` (default, MOS reference): the TPR nearest `tpr` among those the ID scores
      reach, distance ties going to the higher TPR. Among ROC points of that TPR the reference
      takes the lowest threshold, i.e. its FPR counts the OOD scores *strictly above* the highest
      ID score left out; so the threshold is the next representable value above that score (in
      the scores' dtype: float32 for float16 / bfloat16 / float32 scores, float64 for float64
      and integer scores). At TPR 1 the reference takes the highest threshold keeping every ID
      sample: the lowest ID score.

    Compare scores with the threshold in that dtype or a wider one (a float32 threshold is
    exactly a float64 too). One difference from ``ood_metrics`` is deliberate: a TPR of 0 is never
    chosen (ood_metrics can pick its TPR-0 point, when some OOD score is above every ID score and
    `tpr` is under half the smallest kept fraction, 1 / (2 * number of ID samples) without ties).

    Args:
        id_scores: 1-D tensor or array of ID (calibration) scores, higher = more ID.
        tpr: the TPR level, in (0, 1].
        fpr_rule: "nearest" or "first", as in :func:`ood_metrics`.

    Returns the threshold as a Python float.
    """
    fn = "threshold_at_tpr"
    _check_options(fn, fpr_rule=fpr_rule)
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float)):
        raise TypeError(f"{fn}: tpr must be one number in (0, 1], got {type(tpr).__name__}")
    a = _as_scores(id_scores, "id_scores", fn)
    dtype = a.dtype if a.dtype.is_floating_point else torch.float64
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    a = a.to(dtype)
    nan = torch.isnan(a)
    if bool(nan.any()):
        raise ValueError(f"{fn}: id_scores contain {int(nan.sum())} NaN value(s); scores must be comparable")
    level = _check_levels(tpr, fn, a.device)
    values, counts = torch.unique_consecutive(torch.sort(a, descending=True).values, return_counts=True)
    rates = torch.cumsum(counts, 0, dtype=torch.float64) / a.numel()  # TPR at each distinct value, ends at 1
    above = int(torch.searchsorted(rates, level, side="left").clamp_max(rates.numel() - 1))
    if fpr_rule == "first":
        return float(values[above])
    i = above
    if above > 0:  # the same float64 distances as _fpr_at; ties go to the higher TPR
        d_above, d_below = torch.abs(rates[above] - level), torch.abs(rates[above - 1] - level)
        if bool(d_below < d_above):
            i = above - 1
    if i == values.numel() - 1:
        return float(values[i])
    return float(torch.nextafter(values[i + 1], values.new_tensor(math.inf)))


# ------------------------------------------------------------------------------ streaming
def _dist_world():
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _gather_1d(t: torch.Tensor, dist) -> torch.Tensor:
    """Every rank's 1-D float64 tensor, concatenated in rank order (sizes may differ)."""
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = t.to(dev, torch.float64)
    n = torch.tensor([t.numel()], device=dev, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    if max(sizes) == 0:
        return t.new_zeros(0)
    padded = torch.zeros(max(sizes), device=dev, dtype=torch.float64)
    padded[: t.numel()] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class OODMetricsAccumulator:
    """Streaming :func:`ood_metrics` for evaluation loops: ``update(scores, is_id)`` batch by batch,
    ``compute()`` at the end gives exactly ``ood_metrics(all ID scores, all OOD scores, ...)``.

    Exact by construction: the scores are kept (detached, on their device) and scored once at the end,
    the metrics depending only on the two multisets of scores. Across ranks: when torch.distributed
    is initialised with more than one process, compute() gathers every rank's scores (all_gather, in
    float64, which holds float16/32 scores and integers up to 2**53 exactly; NCCL on the current
    CUDA device, other backends on the CPU) and every rank gets the same numbers; each rank must call
    it. ``distributed=False`` keeps it local.

    Open-set classification: pass ``correct`` (bool per sample, predicted class == label) with the
    ID batches, and :meth:`oscr` / :meth:`ccr_at_fpr` give exactly :func:`oscr` / :func:`ccr_at_fpr`
    of everything collected (gathered across ranks the same way).

    Args:
        tpr: as in `ood_metrics`.
        positive: as in `ood_metrics`.
        fpr_rule: as in `ood_metrics`.
        aupr: as in `ood_metrics`.
        distributed: None (default: gather when a process group of more than one is initialised),
            True (require one) or False.
    """

    def __init__(
        self,
        *,
        tpr: float = 0.95,
        positive: str = "id",
        fpr_rule: str = "nearest",
        aupr: str = "ap",
        distributed: bool | None = None,
    ):
        _check_options("OODMetricsAccumulator", positive, fpr_rule, aupr)
        _check_levels(tpr, "OODMetricsAccumulator", "cpu")
        self.tpr, self.positive, self.fpr_rule, self.aupr = tpr, positive, fpr_rule, aupr
        self.distributed = distributed
        self.reset()

    def reset(self) -> None:
        self._id, self._ood, self._correct = [], [], []  # _correct[i]: the flags of _id[i], or None

    @property
    def num_id(self) -> int:
        """ID scores collected on this rank."""
        return sum(t.numel() for t in self._id)

    @property
    def num_ood(self) -> int:
        """OOD scores collected on this rank."""
        return sum(t.numel() for t in self._ood)

    def update(self, scores, is_id, correct=None) -> None:
        """Add a batch: `scores` [B] (higher = more ID) and `is_id`, a bool per sample ([B] tensor or
        array) or one bool for the whole batch. `correct` (optional, bool [B]: predicted class ==
        label) feeds :meth:`oscr` and :meth:`ccr_at_fpr`; only its ID rows are kept (OOD samples have
        no correct class), and it must then come with every batch that holds ID samples."""
        fn = "OODMetricsAccumulator.update"
        if isinstance(scores, torch.Tensor) and scores.dim() == 1 and scores.numel() == 0:
            return
        s = _as_scores(scores, "scores", fn)
        but = f"scores {tuple(s.shape)}"
        c = None
        if correct is not None:
            c = _bool_flags(correct, "correct", "predicted class == label", s.shape, but, fn, s.device)
        if isinstance(is_id, bool):
            if is_id:
                self._id.append(s)
                self._correct.append(c)
            else:
                self._ood.append(s)
            return
        m = _bool_flags(is_id, "is_id", "True = in-distribution", s.shape, but, fn, s.device)
        self._id.append(s[m])
        self._correct.append(None if c is None else c[m])
        self._ood.append(s[~m])

    def _collect(self, parts, name):
        if not parts:
            local = torch.zeros(0, dtype=torch.float64)
        else:
            dtype = parts[0].dtype
            for p in parts[1:]:
                dtype = torch.promote_types(dtype, p.dtype)
            local = torch.cat([p.to(parts[0].device, dtype) for p in parts])
        dist = _dist_world()
        if self.distributed and dist is None:
            raise RuntimeError(
                "OODMetricsAccumulator: distributed=True but no process group of more than one process is initialised"
            )
        if dist is not None and self.distributed is not False:
            local = _gather_1d(local, dist).to(local.device)
        if local.numel() == 0:
            raise ValueError(f"OODMetricsAccumulator.compute: no {name} scores were given")
        return local

    def compute(self) -> OODMetrics:
        """The metrics of everything collected (all ranks when distributed), as :func:`ood_metrics`."""
        a = self._collect(self._id, "ID")
        b = self._collect(self._ood, "OOD")
        return ood_metrics(
            a, b.to(a.device), tpr=self.tpr, positive=self.positive, fpr_rule=self.fpr_rule, aupr=self.aupr
        )

    def _collect_open_set(self, fn):
        """(ID scores, OOD scores, correct flags) of everything collected, flags aligned with the scores."""
        # Every rank takes part in every gather, whatever it holds (a rank with no ID batch, or one
        # whose batches lack flags, must not skip a collective): flags missing on a rank travel as NaN.
        a = self._collect(self._id, "ID")
        flags = [
            torch.full((p.numel(),), math.nan, dtype=torch.float64, device=p.device) if c is None else c.double()
            for p, c in zip(self._id, self._correct)
        ]
        c = self._collect(flags, "ID")
        b = self._collect(self._ood, "OOD")
        missing = int(torch.isnan(c).sum())
        if missing:  # the same count on every rank: all of them raise
            raise ValueError(
                f"OODMetricsAccumulator.{fn}: {missing} ID scores came without `correct` "
                "(pass correct=pred == label to update() with every batch that holds ID samples)"
            )
        return a, b.to(a.device), c.to(a.device) > 0.5

    def oscr(self) -> float:
        """:func:`oscr` of everything collected (all ranks when distributed); needs `correct`."""
        a, b, c = self._collect_open_set("oscr")
        return oscr(a, b, c)

    def ccr_at_fpr(self, fpr: float | Sequence[float] = (0.1, 0.01, 0.001, 0.0001)):
        """:func:`ccr_at_fpr` of everything collected (all ranks when distributed); needs `correct`."""
        a, b, c = self._collect_open_set("ccr_at_fpr")
        return ccr_at_fpr(a, b, c, fpr)


# ------------------------------------------------------------------------------ open-set classification
def _bool_flags(x, name: str, meaning: str, shape, but: str, fn: str, device) -> torch.Tensor:
    """A bool tensor or array of the given shape, on device; `meaning` and `but` fill the messages."""
    c = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if c.dtype != torch.bool:
        raise TypeError(f"{fn}: {name} must be bool ({meaning}), got {c.dtype}")
    if c.shape != shape:
        raise ValueError(f"{fn}: {name} has shape {tuple(c.shape)} but {but}")
    return c.to(device)


def _correct_mask(id_correct, n: int, fn: str, device) -> torch.Tensor:
    return _bool_flags(
        id_correct, "id_correct", "predicted class == label", (n,), f"there are {n} ID scores", fn, device
    )


def oscr(id_scores, ood_scores, id_correct) -> float:
    """Open-Set Classification Rate (Dhamija, Günther & Boult, NeurIPS 2018), as OpenOOD reports it:
    the area under the curve of CCR against FPR over every threshold t, with

        CCR(t) = #{ID samples classified correctly with score >= t} / #ID,
        FPR(t) = #{OOD samples with score >= t} / #OOD.

    Exact (one point per distinct score, ties as straight segments): it equals AUROC(correctly
    classified ID scores, OOD scores) * (#correct / #ID). id_correct: bool [N_id] (pred == label).
    """
    a, b = _prepare(id_scores, ood_scores, "oscr")
    c = _correct_mask(id_correct, a.numel(), "oscr", a.device)
    k = int(c.sum())
    if k == 0:
        return 0.0
    curve = _Curve(a[c], b)
    return float(_auroc(curve.tp, curve.fp, curve.P, curve.N)) * k / a.numel()


def ccr_at_fpr(id_scores, ood_scores, id_correct, fpr: float | Sequence[float] = (0.1, 0.01, 0.001, 0.0001)):
    """Correct classification rate at a false positive rate, OpenOOD's ``ccr_fpr``: with m =
    ceil(fpr * #OOD) and t the m-th highest OOD score, the fraction of *all* ID samples that are
    classified correctly and score strictly above t (so at most m - 1 OOD samples are accepted).
    Note the denominator: all ID samples, not only the accepted ones (that would be the accuracy
    among accepted samples). A float for one level, a list for several (default: OpenOOD's 10%,
    1%, 0.1%, 0.01%). Levels in (0, 1].
    """
    fn = "ccr_at_fpr"
    a, b = _prepare(id_scores, ood_scores, fn)
    c = _correct_mask(id_correct, a.numel(), fn, a.device)
    levels = torch.as_tensor(fpr, dtype=torch.float64).reshape(-1).tolist()
    if not levels or not all(0 < v <= 1 for v in levels):
        raise ValueError(f"{fn}: FPR levels must lie in (0, 1], got {levels}")
    ood_desc = torch.sort(b, descending=True).values
    correct = torch.sort(a[c]).values  # ascending: count above t with one searchsorted
    out = []
    for level in levels:
        m = math.ceil(level * b.numel())
        t = ood_desc[m - 1]
        above = correct.numel() - int(torch.searchsorted(correct, t.reshape(1), right=True))
        out.append(above / a.numel())
    return out[0] if isinstance(fpr, (int, float)) else out


__all__ += ["OODMetricsAccumulator", "oscr", "ccr_at_fpr"]
