"""Feature-shaping wrappers: reshape the features feeding the final linear layer (or that layer's
weight), recompute the logits with the head and score them with a wrapped scorer of the logits
(spelled ``<wrapper>-<name>``, e.g. ``react-energy``, ``dice-mos``).

Here: ReAct (clip at an ID percentile) and DICE (sparsify the weight by ID contribution);
:mod:`mosx.scores.shaping_ash` holds ASH and SCALE (per-sample pruning / scaling). Every wrapper
works over any logit scorer and over any head, a grouped one included: ``react-mos``, ``dice-mos``,
``ash-mos`` and ``scale-mos`` shape the features, apply the grouped head (classes + "others"
slots) and score the grouped logits with MOS.

All of them assume non-negative (post-ReLU) features, as the papers do (the penultimate layer of a
ResNet / BiT after its last ReLU and the average pool). ReAct, ASH-P and DICE stay well defined on
signed features and warn once per scorer; ASH-B, ASH-S and SCALE divide or exponentiate sums of
activations, which are meaningless for signed features, and raise.

The wrapped scorer is built through the registry (:mod:`mosx.scores.base`), so this module imports
no other family. The wrapped scorer receives only the data it declares (``needs`` / ``fit_needs``).
"""

from __future__ import annotations

import warnings

import torch

from .base import Scorer, build_scorer
from .model import LinearHead
from .tensors import _check_2d, _is_half, _matrix, _percentile, _percentile_fp16, _row_chunks

# Candidate percentiles, 0-100 (sources in each class's docstring).
REACT_GRID = (10.0, 65.0, 80.0, 85.0, 90.0, 95.0, 99.0)
DICE_GRID = (10.0, 30.0, 50.0, 70.0, 90.0)


def _check_percentile(who: str, percentile) -> float:
    try:
        p = float(percentile)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: percentile must be a number in [0, 100], got {percentile!r}") from None
    if not 0 <= p <= 100:
        raise ValueError(f"{who}: percentile must be in [0, 100], got {percentile}")
    return p


class _Shaping:
    """What every shaping wrapper shares (a mixin, not a Scorer: the registry lists only real
    scorers). Subclasses set `spec_name`, `wrapper_keys`, and implement `_shape` (features -> shaped
    features) and/or `_shaped_head` (head -> head), plus `_validate` and `_own_space`."""

    is_wrapper = True
    needs = ("features", "head")
    # signed features: False -> warn once (the method stays defined), True -> raise
    _signed_is_error = False

    def _init_base(self, base, head):
        self.base = build_scorer("energy") if base is None else base
        if "inputs" in self.base.needs:
            raise ValueError(
                f"{self.spec_name}: the base scorer {self.base.name} perturbs inputs; "
                f"{type(self).__name__} wraps scores of the logits"
            )
        self.head = head
        self.name = f"{self.spec_name}-{self.base.name}"
        self._warned_signed = False

    # -- data the wrapped scorer reads ------------------------------------------------------
    @property
    def fit_needs(self):
        own = ("features",) if self._own_fit else ()
        if not self.base.needs_fit:
            return own
        extra = tuple(k for k in self.base.fit_needs if k not in ("features", "logits", "head"))
        return ("features",) + extra + (("head",) if self.head is None else ())

    _own_fit = False  # the wrapper itself fits ID statistics (ReAct's threshold, DICE's mean)

    @property
    def needs_fit(self) -> bool:
        return bool(self.fit_needs)

    @property
    def fitted(self) -> bool:
        return self._own_fitted() and self.base.fitted

    def _own_fitted(self) -> bool:
        return True

    @staticmethod
    def _pick(names, logits, features, head, labels=None):
        """Only the data a scorer declares, from the shaped data (what strict scorers accept)."""
        have = {"logits": logits, "features": features, "head": head, "labels": labels}
        return {k: have[k] for k in names if have.get(k) is not None}

    def _head(self, head) -> LinearHead:
        h = head if head is not None else self.head
        if h is None:
            raise ValueError(f"{self.name}: needs the model's linear head (LinearHead / linear_head(model))")
        return h if isinstance(h, LinearHead) else LinearHead.from_module(h)

    def _check_signs(self, f: torch.Tensor) -> None:
        if not bool(torch.isfinite(f).all()):
            bad = int((~torch.isfinite(f)).sum())
            raise ValueError(f"{self.name}: the features contain {bad} NaN/inf value(s)")
        neg = f < 0
        if not bool(neg.any()):
            return
        msg = (
            f"{self.name}: {int(neg.sum())} of {f.numel()} feature values are negative (min {float(f.min()):.4g}); "
            f"{type(self).__name__} assumes non-negative, post-ReLU features (the input of the final linear "
            "layer after the last ReLU and pooling)"
        )
        if self._signed_is_error:
            raise ValueError(msg + "; its scale factor is undefined for signed features")
        if not self._warned_signed:
            warnings.warn(msg + "; the scores are not the paper's method", UserWarning, stacklevel=4)
            self._warned_signed = True

    def _fit_base(self, shaped: torch.Tensor, head, labels=None, logits=None, **_):
        """Fit the wrapped scorer (e.g. KL matching's templates) on the shaped fit data."""
        h = self._shaped_head(self._head(head))
        z = h(shaped)
        data = self._pick(self.base.fit_needs, z, shaped, h, labels)
        if "labels" in self.base.fit_needs and labels is None:
            data["logits"] = z  # e.g. Mahalanobis: predicted classes of the shaped logits
        self.base.fit(**data)

    fit_optional = ("features", "head")  # read when given (besides fit_needs, device and the base's)

    def fit(self, **data):
        """Fit on ID data: the wrapper's own statistics (if any), then the wrapped scorer on the
        shaped data (if it fits). Returns self."""
        take = getattr(self, "_take", None)  # strict keywords, where the Scorer base has them
        if take is not None:
            data = take(data, self.fit_accepts, self.fit_needs, "fit")
        if self.needs_fit:
            self._fit(**data)
        elif data.get("head") is not None:
            self.head = data["head"]
        return self

    # -- hooks ----------------------------------------------------------------------------
    def _shape(self, f: torch.Tensor) -> torch.Tensor:
        return f

    def _shaped_head(self, head: LinearHead) -> LinearHead:
        return head

    def _validate(self) -> None:
        pass

    def _own_space(self) -> dict:
        return {}

    def _invalidate(self, changed: set) -> None:
        """A replace() changed these hyperparameters: drop statistics fitted under the old ones."""

    # -- scoring ----------------------------------------------------------------------------
    def _score(self, features=None, head=None, **_):
        f = _matrix(features, "features", self.name)
        self._check_signs(f)
        shaped = self._shape(f)
        h = self._shaped_head(self._head(head))
        return self.base.score(**self._pick(self.base.needs, h(shaped), shaped, h))

    # -- hyperparameters --------------------------------------------------------------------
    def replace(self, **params) -> Scorer:
        """A copy with hyperparameters changed; ``base.<name>`` changes the wrapped scorer's. The copy
        owns a copy of the wrapped scorer, and statistics fitted under a changed value are dropped
        (refit before scoring)."""
        own = {k: v for k, v in params.items() if not k.startswith("base.")}
        inner = {k[len("base.") :]: v for k, v in params.items() if k.startswith("base.")}
        new = Scorer.replace(self, **own)
        new.base = self.base.replace(**inner)
        new._validate()
        new._invalidate(set(own))
        return new

    def search_space(self) -> dict:
        """The paper's grid of this wrapper's hyperparameters, plus the wrapped scorer's grid as
        ``base.<name>`` keys (see :func:`mosx.scores.search`)."""
        space = dict(self._own_space())
        inner = getattr(self.base, "search_space", lambda: {})()
        space.update({f"base.{k}": list(v) for k, v in inner.items()})
        return space


class ReAct(_Shaping, Scorer):
    """ReAct (Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations",
    NeurIPS 2021): clip the features feeding the final linear layer at the `percentile`-th percentile
    c of all entries of the ID fit features, recompute the logits and score them::

        h~ = min(h, c),   z = W h~ + b,   score = base(z)   (Energy by default)

    The percentile is NumPy's default (linear interpolation), 0-100. The head comes from the
    constructor, fit(head=...) or score(head=...) (a :class:`LinearHead`; see :func:`linear_head`).
    fit(features=...) on ID data, or give `threshold` directly (a given threshold is kept by fit).
    search_space(): percentile in (10, 65, 80, 85, 90, 95, 99), around the paper's p = 90 (OpenOOD
    sweeps only 90).
    Assumes non-negative features; on signed ones it warns (the clip stays defined).
    """

    spec_name = "react"
    wrapper_keys = ("percentile", "threshold")  # the spec keys ReAct takes; the rest go to <name>
    _own_fit = True

    def __init__(
        self,
        base: Scorer | None = None,
        percentile: float = 90.0,
        head: LinearHead | None = None,
        threshold: float | None = None,
    ):
        Scorer.__init__(self)
        self.percentile = _check_percentile("react", percentile)
        self._init_base(base, head)
        self.threshold = None if threshold is None else float(threshold)
        self._threshold_fitted = False  # a given threshold is kept by fit(); a fitted one is refitted

    @property
    def fit_needs(self):
        if self.threshold is not None and not self.base.needs_fit:
            return ()  # a given threshold: nothing to fit
        return _Shaping.fit_needs.fget(self)

    def _own_fitted(self) -> bool:
        return self.threshold is not None

    @property
    def streaming_fit(self) -> bool:
        # Only the percentile is needed: fp16 caches are read in blocks (exact, via a bit histogram).
        return not self.base.needs_fit

    def _validate(self):
        self.percentile = _check_percentile("react", self.percentile)

    def _invalidate(self, changed):
        if "percentile" in changed and "threshold" not in changed:
            self.threshold, self._threshold_fitted = None, False

    def _own_space(self):
        return {"percentile": list(REACT_GRID)}

    def _fit(self, features=None, head=None, device=None, labels=None, logits=None, **_):
        if head is not None:
            self.head = head
        refit = self.threshold is None or self._threshold_fitted
        if refit and _is_half(features) and not self.base.needs_fit:
            _check_2d(features, "features", self.name)
            self.threshold = float(_percentile_fp16(features, self.percentile, device))
            self._threshold_fitted = True
            return
        f = _matrix(features, "features", self.name)
        if device is not None:
            f = f.to(device)
        self._check_signs(f)
        if refit:
            self.threshold = float(_percentile(f, self.percentile))
            self._threshold_fitted = True
        if self.base.needs_fit:  # e.g. KL matching: fit its templates on the clipped logits
            self._fit_base(self._shape(f), None, labels=labels)

    def _shape(self, f):
        return f.clamp(max=self.threshold)


class DICE(_Shaping, Scorer):
    """DICE (Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV
    2022): sparsify the final layer's weight by each weight's contribution on ID data::

        m = mean of the ID fit features h (per feature),   V[c, j] = W[c, j] * m[j],
        M[c, j] = 1 if V[c, j] > percentile_p(V) else 0,   z = (M * W) h + b,   score = base(z)

    percentile_p is NumPy's default percentile (linear interpolation) over all C x D entries of V,
    0-100: p = 70 keeps the top 30% of the weights (the paper's ImageNet setting; OpenOOD uses 90 on
    CIFAR). The paper scores with Energy (the default base), OpenOOD the same; any scorer of the logits
    works, MOS over a grouped head included (the "others" rows are sparsified like the others).
    fit(features=...) on ID data gives m; the mask is built from the head on first use (and again
    for another head or percentile). pytorch-ood's DICE takes p as a fraction in [0, 1].
    search_space(): percentile over the paper's sparsity ablation (10, 30, 50, 70, 90).
    Assumes non-negative features; on signed ones it warns (the method stays defined).
    """

    spec_name = "dice"
    wrapper_keys = ("percentile",)
    _own_fit = True

    def __init__(self, base: Scorer | None = None, percentile: float = 70.0, head: LinearHead | None = None):
        Scorer.__init__(self)
        self.percentile = _check_percentile("dice", percentile)
        self._init_base(base, head)
        self._mean = None  # [D] float64
        self._mask_cache = None  # (key, masked LinearHead, kept [C, D] bool)

    def _own_fitted(self):
        return self._mean is not None

    @property
    def mean(self):
        """The mean ID feature the contributions are weighted by ([D] float64), once fitted."""
        return self._mean

    @property
    def streaming_fit(self) -> bool:
        return not self.base.needs_fit  # the mean is read in row blocks (e.g. from an fp16 memmap)

    def _validate(self):
        self.percentile = _check_percentile("dice", self.percentile)

    def _own_space(self):
        return {"percentile": list(DICE_GRID)}

    def _fit(self, features=None, head=None, device=None, labels=None, logits=None, **_):
        if head is not None:
            self.head = head
        _check_2d(features, "features", self.name)
        n = features.shape[0]
        if n == 0:
            raise ValueError(f"{self.name}: no fit features")
        dev = device if device is not None else (features.device if isinstance(features, torch.Tensor) else "cpu")
        total = None
        for _, t in _row_chunks(features, dev, chunk=8192, dtype=torch.float64):
            self._check_signs(t)
            s = t.sum(0)
            total = s if total is None else total + s
        self._mean = total / n
        self._mask_cache = None
        if self.base.needs_fit:
            f = _matrix(features, "features", self.name)
            self._fit_base(f.to(dev), None, labels=labels)

    def _shaped_head(self, head: LinearHead) -> LinearHead:
        return self._masked(head)[0]

    def _masked(self, head: LinearHead):
        if self._mean is None:
            raise RuntimeError(f"{self.name}: call fit(features=...) on ID data before scoring")
        w = head.weight
        if w.shape[1] != self._mean.numel():
            raise ValueError(
                f"{self.name}: the head takes {w.shape[1]} features but the fit features have {self._mean.numel()}"
            )
        key = (id(head), w.data_ptr(), w._version, tuple(w.shape), self.percentile, id(self._mean))
        if self._mask_cache is not None and self._mask_cache[0] == key:
            return self._mask_cache[1:]
        contrib = w.to(torch.float64) * self._mean.to(w.device)[None, :]
        keep = contrib > _percentile(contrib, self.percentile).to(w.device)
        masked = LinearHead(w * keep.to(w.dtype), head.bias)
        self._mask_cache = (key, masked, keep)
        return masked, keep

    def mask(self, head=None) -> torch.Tensor:
        """The [C, D] boolean mask of the weights DICE keeps for `head` (after fit)."""
        return self._masked(self._head(head))[1]
