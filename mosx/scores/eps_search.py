"""The input-perturbation search: :func:`select_eps` picks ODIN's / Mahalanobis' eps on validation
data from a grid (:data:`ODIN_EPS_GRID` by default), as those papers do."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .base import Scorer
from .model import _model_logits, model_outputs

# The perturbation magnitudes searched by the ODIN / Mahalanobis reference code.
ODIN_EPS_GRID = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005, 0.01, 0.05, 0.1, 0.2)


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
    from ..metrics import ood_metrics

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
