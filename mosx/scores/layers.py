"""Multi-layer Mahalanobis (Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks", NeurIPS 2018), run the way the MOS reference code (Huang & Li,
CVPR 2021, ``tune_mahalanobis_hyperparameter.py``) runs it: :class:`MahalanobisLayers` (its
docstring lists the protocol and each difference from the reference), the pooled layer features it
reads (:func:`layer_features`, :func:`default_layers`), the FGSM "OOD" validation samples
(:func:`adversarial_inputs`) and the tuning protocol (:func:`tune_mahalanobis_layers`).
Builds on ``distance.py``: each layer's statistics are a fitted :class:`~mosx.scores.Mahalanobis`.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F

from .base import Scorer
from .distance import Mahalanobis
from .model import _model_logits

# The reference's eps grid, in its order (ties in FPR95 go to the earlier value, as there).
MAHALANOBIS_LAYERS_EPS_GRID = (0.0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005)
_WHO = "mahalanobis_layers"


class _Captured(Exception):
    """Raised by the hooks once every requested layer has run: the rest of the forward is skipped."""


@contextlib.contextmanager
def _evaluating(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _pool(out, name: str) -> torch.Tensor:
    out = out[0] if isinstance(out, (tuple, list)) else out
    if not torch.is_tensor(out) or out.dim() not in (2, 3, 4):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"{_WHO}: layer {name!r} gave {shape}; expected [N, C, H, W], [N, T, C] or [N, C]")
    return out.mean((2, 3)) if out.dim() == 4 else out.mean(1) if out.dim() == 3 else out


def _modules(model, layers) -> list:
    named = dict(model.named_modules())
    missing = [n for n in layers if n not in named]
    if missing:
        top = ", ".join(n for n, _ in model.named_children())
        raise ValueError(
            f"{_WHO}: {type(model).__name__} has no submodule {missing[0]!r} (layers are names from "
            f"model.named_modules(); its top-level ones: {top})"
        )
    return [named[n] for n in layers]


def _forward(model, x, layers) -> list:
    """Pooled outputs of the named layers in one forward pass, stopped once the last of them ran."""
    got = {}

    def hook(i):
        def run(module, args, out):
            if i in got:
                raise ValueError(f"{_WHO}: layer {layers[i]!r} is called more than once in a forward pass")
            got[i] = _pool(out, layers[i])
            if len(got) == len(layers):
                raise _Captured

        return run

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(_modules(model, layers))]
    try:
        model(x)
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(got) < len(layers):
        missing = [n for i, n in enumerate(layers) if i not in got]
        raise RuntimeError(f"{_WHO}: layers {missing} were not called in the forward pass of {type(model).__name__}")
    return [got[i] for i in range(len(layers))]


def layer_features(model: torch.nn.Module, inputs: torch.Tensor, layers) -> list:
    """[N, C_l] features of the named submodules (names from ``model.named_modules()``), from one
    forward pass (hooks; it stops once the last of them has run): 4-D outputs [N, C, H, W] are
    averaged over H, W, token outputs [N, T, C] over T, 2-D ones are kept. Gradients flow when the
    caller enables them."""
    return _forward(model, inputs, list(layers))


def default_layers(model: torch.nn.Module) -> list:
    """The stem and the stages, as module names: timm ResNet-V2 style ``stem`` + ``stages.<i>``
    (mosx's small CNNs: their ``stages``), torchvision / timm ResNet ``maxpool`` (the stem's output)
    + ``layer1..``, or the reference's ResNetV2 ``root`` + ``body.<block>``; the first such module
    found from the top (e.g. inside mosx's Classifier, ``backbone.stages.0``). Raises ValueError
    when it cannot tell."""
    for prefix, m in model.named_modules():
        p = prefix + "." if prefix else ""
        kids = dict(m.named_children())
        stages = kids.get("stages")
        if isinstance(stages, (torch.nn.Sequential, torch.nn.ModuleList)) and len(stages):
            stem = [p + "stem"] if "stem" in kids else []
            return stem + [f"{p}stages.{n}" for n, _ in stages.named_children()]
        if "layer1" in kids:
            stem = [p + "maxpool"] if "maxpool" in kids else []
            return stem + [f"{p}layer{i}" for i in range(1, len(kids) + 1) if f"layer{i}" in kids]
        if "root" in kids and isinstance(kids.get("body"), torch.nn.Sequential):
            return [p + "root"] + [f"{p}body.{n}" for n, _ in kids["body"].named_children()]
    raise ValueError(
        f"{_WHO}: cannot tell the stem and stages of {type(model).__name__} (no `stages`, `layer1..` or "
        "`root` + `body` submodules): give layers=[...], names from model.named_modules()"
    )


def _batches(inputs, batch_size=None, device=None):
    """(x, labels or None) per batch of a tensor (split in batch_size rows) or of an iterable of
    tensors / (inputs, labels, ...) tuples."""
    move = (lambda t: t.to(device)) if device is not None else (lambda t: t)
    if torch.is_tensor(inputs):
        step = batch_size or max(inputs.shape[0], 1)
        for lo in range(0, inputs.shape[0], step):
            yield move(inputs[lo : lo + step]), None
        return
    for b in inputs:
        x, y = (b[0], b[1] if len(b) > 1 else None) if isinstance(b, (tuple, list)) else (b, None)
        if not torch.is_tensor(x):
            raise TypeError(f"{_WHO}: batches must be tensors or (inputs, labels, ...) tuples, got {type(x).__name__}")
        yield move(x), (None if y is None else torch.as_tensor(y))


def _check_labels(labels, n: int, what: str) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.shape != (n,):
        raise ValueError(f"{_WHO}: {what} has {n} inputs but labels of shape {tuple(labels.shape)}")
    return labels


def _regression_class():
    try:
        from sklearn.linear_model import LogisticRegressionCV
    except ImportError as e:
        raise ImportError(
            "mahalanobis_layers needs scikit-learn for its logistic regression: pip install scikit-learn"
        ) from e
    # The reference's defaults (those of scikit-learn 0.22 - 1.7), pinned as later releases change
    # them; n_jobs stays 1 (the reference's -1 only parallelises the folds: the same fit).
    kw = {"Cs": 10, "cv": 5, "scoring": "accuracy", "solver": "lbfgs", "max_iter": 100}
    if "use_legacy_attributes" in inspect.signature(LogisticRegressionCV).parameters:  # >= 1.8
        kw.update(l1_ratios=(0.0,), use_legacy_attributes=False)  # pure L2, the old penalty="l2"
    return lambda: LogisticRegressionCV(**kw)


class MahalanobisLayers(Scorer):
    """Multi-layer Mahalanobis (Lee et al., NeurIPS 2018) with the MOS reference's protocol (below):
    score = w . s + b, the logistic regression's log-odds of ID over the per-layer scores
    s_l = -min_c (f_l(x_l) - mu_c)^T Sigma_l^+ (f_l(x_l) - mu_c), x_l = x - eps sign(grad_x d_l(x)),
    d_l(x) the same minimum at x, f_l the mean-pooled output of layer l, each layer's statistics a
    fitted :class:`Mahalanobis` (class means, tied covariance, pseudo-inverse; `regularization` and
    `dtype` as there).

    Three steps: ``fit(inputs=..., labels=..., model=...)`` on ID training images (a tensor, split
    in `batch_size` rows, or an iterable of batches whose labels are used when `labels` is not
    given; no gradients; the pooled features, sum_l C_l values an image, are held until fitted);
    :meth:`fit_regression` on ID and "OOD" (e.g. :func:`adversarial_inputs`) validation images at
    this eps; then ``score(inputs=..., model=...)``. :func:`tune_mahalanobis_layers` does all three
    on validation data and picks eps. layers: module names (default: :func:`default_layers`; in a
    spec string joined by ``+``). The model is put in eval mode while it runs, then restored.

    Protocol of the reference, and where mosx differs (each difference is also noted where it applies):

    1. layer features f_l(x): the stem output and each stage output, mean-pooled over space;
    2. per layer, class means mu_c and a tied covariance Sigma on ID training data, inverted by a
       pseudo-inverse (the reference: sklearn's EmpiricalCovariance precision, also one; the cut-off
       for tiny eigenvalues may differ). mosx computes in float64 (`dtype`), the reference in float32;
    3. per layer l, x_l = x - eps * sign(grad_x d_l(x)), d_l = min_c (f_l - mu_c)^T Sigma^+ (f_l - mu_c),
       and the layer score s_l = -d_l(x_l) (one backward per layer). The reference uses -0.5 d; the
       factor only rescales s_l, but the regression's L2 penalty is not scale-free, so the regression
       is fed 0.5 * s_l, the reference's own values. Where a gradient is exactly 0, mosx's sign is 0
       and leaves the pixel; the reference's ``(grad >= 0) * 2 - 1`` counts it positive (moves it);
    4. ``LogisticRegressionCV`` with the defaults of the reference's scikit-learn (Cs=10, 5-fold CV,
       L2, accuracy, lbfgs; pinned because newer releases change them), ID = 0, "OOD" = 1, on m ID
       validation images and their FGSM versions x + 0.05 * sign(grad_x CE(model(x), y)); eps is picked
       from the grid by the lowest FPR95 on the next m validation images and their FGSM versions.
       mosx feeds the regression float64 scores (the reference: float32). The reference clamps the
       FGSM images to [0, 1] although its inputs are normalised to [-1, 1] (every negative pixel
       becomes 0): a defect, so mosx clamps only to a range the user gives;
    5. the score. The reference reports -P(OOD) = -predict_proba[:, 1]; mosx returns the regression's
       log-odds of ID (minus sklearn's decision_function): the same order, without the ties that
       probabilities saturating at 0 or 1 in floating point create.
    """

    spec_name = "mahalanobis_layers"
    needs = ("inputs", "model")
    fit_needs = ("inputs", "model")
    fit_params = ("layers", "regularization", "dtype")

    def __init__(self, eps: float = 0.0, layers=None, regularization: float = 0.0, dtype=torch.float64):
        super().__init__()
        if eps < 0 or regularization < 0:
            raise ValueError(f"{_WHO}: eps and regularization must be >= 0")
        if isinstance(layers, (str, int)):  # a spec string: layers=stem+stages.0+stages.1
            layers = str(layers).split("+")
        self.eps, self.regularization = float(eps), float(regularization)
        self.layers = None if layers is None else list(layers)
        self.dtype = Mahalanobis(dtype=dtype).dtype  # checked there ("float32" / "float64" in specs)
        self._stats, self._names, self._coef, self._intercept, self._reg_eps, self._regressor = [None] * 6

    @property
    def regressor(self):
        """The fitted ``sklearn.linear_model.LogisticRegressionCV`` (None before :meth:`fit_regression`)."""
        return self._regressor

    @property
    def layer_names(self) -> list | None:
        """The layers the statistics were fitted on (None before fit)."""
        return self._names

    @property
    def ready(self) -> bool:
        """Whether it can score: statistics fitted and a regression fitted at this eps."""
        return self.fitted and self._coef is not None and self._reg_eps == self.eps

    def search_space(self) -> dict:
        """{}: eps is chosen from images by :func:`tune_mahalanobis_layers`, not from cached outputs."""
        return {}

    def _fit(self, inputs=None, labels=None, model=None, device=None, batch_size=64):
        if inputs is None or model is None:
            raise ValueError(f"{_WHO}: fit needs `inputs` (ID training images) and `model`")
        names = list(self.layers) if self.layers is not None else default_layers(model)
        _modules(model, names)
        if labels is not None and torch.is_tensor(inputs):
            labels = _check_labels(labels, inputs.shape[0], "fit")
        feats, labs = [[] for _ in names], []
        with _evaluating(model), torch.no_grad():
            for x, y in _batches(inputs, batch_size, device):
                for acc, f in zip(feats, _forward(model, x, names)):
                    acc.append(f.detach().cpu())  # held on the host: sum_l C_l values an image
                if labels is None:
                    if y is None:
                        raise ValueError(f"{_WHO}: fit needs `labels`, or batches of (inputs, labels, ...)")
                    labs.append(y.reshape(-1))
        if not feats[0]:
            raise ValueError(f"{_WHO}: fit got no inputs")
        feats = [torch.cat(f) for f in feats]
        labels = _check_labels(labels if labels is not None else torch.cat(labs), feats[0].shape[0], "fit")
        make = lambda: Mahalanobis(regularization=self.regularization, dtype=self.dtype)
        self._stats = [make().fit(features=f, labels=labels, device=device) for f in feats]
        self._names, self._coef, self._intercept, self._reg_eps, self._regressor = names, None, None, None, None

    def _layer_batch(self, x, model) -> torch.Tensor:
        if self.eps == 0:  # no perturbation: every layer from one forward pass
            with torch.no_grad():
                fs = _forward(model, x, self._names)
            return torch.stack([-st.distances(f).amin(1) for st, f in zip(self._stats, fs)], 1)
        cols = []
        for st, name in zip(self._stats, self._names):  # per layer, its own gradient (as the reference)
            with torch.enable_grad():
                xg = x.detach().clone().requires_grad_(True)
                (f,) = _forward(model, xg, [name])
                (g,) = torch.autograd.grad(st.distances(f).amin(1).sum(), xg)
            with torch.no_grad():
                (f_t,) = _forward(model, xg.detach() - self.eps * torch.sign(g), [name])
                cols.append(-st.distances(f_t).amin(1))
        return torch.stack(cols, 1)

    def layer_scores(self, inputs, model, *, batch_size=None, device=None) -> torch.Tensor:
        """[N, L] per-layer scores s_l (perturbed when eps > 0), in `dtype`; inputs: a tensor (split
        in `batch_size` rows when given) or an iterable of batches."""
        if not self.fitted:  # never fitted, or a replace() of layers / regularization / dtype
            raise RuntimeError(f"{_WHO}: call fit(inputs=..., labels=..., model=...) on ID training data first")
        if self.eps < 0:
            raise ValueError(f"{_WHO}: eps must be >= 0, got {self.eps}")
        with _evaluating(model):
            out = [self._layer_batch(x, model) for x, _ in _batches(inputs, batch_size, device)]
        return torch.cat(out) if out else torch.zeros(0, len(self._names), dtype=self.dtype)

    def fit_regression(self, model, id_inputs, ood_inputs, *, batch_size=None, device=None) -> MahalanobisLayers:
        """Fit the logistic regression (ID = 0, OOD = 1, on 0.5 * the layer scores at this eps: the
        reference's values) on ID and "OOD" validation images. Returns self."""
        make = _regression_class()
        import numpy as np

        s_id = self.layer_scores(id_inputs, model, batch_size=batch_size, device=device)
        s_ood = self.layer_scores(ood_inputs, model, batch_size=batch_size, device=device)
        if not (len(s_id) and len(s_ood)):
            raise ValueError(f"{_WHO}: fit_regression needs ID and OOD inputs, got {len(s_id)} and {len(s_ood)}")
        X = (0.5 * torch.cat([s_id, s_ood])).detach().cpu().double().numpy()
        reg = self._regressor = make().fit(X, np.r_[np.zeros(len(s_id)), np.ones(len(s_ood))])
        # log-odds of ID as a function of s: -(coef . 0.5 s + intercept)
        self._coef = -0.5 * torch.from_numpy(np.asarray(reg.coef_, np.float64).reshape(-1))
        self._intercept = -float(np.asarray(reg.intercept_).reshape(-1)[0])
        self._reg_eps = self.eps
        return self

    def _score(self, inputs=None, model=None, **_):
        if inputs is None or model is None:
            raise ValueError(f"{_WHO}: score needs `inputs` and `model`")
        if self._coef is None:
            raise RuntimeError(
                f"{_WHO}: the logistic regression is not fitted: call fit_regression(model, id_inputs, "
                "ood_inputs) (or use tune_mahalanobis_layers) before scoring"
            )
        if self._reg_eps != self.eps:
            raise RuntimeError(
                f"{_WHO}: the regression was fitted at eps={self._reg_eps}, the scorer has eps={self.eps}: "
                "call fit_regression again"
            )
        s = self.layer_scores(inputs, model)
        return s @ self._coef.to(s.device, s.dtype) + self._intercept


def adversarial_inputs(model, inputs, labels, noise: float = 0.05, clamp=None, *, loss=None, batch_size=None):
    """The reference's "OOD" validation samples: FGSM, x + noise * sign(grad_x CE(model(x), y))
    (`loss(logits, labels)` instead of the cross-entropy when given, e.g. for a grouped model).
    clamp: (low, high) or None. The reference clamps to [0, 1] although its inputs are normalised to
    [-1, 1], which cuts every negative pixel to 0: a defect; mosx clamps only when asked. Where a
    gradient is exactly 0 the reference moves the pixel by +noise, mosx leaves it."""
    if noise < 0:
        raise ValueError(f"adversarial_inputs: noise must be >= 0, got {noise}")
    labels = _check_labels(labels, inputs.shape[0], "adversarial_inputs")
    out, lo = [], 0
    with _evaluating(model), torch.enable_grad():
        for x, _ in _batches(inputs, batch_size):
            y = labels[lo : lo + x.shape[0]].to(x.device)
            lo += x.shape[0]
            x = x.detach().clone().requires_grad_(True)
            z = _model_logits(model, x)
            # a sum, not the reference's mean: the same signs, no batch-size factor
            value = F.cross_entropy(z, y.long(), reduction="sum") if loss is None else loss(z, y)
            (g,) = torch.autograd.grad(value, x)
            x_adv = x.detach() + noise * torch.sign(g)
            out.append(x_adv if clamp is None else x_adv.clamp(*clamp))
    return torch.cat(out)


def _first_rows(inputs, labels, n: int):
    """The first n validation (inputs, labels), read no further than needed."""
    xs, ys, have = [], [], 0
    for x, y in _batches(inputs):
        take = min(n - have, x.shape[0])
        xs.append(x[:take])
        ys.append(None if y is None else y.reshape(-1)[:take])
        have += take
        if have == n:
            break
    if have < n:
        raise ValueError(f"tune_mahalanobis_layers: needs 2m = {n} validation samples, got {have}")
    if labels is None:
        if any(y is None for y in ys):
            raise ValueError("tune_mahalanobis_layers: give val_labels, or batches of (inputs, labels, ...)")
        return torch.cat(xs), torch.cat(ys)
    labels = torch.as_tensor(labels)
    if torch.is_tensor(inputs):
        _check_labels(labels, inputs.shape[0], "val_inputs")
    return torch.cat(xs), _check_labels(labels[:n], n, "the first 2m of val_inputs")


def tune_mahalanobis_layers(
    model,
    fit_inputs,
    val_inputs,
    val_labels=None,
    eps_grid=MAHALANOBIS_LAYERS_EPS_GRID,
    m: int = 500,
    noise: float = 0.05,
    *,
    fit_labels=None,
    layers=None,
    regularization: float = 0.0,
    dtype=torch.float64,
    clamp=None,
    loss=None,
    batch_size: int = 32,
    device=None,
):
    """The reference protocol on ID data only: statistics on `fit_inputs` (ID training images,
    labels from `fit_labels` or the batches); the first m validation images and their FGSM versions
    (:func:`adversarial_inputs` with `noise`, `clamp`, `loss`: the group cross-entropy for a
    grouped model, whose logits are not class logits) train the regression, refitted at every eps of
    `eps_grid`; the next m and theirs choose eps by the lowest FPR95 (TPR of ID 95%; ties go to the
    earlier grid value, as the reference's strict "<"). No validation sample past the first 2m is read.

    Returns a :class:`~mosx.scores.SearchResult`: ``scorer`` (fitted, with the chosen eps and its
    regression), ``params`` {"eps": ...}, ``value`` (its FPR95), and ``grid``: one row per eps,
    ``{"params": {"eps": e}, "value": FPR95, "metrics": {"fgsm": OODMetrics.as_dict()}}`` (AUROC etc.).
    """
    from ..metrics import ood_metrics
    from .search import SearchResult, fingerprint

    grid = [float(e) for e in eps_grid]
    if not grid or min(grid) < 0 or m < 1:
        raise ValueError(f"tune_mahalanobis_layers: needs a non-empty grid of eps >= 0 and m >= 1, got {grid}, m={m}")
    x_val, y_val = _first_rows(val_inputs, val_labels, 2 * m)
    if device is not None:
        x_val = x_val.to(device)
    scorer = MahalanobisLayers(layers=layers, regularization=regularization, dtype=dtype)
    scorer.fit(inputs=fit_inputs, labels=fit_labels, model=model, device=device, batch_size=batch_size)
    (x_reg, adv_reg), (x_sel, adv_sel) = [
        (x, adversarial_inputs(model, x, y, noise, clamp, loss=loss, batch_size=batch_size))
        for x, y in ((x_val[:m], y_val[:m]), (x_val[m:], y_val[m:]))
    ]
    rows, best = [], None
    for e in grid:
        s = scorer.replace(eps=e).fit_regression(model, x_reg, adv_reg, batch_size=batch_size)
        ids, oods = (
            [s.score(inputs=x, model=model).cpu() for x, _ in _batches(d, batch_size)] for d in (x_sel, adv_sel)
        )
        res = ood_metrics(torch.cat(ids), torch.cat(oods))
        rows.append({"params": {"eps": e}, "value": res.fpr_at_tpr, "metrics": {"fgsm": res.as_dict()}})
        if best is None or res.fpr_at_tpr < best[0]:
            best = (res.fpr_at_tpr, e, s)
    return SearchResult(best[2], {"eps": best[1]}, "fpr95", best[0], rows, {"id": fingerprint(x_val)})
