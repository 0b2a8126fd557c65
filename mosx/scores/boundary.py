"""Decision-boundary scores from the final linear layer: fDBD (the features' distance to the
decision boundaries) and NCI (alignment of the centred features with the predicted class's weight,
inspired by neural collapse). Both fit the mean of the ID training features and read the head."""

from __future__ import annotations

import torch

from .base import Scorer
from .model import LinearHead
from .tensors import _check_2d, _fit_device, _matrix, _row_chunks, _same_rows


def _as_head(head, who: str) -> LinearHead:
    if head is None:
        raise ValueError(f"{who}: fit needs `head` (the model's final linear layer: LinearHead / linear_head(model))")
    return head if isinstance(head, LinearHead) else LinearHead.from_module(head)


def _feature_mean(features, dev, who: str) -> torch.Tensor:
    _check_2d(features, "features", who)
    if features.shape[0] < 1:
        raise ValueError(f"{who}: no fit samples")
    total = torch.zeros(features.shape[1], dtype=torch.float64, device=dev)
    for _, f in _row_chunks(features, dev):
        total += f.sum(0)
    return total / features.shape[0]


class FDBD(Scorer):
    """fDBD (Liu & Qin, ICML 2024, "Fast Decision Boundary based Out-of-Distribution Detector").
    For the predicted class yhat and every other class c, the feature-space distance to the decision
    boundary between them is (z_yhat - z_c) / ||w_yhat - w_c|| (z the logits, w the head's rows);
    score = mean_{c != yhat} of those distances / ||f - mu||, mu the mean of the ID training
    features (``normalizer="mean"``, the paper's), or / ||f|| (``normalizer="norm"``, the
    alternative OpenOOD's code selects on validation data). fit(features=..., head=...); score reads
    cached `logits` and `features`.

    Conventions: OpenOOD's fDBD sums over the other classes instead of averaging (a factor C - 1: same
    ranking). pytorch-ood's ``fDBD`` averages as here but returns the negative (higher = more OOD);
    its ``distance_as_normalizer=False`` drops the normaliser altogether instead of using ||f||.
    """

    spec_name = "fdbd"
    needs = ("logits", "features")
    fit_needs = ("features", "head")
    fit_optional = ()
    streaming_fit = True

    def __init__(self, normalizer: str = "mean"):
        super().__init__()
        if normalizer not in ("mean", "norm"):
            raise ValueError(f"fdbd: normalizer must be 'mean' or 'norm', got {normalizer!r}")
        self.normalizer = normalizer

    def search_space(self) -> dict:
        """The regulariser choice OpenOOD's fDBD code sweeps (the paper has no hyperparameter)."""
        return {"normalizer": ["mean", "norm"]}

    def _fit(self, features=None, head=None, device=None):
        h = _as_head(head, self.name)
        dev = _fit_device(features, device)
        self._mean = _feature_mean(features, dev, self.name)
        D = features.shape[1]
        W = h.weight.to(dev, torch.float64)
        if W.shape[1] != D:
            raise ValueError(f"fdbd: the head reads {W.shape[1]}-d features, the fit features are {D}-d")
        C = W.shape[0]
        if C < 2:
            raise ValueError("fdbd: needs at least 2 classes")
        dist = torch.cdist(W, W, compute_mode="donot_use_mm_for_euclid_dist")  # ||w_p - w_c||, no cancellation
        dist.fill_diagonal_(1.0)  # the predicted class itself contributes 0 / 1
        if bool((dist == 0).any()):
            p, c = (dist == 0).nonzero()[0].tolist()
            raise ValueError(f"fdbd: classes {p} and {c} have identical head weights (no decision boundary)")
        self._inv_dist = 1.0 / dist
        self._dim, self._num_logits = D, C

    def _score(self, logits=None, features=None):
        z = _matrix(logits, "logits", self.name, self._num_logits)
        f = _matrix(features, "features", self.name, self._dim).to(z.dtype)
        _same_rows(self.name, logits=z, features=f)
        top, pred = z.max(dim=1)
        inv = self._inv_dist.to(z.device, z.dtype)
        boundary = ((top[:, None] - z) * inv[pred]).sum(1) / (z.shape[1] - 1)
        ref = f - self._mean.to(f.device, f.dtype) if self.normalizer == "mean" else f
        return boundary / ref.norm(dim=1).clamp_min(torch.finfo(f.dtype).tiny)


class NCI(Scorer):
    """NCI (Liu & Qin, CVPR 2025, "Detecting Out-of-distribution through the Lens of Neural
    Collapse"): score = w_yhat . (f - mu) / ||f - mu|| + alpha ||f||_1, yhat = argmax logits, w_yhat
    the head's weight row of the predicted class, mu the mean of the ID training features. The
    first term measures how closely the centred features align with the predicted class's weight
    (under neural collapse, ID features do); the L1 norm filters features near the origin.

    Source: the paper's text is not available here; this is the formula OpenOOD's NCI postprocessor
    (contributed with the paper) computes, weight row not normalised. fit(features=..., head=...);
    score reads cached `logits` (for the prediction) and `features`.

    Conventions: OpenOOD's NCI is the same number (its default alpha = 1e-4, also mosx's).
    pytorch-ood's ``NCI`` returns the negative (higher = more OOD) with default alpha = 0.
    """

    spec_name = "nci"
    needs = ("logits", "features")
    fit_needs = ("features", "head")
    fit_optional = ()
    streaming_fit = True

    def __init__(self, alpha: float = 1e-4):
        super().__init__()
        if alpha < 0:
            raise ValueError(f"nci: alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)

    def search_space(self) -> dict:
        """OpenOOD's sweep of alpha for NCI."""
        return {"alpha": [0.0001, 0.001, 0.01, 0.1]}

    def _fit(self, features=None, head=None, device=None):
        h = _as_head(head, self.name)
        dev = _fit_device(features, device)
        self._mean = _feature_mean(features, dev, self.name)
        if h.weight.shape[1] != features.shape[1]:
            raise ValueError(
                f"nci: the head reads {h.weight.shape[1]}-d features, the fit features are {features.shape[1]}-d"
            )
        self._weight = h.weight.to(dev, torch.float64)
        self._dim, self._num_logits = features.shape[1], h.weight.shape[0]

    def _score(self, logits=None, features=None):
        z = _matrix(logits, "logits", self.name, self._num_logits)
        f = _matrix(features, "features", self.name, self._dim).to(z.dtype)
        _same_rows(self.name, logits=z, features=f)
        c = f - self._mean.to(f.device, f.dtype)
        w = self._weight.to(f.device, f.dtype)[z.argmax(1)]
        align = (c * w).sum(1) / c.norm(dim=1).clamp_min(torch.finfo(f.dtype).tiny)
        return align + self.alpha * f.abs().sum(1)
