"""Class-mean scores fitted on labelled ID features: RMD (relative Mahalanobis: class Gaussians
against one background Gaussian) and SHE (Hopfield energy with the class means of the correctly
classified samples as stored patterns)."""

from __future__ import annotations

import torch

from .base import Scorer
from .tensors import _check_2d, _fit_device, _matrix, _row_chunks, _same_rows


def _labels(labels, n: int, dev, who: str, classes: int | None = None) -> torch.Tensor:
    if labels is None:
        raise ValueError(f"{who}: fit needs `labels`")
    if not isinstance(labels, torch.Tensor):
        import numpy as np

        labels = torch.from_numpy(np.array(labels))
    labels = labels.to(dev)
    if labels.shape != (n,) or labels.is_floating_point():
        raise ValueError(f"{who}: labels must be [N] = [{n}] class ids, got {tuple(labels.shape)} {labels.dtype}")
    labels = labels.long()
    if n and labels.min() < 0:
        raise ValueError(f"{who}: labels must be >= 0")
    if classes is not None and n and labels.max() >= classes:
        raise ValueError(f"{who}: labels must be < {classes} (the number of logits), got {int(labels.max())}")
    return labels


def _whitening(cov: torch.Tensor) -> torch.Tensor:
    """W with W W^T = cov^+ (pseudo-inverse, cut-off relative to the largest eigenvalue as numpy's)."""
    evals, evecs = torch.linalg.eigh(cov)
    keep = evals > evals.max().clamp_min(0) * cov.shape[0] * torch.finfo(cov.dtype).eps
    return evecs[:, keep] / evals[keep].sqrt()


class RMD(Scorer):
    """Relative Mahalanobis distance (Ren et al., 2021, "A Simple Fix to Mahalanobis Distance for
    Improving Near-OOD Detection"). Fit on labelled ID features: class means mu_k with one tied
    covariance Sigma (the Mahalanobis detector's), and a background Gaussian mu_0, Sigma_0 of all fit
    features regardless of class (both maximum likelihood, divided by N; pseudo-inverses).
    MD_k(f) = (f - mu_k)^T Sigma^+ (f - mu_k), MD_0(f) = (f - mu_0)^T Sigma_0^+ (f - mu_0),
    RMD_k = MD_k - MD_0, and score = -min_k RMD_k(f) = MD_0(f) - min_k MD_k(f). Computed in float64
    in whitened coordinates. fit(features=..., labels=...).

    Conventions: OpenOOD's RMDS returns the same number (with exact inverses). pytorch-ood's ``RMD``
    returns min_k RMD_k (the negative: higher = more OOD), and its background covariance is the
    scatter matrix *not* divided by N (plus 1e-6 I), which scales its MD_0 by about 1/N.
    """

    spec_name = "rmd"
    needs = ("features",)
    fit_needs = ("features", "labels")
    fit_optional = ()
    streaming_fit = True

    def _fit(self, features=None, labels=None, device=None):
        _check_2d(features, "features", self.name)
        dev = _fit_device(features, device)
        n, D = features.shape
        y = _labels(labels, n, dev, self.name)
        if n < 1:
            raise ValueError("rmd: no fit samples")
        C = int(y.max()) + 1
        counts = torch.bincount(y, minlength=C)
        sums = torch.zeros(C, D, dtype=torch.float64, device=dev)
        for lo, f in _row_chunks(features, dev):
            sums.index_add_(0, y[lo : lo + f.shape[0]], f)
        means = sums / counts.clamp_min(1)[:, None].to(torch.float64)
        mu0 = sums.sum(0) / n
        cov = torch.zeros(D, D, dtype=torch.float64, device=dev)
        cov0 = torch.zeros(D, D, dtype=torch.float64, device=dev)
        for lo, f in _row_chunks(features, dev):
            c = f - means[y[lo : lo + f.shape[0]]]
            cov.addmm_(c.T, c)
            c0 = f - mu0
            cov0.addmm_(c0.T, c0)
        present = counts > 0
        self._w, self._w0 = _whitening(cov / n), _whitening(cov0 / n)
        self._mu0 = mu0
        self._center = means[present].mean(0)  # keeps |g|^2 - 2 g.m + |m|^2 small (see Mahalanobis)
        self._means_w = (means[present] - self._center) @ self._w
        self._means_sq = (self._means_w**2).sum(1)
        self._classes = present.nonzero().squeeze(1)
        self._dim = D

    def class_distances(self, features: torch.Tensor) -> torch.Tensor:
        """[N, C'] squared Mahalanobis distances MD_k to every fitted class mean (float64)."""
        f = _matrix(features, "features", self.name, self._dim).to(torch.float64)
        g = (f - self._center.to(f.device)) @ self._w.to(f.device)
        d = (g * g).sum(1, keepdim=True) - 2.0 * g @ self._means_w.to(f.device).T
        return (d + self._means_sq.to(f.device)).clamp_min(0)

    def background_distance(self, features: torch.Tensor) -> torch.Tensor:
        """[N] squared Mahalanobis distance MD_0 under the background Gaussian (float64)."""
        f = _matrix(features, "features", self.name, self._dim).to(torch.float64)
        g = (f - self._mu0.to(f.device)) @ self._w0.to(f.device)
        return (g * g).sum(1)

    def _score(self, features=None):
        return self.background_distance(features) - self.class_distances(features).amin(dim=1)


class SHE(Scorer):
    """SHE, simplified Hopfield energy (Zhang et al., ICLR 2023, "Out-of-Distribution Detection
    based on In-Distribution Data Patterns Memorization with Modern Hopfield Energy"). The stored
    patterns are the class means of the correctly classified ID fit samples,
    S_c = mean{f_i : y_i = c and argmax logits_i = c}; score = f . S_yhat, yhat = argmax logits (the
    inner product with the pattern of the predicted class). fit(features=..., labels=...,
    logits=...); score reads `features` and `logits` (for the prediction).

    Every class needs at least one correctly classified fit sample (fit raises otherwise).

    Conventions: OpenOOD's SHE (metric inner_product) is the same number. pytorch-ood's ``SHE``
    returns its negative (higher = more OOD).
    """

    spec_name = "she"
    needs = ("features", "logits")
    fit_needs = ("features", "labels", "logits")
    fit_optional = ()
    streaming_fit = True

    def _fit(self, features=None, labels=None, logits=None, device=None):
        _check_2d(features, "features", self.name)
        _check_2d(logits, "logits", self.name)
        dev = _fit_device(features, device)
        n, D = features.shape
        if logits.shape[0] != n:
            raise ValueError(f"she: features have {n} rows, logits {logits.shape[0]}")
        C = logits.shape[1]
        y = _labels(labels, n, dev, self.name, classes=C)
        sums = torch.zeros(C, D, dtype=torch.float64, device=dev)
        counts = torch.zeros(C, dtype=torch.int64, device=dev)
        for (lo, f), (_, z) in zip(_row_chunks(features, dev), _row_chunks(logits, dev, dtype=torch.float32)):
            yb = y[lo : lo + f.shape[0]]
            ok = z.argmax(1) == yb
            sums.index_add_(0, yb[ok], f[ok])
            counts += torch.bincount(yb[ok], minlength=C)
        empty = (counts == 0).nonzero().squeeze(1).tolist()
        if empty:
            shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
            raise ValueError(
                f"she: {len(empty)} class(es) have no correctly classified fit sample ({shown}): fit on more ID data"
            )
        self._patterns = sums / counts[:, None].to(torch.float64)
        self._dim, self._num_logits = D, C

    def _score(self, features=None, logits=None):
        f = _matrix(features, "features", self.name, self._dim)
        z = _matrix(logits, "logits", self.name, self._num_logits)
        _same_rows(self.name, features=f, logits=z)
        patterns = self._patterns.to(f.device, f.dtype)
        return (f * patterns[z.argmax(1)]).sum(1)
