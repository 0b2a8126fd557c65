"""Subspace scores: ViM, the energy of the logits minus the scaled norm of the features' residual
outside the principal subspace of the ID features."""

from __future__ import annotations

import torch

from .base import Scorer
from .model import LinearHead
from .tensors import _check_2d, _fit_device, _matrix, _row_chunks, _same_rows


def _as_head(head, who: str) -> LinearHead:
    if head is None:
        raise ValueError(f"{who}: fit needs `head` (the model's final linear layer: LinearHead / linear_head(model))")
    return head if isinstance(head, LinearHead) else LinearHead.from_module(head)


def _paper_dim(D: int) -> int:
    """The ViM paper's principal dimension: 1000 for 2048-d features (ResNet-50 / BiT), 512 for
    768-d (ViT / DeiT); half the width below that."""
    return 1000 if D >= 2048 else 512 if D >= 768 else max(1, D // 2)


class ViM(Scorer):
    """ViM (Wang et al., CVPR 2022, "ViM: Out-Of-Distribution with Virtual-logit Matching").

    Fit (ID training features and the head W, b): the origin o = -W^+ b (W^+ the pseudo-inverse);
    the principal subspace P = the `dim` leading eigenvectors of (1/N) sum (f - o)(f - o)^T (the
    uncentred second moment around o); the residual of f is its component outside P,
    r(f) = ||(I - P P^T)(f - o)||; alpha = mean_fit max_c logit_c / mean_fit r(f), the virtual-logit
    scale. Score: v = alpha r(f) is the virtual logit; the paper's OOD probability is
    softmax([logits, v])_virtual, and mosx returns logsumexp(logits) - v = log((1 - p_v) / p_v), a
    strictly decreasing map of it (same ranking, no saturation at p_v -> 0).

    dim: the principal dimension; default (None) the paper's choice: 1000 for >= 2048-d features,
    512 for >= 768-d, D // 2 below. Must be < the feature width. fit(features=..., head=...); score
    reads cached `logits` (the head's output) and `features`.

    Conventions: OpenOOD's VIM returns the same number (energy - v). pytorch-ood's ``ViM`` returns its
    negative (higher = more OOD). Both take the principal space from np.linalg.eig of the covariance;
    mosx uses a symmetric eigensolver (eigh) in float64: the same space.
    """

    spec_name = "vim"
    needs = ("logits", "features")
    fit_needs = ("features", "head")
    fit_optional = ()
    fit_params = ("dim",)  # the fitted subspace and alpha depend on dim: replace(dim=...) needs a refit
    streaming_fit = True

    def __init__(self, dim: int | None = None):
        super().__init__()
        if dim is not None and (int(dim) != dim or dim < 1):
            raise ValueError(f"vim: dim must be a positive integer, got {dim}")
        self.dim = None if dim is None else int(dim)

    def search_space(self) -> dict:
        """Principal dimensions around the paper's choice (1000 of 2048 for ResNet-50, 512 of 768 for
        ViT), as fractions of the fitted feature width (the ResNet-50 values before a fit)."""
        D = getattr(self, "_dim", 2048)
        return {
            "dim": sorted({max(1, D // 8), max(1, D // 4), max(1, D // 2), _paper_dim(D), max(1, (3 * D) // 4)} - {D})
        }

    def _fit(self, features=None, head=None, device=None):
        _check_2d(features, "features", self.name)
        h = _as_head(head, self.name)
        dev = _fit_device(features, device)
        n, D = features.shape
        if h.weight.shape[1] != D:
            raise ValueError(f"vim: the head reads {h.weight.shape[1]}-d features, the fit features are {D}-d")
        dim = _paper_dim(D) if self.dim is None else self.dim
        if dim >= D:
            raise ValueError(f"vim: dim = {dim} must be smaller than the feature width {D}")
        if n < 1:
            raise ValueError("vim: no fit samples")
        W = h.weight.to(dev, torch.float64)
        b = (
            torch.zeros(W.shape[0], dtype=torch.float64, device=dev)
            if h.bias is None
            else h.bias.to(dev, torch.float64)
        )
        origin = -(torch.linalg.pinv(W) @ b)
        moment = torch.zeros(D, D, dtype=torch.float64, device=dev)
        for _, f in _row_chunks(features, dev):
            x = f - origin
            moment.addmm_(x.T, x)
        moment /= n
        _, evecs = torch.linalg.eigh(moment)  # ascending eigenvalues
        residual_space = evecs[:, : D - dim]  # all but the `dim` leading directions
        max_logit = res = 0.0
        for _, f in _row_chunks(features, dev):
            max_logit += float((f @ W.T + b).amax(1).sum())
            res += float(((f - origin) @ residual_space).norm(dim=1).sum())
        if res == 0:
            raise ValueError("vim: the fit features have no residual outside the principal subspace (dim too large)")
        self._origin, self._residual_space = origin, residual_space
        self._alpha = (max_logit / n) / (res / n)
        self._dim, self._num_logits, self._fitted_dim = D, W.shape[0], dim

    @property
    def alpha(self) -> float:
        """The fitted virtual-logit scale."""
        return self._alpha

    def residual(self, features: torch.Tensor) -> torch.Tensor:
        """[N] norms of the features' components outside the principal subspace (around the origin)."""
        f = _matrix(features, "features", self.name, self._dim)
        ns = self._residual_space.to(f.device, f.dtype)
        return ((f - self._origin.to(f.device, f.dtype)) @ ns).norm(dim=1)

    def _score(self, logits=None, features=None):
        z = _matrix(logits, "logits", self.name, self._num_logits)
        f = _matrix(features, "features", self.name, self._dim).to(z.dtype)
        _same_rows(self.name, logits=z, features=f)
        return torch.logsumexp(z, dim=1) - self._alpha * self.residual(f)
