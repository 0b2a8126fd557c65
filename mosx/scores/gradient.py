"""Gradient scores: GradNorm, the norm of a loss gradient w.r.t. the final layer, in closed form."""

from __future__ import annotations

import torch

from .base import Scorer
from .tensors import _matrix, _same_rows


class GradNorm(Scorer):
    """GradNorm (Huang et al., NeurIPS 2021): L1 norm of the gradient, w.r.t. the final linear
    layer's weight, of KL(uniform || softmax(logits / T)). For a linear head that gradient is
    (softmax(z / T) - u) / T outer features, so the score is ||p - u||_1 * ||features||_1 / T:
    no per-sample backward. Reads logits and features (the head's input)."""

    spec_name = "gradnorm"
    needs = ("logits", "features")

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"gradnorm: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def _score(self, logits=None, features=None, **_):
        z = _matrix(logits, "logits", self.name)
        f = _matrix(features, "features", self.name).to(z.dtype)
        _same_rows(self.name, logits=z, features=f)
        p = torch.softmax(z / self.temperature, dim=1)
        return (p - 1.0 / z.shape[1]).abs().sum(1) * f.abs().sum(1) / self.temperature
