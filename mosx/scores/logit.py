"""Logit scores: MOS, MSP, MaxLogit, Energy and ODIN, computed from a model's logits.

All but ODIN with eps > 0 read cached ``logits`` only; ODIN's input perturbation needs ``inputs``
and ``model``.
"""

from __future__ import annotations

import torch

from .._dtypes import acc_dtype
from .base import Scorer
from .model import _model_logits
from .tensors import _matrix


class MOS(Scorer):
    """MOS (Huang & Li, CVPR 2021): -min over groups of the group-softmax "others" probability.
    Reads grouped logits [N, C + K]."""

    spec_name = "mos"
    needs_groups = True

    def __init__(self, groups):
        super().__init__()
        from ..groups import as_groups

        self.groups = as_groups(groups)

    def _score(self, logits=None, **_):
        from ..ops import group_softmax_score

        return group_softmax_score(_matrix(logits, "logits", self.name, self.groups.num_logits), self.groups)


class MSP(Scorer):
    """Maximum softmax probability (Hendrycks & Gimpel, 2017)."""

    spec_name = "msp"

    def _score(self, logits=None, **_):
        return torch.softmax(_matrix(logits, "logits", self.name), dim=1).amax(dim=1)


class MaxLogit(Scorer):
    """Largest logit (Hendrycks et al., 2022)."""

    spec_name = "maxlogit"

    def _score(self, logits=None, **_):
        return _matrix(logits, "logits", self.name).amax(dim=1)


class Energy(Scorer):
    """Negative free energy (Liu et al., 2020): T * logsumexp(logits / T)."""

    spec_name = "energy"

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"energy: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def _score(self, logits=None, **_):
        z = _matrix(logits, "logits", self.name)
        return self.temperature * torch.logsumexp(z / self.temperature, dim=1)


class ODIN(Scorer):
    """ODIN (Liang et al., 2018): max softmax(f(x~) / T) with x~ = x - eps * sign(-grad_x log S(x; T)),
    S the temperature-scaled max softmax. eps is in the units of the model's input (after any
    normalisation). With eps = 0 it reads cached logits; otherwise it needs `inputs` and `model`.
    """

    spec_name = "odin"

    def __init__(self, temperature: float = 1000.0, eps: float = 0.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"odin: temperature must be > 0, got {temperature}")
        if eps < 0:
            raise ValueError(f"odin: eps must be >= 0, got {eps}")
        self.temperature, self.eps = float(temperature), float(eps)

    @property
    def needs(self):
        return ("logits",) if self.eps == 0 else ("inputs", "model")

    def search_space(self) -> dict:
        """The ODIN paper's temperatures T in {1, 2, 5, ..., 1000}; with eps > 0 also the magnitudes
        of :data:`mosx.scores.ODIN_EPS_GRID` (searched through select_eps, which needs the model and
        the inputs). An eps = 0 ODIN stays unperturbed: its temperature is searched from cached logits."""
        space = {"temperature": [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]}
        if self.eps > 0:
            from .eps_search import ODIN_EPS_GRID

            space["eps"] = list(ODIN_EPS_GRID)
        return space

    def _score(self, logits=None, inputs=None, model=None, **_):
        T = self.temperature
        if self.eps == 0:
            z = _matrix(logits, "logits", self.name)
            return torch.softmax(z / T, dim=1).amax(dim=1)
        if inputs is None or model is None:
            raise ValueError("odin: eps > 0 needs `inputs` and `model` (the input is perturbed)")
        x = inputs.detach().clone().requires_grad_(True)
        z = _model_logits(model, x)
        # Each sample's loss depends on its own input only (model in eval mode), so one backward
        # of the batch sum gives every per-sample gradient.
        nll = -torch.log_softmax(z.to(acc_dtype(z.dtype)) / T, dim=1).amax(dim=1)
        (grad,) = torch.autograd.grad(nll.sum(), x)
        with torch.no_grad():
            x_t = x.detach() - self.eps * torch.sign(grad)
            z_t = _model_logits(model, x_t)
            z_t = z_t.to(acc_dtype(z_t.dtype))
            return torch.softmax(z_t / T, dim=1).amax(dim=1)
