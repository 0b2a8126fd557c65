"""Per-sample activation shaping: ASH and SCALE, wrappers spelled ``ash-<name>`` / ``scale-<name>``.

Both keep, per sample, the k = D - round(D * p / 100) largest of the D features feeding the final
linear layer (p the percentile, 0-100; at least one is kept, so p = 100 keeps the largest one;
``round`` is round-half-even, as NumPy's in the papers' code). Among features tied with the k-th
largest value, the lower feature indices are kept, so the selection is deterministic on every
device. Like the papers' ImageNet code (and OpenOOD), they shape the pooled penultimate features,
which is what a cache holds; pytorch-ood's ASH shapes the feature map before pooling and takes the
percentile as a fraction in [0, 1].

Shared machinery (head, wrapped scorer, sign checks): :class:`mosx.scores.shaping._Shaping`.
"""

from __future__ import annotations

import torch

from .base import Scorer
from .model import LinearHead
from .shaping import _check_percentile, _Shaping
from .tensors import _matrix

# OpenOOD's sweep for both (configs/postprocessors/ash.yml and scale.yml: percentile_list).
ASH_GRID = (65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0)
SCALE_GRID = ASH_GRID
ASH_VARIANTS = ("p", "b", "s")


def _kept_count(d: int, percentile: float) -> int:
    return max(1, d - int(round(d * percentile / 100.0)))


def _top_k_mask(f: torch.Tensor, k: int) -> torch.Tensor:
    """[N, D] bool: the k largest entries of each row; ties at the k-th largest value go to the lower
    column index. Exact, one selection per row (no full sort)."""
    d = f.shape[1]
    if k >= d:
        return torch.ones_like(f, dtype=torch.bool)
    kth = f.kthvalue(d - k + 1, dim=1, keepdim=True).values  # the k-th largest of each row
    above = f > kth
    room = k - above.sum(1, keepdim=True)  # how many entries equal to the k-th value to keep
    tied = f == kth
    return above | (tied & (tied.cumsum(1) <= room))


def _sums(f: torch.Tensor, percentile: float):
    """(kept mask, s1 = sum of all features, s2 = sum of the kept ones) per sample."""
    keep = _top_k_mask(f, _kept_count(f.shape[1], percentile))
    pruned = f * keep
    return keep, pruned, f.sum(1), pruned.sum(1)


def _ratio(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    # s2 = 0 means an all-zero sample (non-negative features): any factor leaves it zero, take 1.
    return torch.where(s2 > 0, s1 / torch.where(s2 > 0, s2, torch.ones_like(s2)), torch.zeros_like(s1))


class _PerSample(_Shaping):
    """Per-sample shaping: no statistics of its own, fitting only the wrapped scorer if it needs it."""

    def _fit(self, features=None, head=None, labels=None, logits=None, device=None, **_):
        if head is not None:
            self.head = head
        f = _matrix(features, "features", self.name)
        if device is not None:
            f = f.to(device)
        self._check_signs(f)
        self._fit_base(self._shape(f), None, labels=labels)


class ASH(_PerSample, Scorer):
    """ASH (Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation Shaping for
    Out-of-Distribution Detection", ICLR 2023). Per sample, with h the D features, K the set of its
    k = D - round(D p / 100) largest entries, s1 = sum_j h_j and s2 = sum_{j in K} h_j::

        ASH-P:  h~_j = h_j            if j in K, else 0      (prune)
        ASH-B:  h~_j = s1 / k         if j in K, else 0      (prune, then binarize to the same sum)
        ASH-S:  h~_j = h_j exp(s1/s2) if j in K, else 0      (prune, then scale)
        z = W h~ + b,  score = base(z)   (Energy by default, as the paper)

    variant "p" | "b" | "s", percentile p in [0, 100] (default 90, the paper's ImageNet ASH-S
    setting; ASH-P/B use 65 there). No fitting (unless the wrapped scorer fits, e.g. KL matching, on
    the shaped fit data). search_space(): percentile over OpenOOD's sweep (65, 70, ..., 95).
    Assumes non-negative features: ASH-P warns on signed ones, ASH-B and ASH-S raise.
    """

    spec_name = "ash"
    wrapper_keys = ("variant", "percentile")

    def __init__(
        self, base: Scorer | None = None, variant: str = "s", percentile: float = 90.0, head: LinearHead | None = None
    ):
        Scorer.__init__(self)
        self.variant = variant
        self.percentile = percentile
        self._validate()
        self._init_base(base, head)

    def _validate(self):
        if self.variant not in ASH_VARIANTS:
            raise ValueError(f"ash: variant must be one of {', '.join(ASH_VARIANTS)}, got {self.variant!r}")
        self.percentile = _check_percentile("ash", self.percentile)

    @property
    def _signed_is_error(self):
        return self.variant != "p"

    def _own_space(self):
        return {"percentile": list(ASH_GRID)}

    def _shape(self, f):
        keep, pruned, s1, s2 = _sums(f, self.percentile)
        if self.variant == "p":
            return pruned
        if self.variant == "b":
            k = _kept_count(f.shape[1], self.percentile)
            return keep.to(f.dtype) * (s1 / k)[:, None]
        return pruned * torch.exp(_ratio(s1, s2))[:, None]


class SCALE(_PerSample, Scorer):
    """SCALE (Xu, Lian, Gao & Sun, "Scaling for Training Time and Post-hoc Out-of-distribution
    Detection Enhancement", ICLR 2024): ASH-S's scale factor without the pruning. Per sample, with
    s1 = sum_j h_j and s2 the sum of the k = D - round(D p / 100) largest entries::

        h~ = h * exp(s1 / s2),   z = W h~ + b,   score = base(z)   (Energy by default, as the paper)

    percentile p in [0, 100] (default 85, the paper's ImageNet setting). No fitting (unless the
    wrapped scorer fits). search_space(): percentile over OpenOOD's sweep (65, 70, ..., 95).
    Assumes non-negative features: raises on signed ones (the factor is undefined for them).
    """

    spec_name = "scale"
    wrapper_keys = ("percentile",)
    _signed_is_error = True

    def __init__(self, base: Scorer | None = None, percentile: float = 85.0, head: LinearHead | None = None):
        Scorer.__init__(self)
        self.percentile = _check_percentile("scale", percentile)
        self._init_base(base, head)

    def _validate(self):
        self.percentile = _check_percentile("scale", self.percentile)

    def _own_space(self):
        return {"percentile": list(SCALE_GRID)}

    def _shape(self, f):
        _, _, s1, s2 = _sums(f, self.percentile)
        return f * torch.exp(_ratio(s1, s2))[:, None]
