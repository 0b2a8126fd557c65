"""Feature-shaping wrappers: ReAct, which reshapes the features feeding the final linear layer,
recomputes the logits and scores them with a wrapped logit scorer (spelled ``react-<name>``).

The wrapped scorer is built through the registry (:mod:`mosx.scores.base`), so this module imports
no other family.
"""

from __future__ import annotations

from .base import Scorer, build_scorer
from .model import LinearHead
from .tensors import _check_2d, _is_half, _matrix, _percentile, _percentile_fp16


class ReAct(Scorer):
    """ReAct (Sun et al., NeurIPS 2021): clip the features feeding the final linear layer at the
    `percentile`-th percentile of ID features (all entries), recompute the logits with that layer,
    and score them with any logit-based scorer (Energy by default).

    The head comes from the constructor, fit(head=...) or score(head=...) (a :class:`LinearHead`;
    see :func:`linear_head`). fit(features=...) on ID data, or give `threshold` directly.
    """

    spec_name = "react"
    is_wrapper = True  # spelled react-<name>: wraps the scorer <name>
    wrapper_keys = ("percentile", "threshold")  # the spec keys ReAct takes; the rest go to <name>
    needs = ("features", "head")
    fit_needs = ("features",)

    def __init__(self, base: Scorer | None = None, percentile: float = 90.0,
                 head: LinearHead | None = None, threshold: float | None = None):
        super().__init__()
        if not 0 <= percentile <= 100:
            raise ValueError(f"react: percentile must be in [0, 100], got {percentile}")
        self.base = build_scorer("energy") if base is None else base
        if "inputs" in self.base.needs:
            raise ValueError(f"react: the base scorer {self.base.name} perturbs inputs; ReAct wraps logit scores")
        self.percentile = float(percentile)
        self.head = head
        self.threshold = None if threshold is None else float(threshold)
        self._threshold_fitted = False  # a given threshold is kept by fit(); a fitted one is refitted
        self.name = f"react-{self.base.name}"

    @property
    def needs_fit(self) -> bool:
        return self.threshold is None or self.base.needs_fit

    @property
    def fitted(self) -> bool:
        return self.threshold is not None and self.base.fitted

    @property
    def streaming_fit(self) -> bool:
        # Only the percentile is needed: fp16 caches are read in blocks (exact, via a bit histogram).
        return not self.base.needs_fit

    def _fit(self, features=None, head=None, device=None, **data):
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
        if refit:
            self.threshold = float(_percentile(f, self.percentile))
            self._threshold_fitted = True
        if self.base.needs_fit:  # e.g. KL matching: fit its templates on the clipped logits
            h = self._head(None)
            clipped = f.clamp(max=self.threshold)
            self.base.fit(logits=h(clipped), features=clipped, **data)

    def fit(self, **data):
        self._fit(**data)
        return self

    def _head(self, head):
        h = head if head is not None else self.head
        if h is None:
            raise ValueError(f"{self.name}: needs the model's linear head (LinearHead / linear_head(model))")
        return h if isinstance(h, LinearHead) else LinearHead.from_module(h)

    def _score(self, features=None, head=None, **_):
        f = _matrix(features, "features", self.name)
        clipped = f.clamp(max=self.threshold)
        logits = self._head(head)(clipped)
        return self.base.score(logits=logits, features=clipped)
