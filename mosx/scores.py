"""OOD scores behind one interface. Every score: higher = more in-distribution.

A scorer is built from its hyperparameters, fitted on ID data when the method needs statistics of it,
then maps a batch to one score per sample::

    from mosx import scores
    maha = scores.Mahalanobis().fit(features=id_train_features, labels=id_train_labels)
    s = maha.score(features=batch_features)                # [N]

    scorers = {"msp": scores.MSP(), "energy": scores.Energy(), "mos": scores.MOS(groups)}
    out = scores.score_all(scorers, {"logits": cached_logits})   # every score from one read

The data a scorer reads is named by keyword: ``logits`` [N, L], ``features`` [N, D] (the input of
the final linear layer), ``inputs`` (images) with ``model`` for the methods that perturb the input,
``labels`` [N] for fitting. ``Scorer.needs`` / ``Scorer.fit_needs`` list what each one reads.

Computation runs in float32 (float64 when given float64), on the device of the data.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "Scorer",
    "MOS",
    "MSP",
    "MaxLogit",
    "Energy",
    "ODIN",
    "KLMatching",
    "Mahalanobis",
    "GradNorm",
    "ReAct",
    "LinearHead",
    "linear_head",
    "model_outputs",
    "SCORERS",
    "build_scorer",
    "fit_all",
    "score_all",
    "select_eps",
    "ODIN_EPS_GRID",
]

# The perturbation magnitudes searched by the ODIN / Mahalanobis reference code.
ODIN_EPS_GRID = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005, 0.01, 0.05, 0.1, 0.2)


# ------------------------------------------------------------------------------ helpers
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _matrix(x, name: str, who: str, cols: Optional[int] = None) -> torch.Tensor:
    if x is None:
        raise ValueError(f"{who}: needs `{name}`")
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{who}: {name} must be 2-D [N, {'D' if name == 'features' else 'L'}], got shape {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise TypeError(f"{who}: {name} must be floating point, got {x.dtype}")
    if cols is not None and x.shape[1] != cols:
        raise ValueError(f"{who}: {name} have {x.shape[1]} columns but the scorer was fitted on {cols}")
    return x.to(_compute_dtype(x))


def _check_2d(x, name: str, who: str) -> None:
    """Shape/dtype checks on a tensor or array without loading it (it may be a large memmap)."""
    if x is None:
        raise ValueError(f"{who}: needs `{name}`")
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"{who}: {name} must be 2-D, got shape {shape}")
    dt = x.dtype
    floating = dt.is_floating_point if isinstance(dt, torch.dtype) else getattr(dt, "kind", "") == "f"
    if not floating:
        raise TypeError(f"{who}: {name} must be floating point, got {dt}")


def _row_chunks(x, device, chunk: int = 65536, dtype=torch.float64):
    """Row blocks of a tensor or array (e.g. a memmap of the fp16 cache) as `dtype` on `device`."""
    for lo in range(0, x.shape[0], chunk):
        t = x[lo:lo + chunk]
        if not isinstance(t, torch.Tensor):
            import numpy as np

            t = torch.from_numpy(np.array(t))
        yield lo, t.to(device=device, dtype=dtype)


def _fit_device(x, device):
    if device is not None:
        return torch.device(device)
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _same_rows(who: str, **named):
    rows = {k: v.shape[0] for k, v in named.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"{who}: row counts differ: {rows}")


@dataclass
class LinearHead:
    """The final linear layer: logits = features @ weight.T + bias."""

    weight: torch.Tensor  # [C, D]
    bias: Optional[torch.Tensor] = None  # [C]

    def __post_init__(self):
        w = self.weight.detach()
        if w.dim() == 4 and w.shape[2:] == (1, 1):  # a 1x1 conv head (BiT)
            w = w.flatten(1)
        if w.dim() != 2:
            raise ValueError(f"LinearHead: weight must be [C, D] (or a 1x1 conv [C, D, 1, 1]), got {tuple(w.shape)}")
        self.weight = w
        if self.bias is not None:
            self.bias = self.bias.detach()
            if self.bias.shape != (w.shape[0],):
                raise ValueError(f"LinearHead: bias must be [{w.shape[0]}], got {tuple(self.bias.shape)}")

    @classmethod
    def from_module(cls, m: torch.nn.Module) -> "LinearHead":
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            return cls(m.weight, m.bias)
        raise TypeError(f"LinearHead: expected nn.Linear or a 1x1 nn.Conv2d, got {type(m).__name__}")

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(features.device, features.dtype)
        b = None if self.bias is None else self.bias.to(features.device, features.dtype)
        return F.linear(features, w, b)


def _head_module(model: torch.nn.Module) -> torch.nn.Module:
    getter = getattr(model, "get_classifier", None)  # timm
    if callable(getter):
        m = getter()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            return m
    for name in ("fc", "head", "classifier"):
        m = getattr(model, name, None)
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            return m
    last = None
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            last = m
    if last is None:
        raise ValueError(f"no linear head found in {type(model).__name__}: give a LinearHead explicitly")
    return last


def linear_head(model: torch.nn.Module) -> LinearHead:
    """The model's final linear layer (timm's get_classifier(), .fc/.head/.classifier, or the last
    nn.Linear), as a :class:`LinearHead`."""
    return LinearHead.from_module(_head_module(model))


def model_outputs(model: torch.nn.Module, inputs: torch.Tensor):
    """(logits, features) of a batch: features are the input of the final linear layer.

    Works with models that return (logits, features), timm-style models (forward_features +
    forward_head(pre_logits=True)), and any other model through a hook on its linear head.
    """
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        f = model.forward_features(inputs)
        feats = model.forward_head(f, pre_logits=True)
        return model.forward_head(f), feats.flatten(1)
    captured = []
    handle = _head_module(model).register_forward_hook(lambda m, args, out: captured.append(args[0]))
    try:
        out = model(inputs)
    finally:
        handle.remove()
    if isinstance(out, (tuple, list)):
        return out[0], out[1].flatten(1)
    if not captured:
        raise RuntimeError(f"model_outputs: the head of {type(model).__name__} was not called in forward")
    return out, captured[-1].flatten(1)


def _model_logits(model, inputs):
    out = model(inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


# ------------------------------------------------------------------------------ base
class Scorer:
    """Base class. Subclasses set `needs` (data read by score), `fit_needs` (data read by fit; empty
    when no fitting is needed) and implement `_score` (and `_fit`)."""

    name = "scorer"
    needs: tuple = ("logits",)
    fit_needs: tuple = ()

    def __init__(self):
        self._fitted = False

    @property
    def needs_fit(self) -> bool:
        return bool(self.fit_needs)

    @property
    def fitted(self) -> bool:
        return self._fitted or not self.fit_needs

    def fit(self, **data) -> "Scorer":
        """Fit on ID data (no-op for methods without statistics). Returns self."""
        if self.fit_needs:
            self._fit(**data)
            self._fitted = True
        return self

    def score(self, **data) -> torch.Tensor:
        """[N] scores, higher = more in-distribution."""
        if not self.fitted:
            raise RuntimeError(f"{self.name}: call fit(...) on ID data before scoring")
        with torch.no_grad() if "inputs" not in self.needs else torch.enable_grad():
            return self._score(**data)

    __call__ = score

    def replace(self, **params) -> "Scorer":
        """A copy with some hyperparameters changed (fitted statistics are shared)."""
        new = copy.copy(self)
        for k, v in params.items():
            if not hasattr(new, k):
                raise AttributeError(f"{self.name} has no hyperparameter {k!r}")
            setattr(new, k, v)
        return new

    def _fit(self, **data):
        raise NotImplementedError

    def _score(self, **data):
        raise NotImplementedError

    def __repr__(self):
        def show(v):
            if isinstance(v, LinearHead):
                return f"LinearHead({v.weight.shape[0]}x{v.weight.shape[1]})"
            return repr(v)

        params = {k: v for k, v in vars(self).items()
                  if not k.startswith("_") and k != "name" and not torch.is_tensor(v)}
        return f"{type(self).__name__}({', '.join(f'{k}={show(v)}' for k, v in params.items())})"


# ------------------------------------------------------------------------------ logit scores
class MOS(Scorer):
    """MOS (Huang & Li, CVPR 2021): -min over groups of the group-softmax "others" probability.
    Reads grouped logits [N, C + K]."""

    name = "mos"

    def __init__(self, groups):
        super().__init__()
        from .groups import as_groups

        self.groups = as_groups(groups)

    def _score(self, logits=None, **_):
        from .ops import group_softmax_score

        return group_softmax_score(_matrix(logits, "logits", self.name, self.groups.num_logits), self.groups)


class MSP(Scorer):
    """Maximum softmax probability (Hendrycks & Gimpel, 2017)."""

    name = "msp"

    def _score(self, logits=None, **_):
        return torch.softmax(_matrix(logits, "logits", self.name), dim=1).amax(dim=1)


class MaxLogit(Scorer):
    """Largest logit (Hendrycks et al., 2022)."""

    name = "maxlogit"

    def _score(self, logits=None, **_):
        return _matrix(logits, "logits", self.name).amax(dim=1)


class Energy(Scorer):
    """Negative free energy (Liu et al., 2020): T * logsumexp(logits / T)."""

    name = "energy"

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

    name = "odin"

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
        nll = -torch.log_softmax(z.to(_compute_dtype(z)) / T, dim=1).amax(dim=1)
        (grad,) = torch.autograd.grad(nll.sum(), x)
        with torch.no_grad():
            x_t = x.detach() - self.eps * torch.sign(grad)
            z_t = _model_logits(model, x_t)
            z_t = z_t.to(_compute_dtype(z_t))
            return torch.softmax(z_t / T, dim=1).amax(dim=1)


class GradNorm(Scorer):
    """GradNorm (Huang et al., NeurIPS 2021): L1 norm of the gradient, w.r.t. the final linear
    layer's weight, of KL(uniform || softmax(logits / T)). For a linear head that gradient is
    (softmax(z / T) - u) / T outer features, so the score is ||p - u||_1 * ||features||_1 / T:
    no per-sample backward. Reads logits and features (the head's input)."""

    name = "gradnorm"
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


# ------------------------------------------------------------------------------ fitted scores
class KLMatching(Scorer):
    """KL matching (Hendrycks et al., 2022): templates q_c = mean softmax of the ID samples
    predicted as class c; score = -min_c KL(p || q_c). All classes at once as one matrix product:
    KL(p || q_c) = sum p log p - p @ log(q_c). Classes never predicted in the fit data get no
    template. fit(logits=...) on ID (validation) data."""

    name = "kl_matching"
    fit_needs = ("logits",)
    streaming_fit = True  # fit() reads its data in row blocks: arrays/memmaps need not fit in memory

    def _fit(self, logits=None, device=None, **_):
        _check_2d(logits, "logits", self.name)
        dev = _fit_device(logits, device)
        C = logits.shape[1]
        sums = torch.zeros(C, C, dtype=torch.float64, device=dev)
        counts = torch.zeros(C, dtype=torch.int64, device=dev)
        for _, z in _row_chunks(logits, dev):
            p = torch.softmax(z, dim=1)
            pred = p.argmax(dim=1)
            sums.index_add_(0, pred, p)
            counts += torch.bincount(pred, minlength=C)
        present = counts > 0
        q = sums[present] / counts[present, None].to(torch.float64)
        # log 0 -> a huge finite value so that 0 * log q stays 0 in the product.
        self._log_templates = torch.log(q).clamp_min(math.log(torch.finfo(torch.float64).tiny))
        self._classes = present.nonzero().squeeze(1)
        self._num_logits = C

    def _score(self, logits=None, **_):
        z = _matrix(logits, "logits", self.name, self._num_logits)
        p = torch.softmax(z, dim=1)
        neg_entropy = torch.xlogy(p, p).sum(1, keepdim=True)
        kl = neg_entropy - p @ self._log_templates.to(z.device, z.dtype).T
        return -kl.amin(dim=1)


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

    name = "mahalanobis"
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
            raise ValueError(f"mahalanobis: labels must be [N] = [{n}] class ids, got {tuple(labels.shape)} {labels.dtype}")
        labels = labels.long()
        if labels.min() < 0:
            raise ValueError("mahalanobis: labels must be >= 0")
        C = int(labels.max()) + 1
        counts = torch.bincount(labels, minlength=C)
        present = counts > 0
        # Two passes in row blocks (float64): class means, then the scatter around them.
        sums = torch.zeros(C, D, dtype=torch.float64, device=dev)
        for lo, f in _row_chunks(features, dev):
            sums.index_add_(0, labels[lo:lo + f.shape[0]], f)
        full = sums / counts.clamp_min(1)[:, None].to(torch.float64)
        means = full[present]
        cov = torch.zeros(D, D, dtype=torch.float64, device=dev)
        for lo, f in _row_chunks(features, dev):
            centred = f - full[labels[lo:lo + f.shape[0]]]
            cov.addmm_(centred.T, centred)
        cov /= n
        if self.regularization > 0:
            cov = cov + self.regularization * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
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


def _percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """q-th percentile of all elements with linear interpolation (NumPy's default), any size."""
    flat = x.reshape(-1)
    n = flat.numel()
    pos = (q / 100.0) * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    v_lo = flat.kthvalue(lo + 1).values.to(torch.float64)
    v_hi = flat.kthvalue(hi + 1).values.to(torch.float64) if hi != lo else v_lo
    return v_lo + (v_hi - v_lo) * (pos - lo)


def _percentile_fp16(x, q: float, device=None) -> torch.Tensor:
    """Exact q-th percentile (linear interpolation) of an fp16 tensor/array of any size, read in row
    blocks: fp16 has 65,536 bit patterns, so one bincount of them gives every order statistic."""
    dev = _fit_device(x, device)
    counts = torch.zeros(65536, dtype=torch.int64, device=dev)
    for lo in range(0, x.shape[0], 65536):
        t = x[lo:lo + 65536]
        if not isinstance(t, torch.Tensor):
            import numpy as np

            t = torch.from_numpy(np.array(t))
        bits = t.to(dev).reshape(-1).view(torch.int16).to(torch.int32) & 0xFFFF
        counts += torch.bincount(bits, minlength=65536)
    values = torch.arange(65536, dtype=torch.int32, device=dev).to(torch.int16).view(torch.float16).to(torch.float64)
    nan = torch.isnan(values)
    if bool(counts[nan].any()):
        raise ValueError(f"react: the features contain {int(counts[nan].sum())} NaN value(s)")
    order = torch.argsort(torch.where(nan, torch.inf, values), stable=True)
    cum = torch.cumsum(counts[order], 0)
    n = int(cum[-1])
    if n == 0:
        raise ValueError("react: no features to take a percentile of")
    pos = (q / 100.0) * (n - 1)
    ranks = torch.tensor([math.floor(pos), min(math.floor(pos) + 1, n - 1)], device=dev)
    # the k-th smallest (0-based) is the first value whose cumulative count exceeds k
    v = values[order[torch.searchsorted(cum, ranks, side="right")]]
    return v[0] + (v[1] - v[0]) * (pos - math.floor(pos))


def _is_half(x) -> bool:
    dt = getattr(x, "dtype", None)
    return dt == torch.float16 or str(dt) == "float16"


class ReAct(Scorer):
    """ReAct (Sun et al., NeurIPS 2021): clip the features feeding the final linear layer at the
    `percentile`-th percentile of ID features (all entries), recompute the logits with that layer,
    and score them with any logit-based scorer (Energy by default).

    The head comes from the constructor, fit(head=...) or score(head=...) (a :class:`LinearHead`;
    see :func:`linear_head`). fit(features=...) on ID data, or give `threshold` directly.
    """

    name = "react"
    needs = ("features", "head")
    fit_needs = ("features",)

    def __init__(self, base: Optional[Scorer] = None, percentile: float = 90.0,
                 head: Optional[LinearHead] = None, threshold: Optional[float] = None):
        super().__init__()
        if not 0 <= percentile <= 100:
            raise ValueError(f"react: percentile must be in [0, 100], got {percentile}")
        self.base = Energy() if base is None else base
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


# ------------------------------------------------------------------------------ registry
SCORERS: dict = {
    "mos": MOS,
    "msp": MSP,
    "maxlogit": MaxLogit,
    "energy": Energy,
    "odin": ODIN,
    "kl_matching": KLMatching,
    "mahalanobis": Mahalanobis,
    "gradnorm": GradNorm,
}


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def build_scorer(spec: str, *, groups=None, head: Optional[LinearHead] = None) -> Scorer:
    """A scorer from a spec string: ``name[:key=value,...]``; ``react-<name>`` wraps a logit
    scorer in ReAct (its own key: percentile). Examples: "msp", "energy:temperature=2",
    "odin:temperature=1000,eps=0.0014", "react-energy:percentile=90", "mos" (needs `groups`)."""
    spec = spec.strip()
    name, _, params = spec.partition(":")
    kwargs = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"scorer spec {spec!r}: parameters are key=value, got {item!r}")
        kwargs[k.strip()] = _parse_value(v.strip())
    react = name.startswith("react-")
    base_name = name[len("react-"):] if react else name
    if base_name not in SCORERS:
        raise ValueError(f"unknown scorer {base_name!r} in {spec!r}; known: {', '.join(SCORERS)} (and react-<name>)")
    react_kwargs = {k: kwargs.pop(k) for k in ("percentile", "threshold") if react and k in kwargs}
    cls = SCORERS[base_name]
    try:
        if cls is MOS:
            if groups is None:
                raise ValueError("the mos scorer needs groups")
            base = MOS(groups, **kwargs)
        else:
            base = cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"scorer spec {spec!r}: {e}") from None
    return ReAct(base, head=head, **react_kwargs) if react else base


# ------------------------------------------------------------------------------ many at once
def _rows(data: Mapping, keys: Iterable[str]) -> int:
    n = None
    for k in keys:
        v = data.get(k)
        if isinstance(v, torch.Tensor) or hasattr(v, "shape"):
            rows = v.shape[0]
            if n is not None and rows != n:
                raise ValueError(f"score_all: `{k}` has {rows} rows, other data has {n}")
            n = rows
    if n is None:
        raise ValueError("score_all: no row data (logits / features / inputs) given")
    return n


_ROW_KEYS = ("logits", "features", "inputs", "labels")


def _chunk(v, lo, hi, device):
    t = v[lo:hi]
    if not isinstance(t, torch.Tensor):
        import numpy as np

        t = torch.from_numpy(np.array(t))  # e.g. a read-only NumPy memmap of the fp16 cache: copy the chunk
    t = t.to(device, non_blocking=True)
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def fit_all(scorers: Mapping[str, Scorer], data: Mapping, *, device=None) -> dict:
    """Fit every scorer that needs it on the same ID data (loaded to `device` once)."""
    todo = {k: s for k, s in scorers.items() if s.needs_fit}
    if not todo:
        return dict(scorers)
    n = _rows(data, _ROW_KEYS)
    dev = torch.device(device) if device is not None else None
    loaded = None
    for name, s in todo.items():
        missing = [k for k in s.fit_needs if data.get(k) is None and not (k == "labels" and data.get("logits") is not None)]
        if missing:
            raise ValueError(f"fit_all: scorer {name!r} needs {missing} to fit")
        if getattr(s, "streaming_fit", False):
            s.fit(**data, device=dev)  # reads the (possibly memory-mapped) data in row blocks
            continue
        if loaded is None:  # everything in memory once, for the scorers that need it whole
            loaded = {k: (_chunk(v, 0, n, dev or (v.device if isinstance(v, torch.Tensor) else "cpu"))
                          if k in _ROW_KEYS and v is not None else v) for k, v in data.items()}
        s.fit(**loaded)
    return dict(scorers)


def score_all(
    scorers: Mapping[str, Scorer],
    data: Mapping,
    *,
    batch_size: int = 65536,
    device=None,
    timings: Optional[dict] = None,
) -> dict:
    """Every scorer on the same data, reading each chunk of rows once.

    data: ``logits`` / ``features`` (tensors or arrays such as an fp16 memmap; half precision is
    widened to float32 per chunk), optionally ``inputs`` + ``model`` and ``head``.
    timings: if a dict is given, the seconds spent in each scorer are added to it.
    Returns {name: [N] tensor on the CPU}.
    """
    if batch_size < 1:
        raise ValueError(f"score_all: batch_size must be >= 1, got {batch_size}")
    for name, s in scorers.items():
        missing = [k for k in s.needs if data.get(k) is None and not (k == "head" and getattr(s, "head", None) is not None)]
        if missing:
            raise ValueError(f"score_all: scorer {name!r} needs {missing}, which the data lacks")
        if not s.fitted:
            raise RuntimeError(f"score_all: scorer {name!r} must be fitted first (fit_all / .fit)")
    n = _rows(data, _ROW_KEYS)
    first = next((v for k, v in data.items() if k in _ROW_KEYS and isinstance(v, torch.Tensor)), None)
    dev = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    parts = {name: [] for name in scorers}
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        batch = {k: (_chunk(v, lo, hi, dev) if k in _ROW_KEYS and v is not None else v) for k, v in data.items()}
        for name, s in scorers.items():
            t0 = time.perf_counter()
            out = s.score(**batch)
            if timings is not None:
                if out.is_cuda:
                    torch.cuda.synchronize(out.device)
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
            parts[name].append(out.detach().cpu())
    return {name: torch.cat(p) for name, p in parts.items()}


# ------------------------------------------------------------------------------ eps selection
def _iter_inputs(batches):
    if isinstance(batches, torch.Tensor):
        yield batches
        return
    for b in batches:
        yield b[0] if isinstance(b, (tuple, list)) else b


def select_eps(
    make: Callable[[float], Scorer],
    model: torch.nn.Module,
    id_inputs,
    ood_inputs,
    eps_grid: Sequence[float] = ODIN_EPS_GRID,
    *,
    metric: str = "fpr_at_tpr",
    device=None,
):
    """Pick the input-perturbation magnitude on validation data, as the ODIN / Mahalanobis papers.

    make(eps) -> scorer (e.g. ``lambda e: ODIN(1000, e)`` or ``lambda e: fitted_maha.replace(eps=e)``);
    id_inputs / ood_inputs: a tensor or an iterable of batches (tensors or (inputs, ...) tuples),
    re-iterated for every eps. metric: "fpr_at_tpr" (lowest wins) or "auroc" (highest wins).
    Returns (best eps, [(eps, OODMetrics), ...]).
    """
    from .metrics import ood_metrics

    if metric not in ("fpr_at_tpr", "auroc"):
        raise ValueError(f"select_eps: metric must be 'fpr_at_tpr' or 'auroc', got {metric!r}")
    if not eps_grid:
        raise ValueError("select_eps: empty eps grid")
    was_training = model.training
    model.eval()
    results = []
    try:
        for eps in eps_grid:
            s = make(float(eps))
            sets = []
            for data in (id_inputs, ood_inputs):
                out = []
                for x in _iter_inputs(data):
                    x = x.to(device) if device is not None else x
                    if s.needs == ("logits",):
                        with torch.no_grad():
                            out.append(s.score(logits=_model_logits(model, x)).cpu())
                    elif s.needs == ("features",):
                        with torch.no_grad():
                            out.append(s.score(features=model_outputs(model, x)[1]).cpu())
                    else:
                        out.append(s.score(inputs=x, model=model).cpu())
                sets.append(torch.cat(out))
            results.append((float(eps), ood_metrics(sets[0], sets[1])))
    finally:
        model.train(was_training)
    if metric == "auroc":
        best = max(results, key=lambda r: (r[1].auroc, -r[1].fpr_at_tpr))
    else:
        best = min(results, key=lambda r: (r[1].fpr_at_tpr, -r[1].auroc))
    return best[0], results
