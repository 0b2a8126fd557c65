"""Softmax-shape scores: the negative entropy of the softmax and GEN, the generalized entropy of
its largest probabilities. Both read cached ``logits`` only and need no fitting."""

from __future__ import annotations

import torch

from .base import Scorer
from .tensors import _matrix


class Entropy(Scorer):
    """Negative Shannon entropy of the softmax: sum_c p_c log p_c (0 for a one-hot softmax, -log C
    for a uniform one), from log_softmax so that no probability is clipped.

    Conventions: pytorch-ood's ``Entropy`` returns the entropy itself (higher = more OOD) and clips p
    at 1e-7 first; mosx returns its negative, unclipped (higher = more in-distribution).
    """

    spec_name = "entropy"

    def _score(self, logits=None):
        z = _matrix(logits, "logits", self.name)
        logp = torch.log_softmax(z, dim=1)
        return (logp.exp() * logp).sum(1)


class GEN(Scorer):
    """GEN (Liu et al., CVPR 2023, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution
    Detection"): minus the generalized entropy of the M largest softmax probabilities,
    score = -sum_{j=1}^{M} p_(j)^gamma (1 - p_(j))^gamma, p_(1) >= p_(2) >= ... the sorted
    probabilities, summed as in the paper (M larger than the number of classes takes all of them).
    Defaults are the paper's ImageNet setting (gamma = 0.1, M = 100).

    Conventions: OpenOOD's GEN is the same number (its sum, negated). pytorch-ood's ``GEN`` returns
    the *mean* over the top M instead of the sum (a factor 1/M), not negated (higher = more OOD),
    with p clipped to [1e-7, 1 - 1e-7]; mosx sums, negates and does not clip.
    """

    spec_name = "gen"

    def __init__(self, gamma: float = 0.1, M: int = 100):
        super().__init__()
        if not gamma > 0:
            raise ValueError(f"gen: gamma must be > 0, got {gamma}")
        if int(M) != M or M < 1:
            raise ValueError(f"gen: M must be a positive integer, got {M}")
        self.gamma, self.M = float(gamma), int(M)

    def search_space(self) -> dict:
        """The sweep of the GEN paper's code as OpenOOD runs it."""
        return {"gamma": [0.01, 0.1, 0.5, 1, 2, 5, 10], "M": [10, 50, 100, 200, 500, 1000]}

    def _score(self, logits=None):
        z = _matrix(logits, "logits", self.name)
        p = torch.softmax(z, dim=1)
        top = p.topk(min(self.M, p.shape[1]), dim=1, sorted=False).values
        return -(top.pow(self.gamma) * (1 - top).pow(self.gamma)).sum(1)
