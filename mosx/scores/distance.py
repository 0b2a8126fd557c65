"""Feature-distance scores: Mahalanobis, the distance of a sample's features (the input of the
final linear layer) to the closest ID class mean under one tied covariance fitted on ID data."""

from __future__ import annotations

import torch

from .base import Scorer
from .model import model_outputs
from .tensors import _check_2d, _fit_device, _matrix, _row_chunks


class Mahalanobis(Scorer):
    """Mahalanobis (Lee et al., 2018), on the features feeding the final layer: class means and one
    tied covariance; score = -min_c (f - mu_c)^T Sigma^+ (f - mu_c) (pseudo-inverse as the reference
    code; `regularization` adds that fraction of the mean variance to the diagonal first).
    Computed for all classes as one product in whitened coordinates, in `dtype`: float64 by default,
    because that expansion cancels when classes lie far apart relative to their spread (float32
    then loses about 1e-7 of the squared distance between class means); float32 is about twice as
    fast on a CPU.

    eps > 0 adds the paper's input perturbation x^ = x - eps * sign(grad_x d_c*(x)), c* the closest
    class; that needs `inputs` and `model` (features found by :func:`model_outputs`).
    fit(features=..., labels=...) on ID training data (labels: class ids; if absent, the argmax
    of `logits` is used).
    """

    spec_name = "mahalanobis"
    fit_needs = ("features", "labels")
    streaming_fit = True  # fit() reads its data in row blocks: arrays/memmaps need not fit in memory

    def __init__(self, eps: float = 0.0, regularization: float = 0.0, dtype: torch.dtype = torch.float64):
        super().__init__()
        if eps < 0 or regularization < 0:
            raise ValueError("mahalanobis: eps and regularization must be >= 0")
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype, dtype)  # spec strings
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"mahalanobis: dtype must be torch.float32 or torch.float64, got {dtype}")
        self.eps, self.regularization, self.dtype = float(eps), float(regularization), dtype

    @property
    def needs(self):
        return ("features",) if self.eps == 0 else ("inputs", "model")

    def _fit(self, features=None, labels=None, logits=None, device=None, **_):
        _check_2d(features, "features", self.name)
        dev = _fit_device(features, device)
        n, D = features.shape
        if labels is None:
            if logits is None:
                raise ValueError("mahalanobis: fit needs `labels` (or `logits` to use predictions)")
            _check_2d(logits, "logits", self.name)
            labels = torch.cat([z.argmax(dim=1) for _, z in _row_chunks(logits, dev, dtype=torch.float32)])
        if not isinstance(labels, torch.Tensor):
            import numpy as np

            labels = torch.from_numpy(np.array(labels))
        labels = labels.to(dev)
        if labels.shape != (n,) or labels.is_floating_point():
            raise ValueError(
                f"mahalanobis: labels must be [N] = [{n}] class ids, got {tuple(labels.shape)} {labels.dtype}"
            )
        labels = labels.long()
        if labels.min() < 0:
            raise ValueError("mahalanobis: labels must be >= 0")
        C = int(labels.max()) + 1
        counts = torch.bincount(labels, minlength=C)
        present = counts > 0
        # Two passes in row blocks (float64): class means, then the scatter around them.
        sums = torch.zeros(C, D, dtype=torch.float64, device=dev)
        for lo, f in _row_chunks(features, dev):
            sums.index_add_(0, labels[lo : lo + f.shape[0]], f)
        full = sums / counts.clamp_min(1)[:, None].to(torch.float64)
        means = full[present]
        cov = torch.zeros(D, D, dtype=torch.float64, device=dev)
        for lo, f in _row_chunks(features, dev):
            centred = f - full[labels[lo : lo + f.shape[0]]]
            cov.addmm_(centred.T, centred)
        cov /= n
        if self.regularization > 0:
            cov = cov + self.regularization * cov.diagonal().mean() * torch.eye(
                cov.shape[0], dtype=cov.dtype, device=cov.device
            )
        evals, evecs = torch.linalg.eigh(cov)
        # Pseudo-inverse cut-off as numpy/torch pinv: relative to the largest eigenvalue.
        keep = evals > evals.max().clamp_min(0) * cov.shape[0] * torch.finfo(torch.float64).eps
        self._whiten = evecs[:, keep] / evals[keep].sqrt()  # Sigma^+ = W W^T
        # Distances are expanded as |g|^2 - 2 g.m + |m|^2 (one matrix product); centring on the mean
        # of the class means keeps those terms small, so float32 does not cancel catastrophically.
        self._center = means.mean(0)
        self._means_w = (means - self._center) @ self._whiten
        self._means_sq = (self._means_w**2).sum(1)
        self._classes = present.nonzero().squeeze(1)
        self._dim = D

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """[N, C'] squared Mahalanobis distances to every fitted class mean."""
        f = _matrix(features, "features", self.name, self._dim).to(self.dtype)
        w = self._whiten.to(f.device, f.dtype)
        g = (f - self._center.to(f.device, f.dtype)) @ w
        d = (g * g).sum(1, keepdim=True) - 2.0 * g @ self._means_w.to(f.device, f.dtype).T
        return (d + self._means_sq.to(f.device, f.dtype)).clamp_min(0)

    def _score(self, features=None, inputs=None, model=None, **_):
        if self.eps == 0:
            return -self.distances(features).amin(dim=1)
        if inputs is None or model is None:
            raise ValueError("mahalanobis: eps > 0 needs `inputs` and `model` (the input is perturbed)")
        x = inputs.detach().clone().requires_grad_(True)
        _, f = model_outputs(model, x)
        d_min = self.distances(f).amin(dim=1)  # distance to the closest class
        (grad,) = torch.autograd.grad(d_min.sum(), x)
        with torch.no_grad():
            _, f_t = model_outputs(model, x.detach() - self.eps * torch.sign(grad))
            return -self.distances(f_t).amin(dim=1)
