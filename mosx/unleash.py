"""Unleashing Mask (Zhu et al., ICML 2023): the building blocks of UM and UMAP fine-tuning.

* ``flood(loss, b)``: the flooding objective ``|loss - b| + b``. Below b its gradient is the
  negated gradient of the loss (gradient ascent), above b it is the loss's own gradient.
* ``estimate_flood_level(model, loader, loss_fn, keep=0.965)``: b as the released method estimates
  it: the mean training loss of the model under a random weight mask that keeps a fraction `keep`
  of every masked layer's weights, in eval mode, without gradients. The weights are restored bit
  for bit afterwards.
* ``random_weight_masks``, ``randomly_masked``: the random weight masks the estimate uses.
* ``apply_masks(model, keep=0.8)``: UMAP's learned masks. Swaps a model's conv and linear layers
  for masked ones in one call (``MaskedConv2d``, ``MaskedLinear``; other conv/linear subclasses
  with their own forward, e.g. timm's weight-standardised ``StdConv2d``, get the same mask as a
  weight parametrization), each with a score tensor of the weight's shape trained straight-through
  by ``mosx.masked_weight``. ``fold_masks(model)`` turns them back into plain layers holding
  ``where(mask, w, 0)`` for deployment. These layers live in mosx.masking (this module imports
  it, never the other way round) and are re-exported here.
* ``gate_samples(losses, drop=, reverse=)``: a per-sample gate for research: drop samples (value
  and gradient 0) or reverse their gradient (value kept); ``changed_samples`` picks the samples a
  weight mask changes most.

The flooding level works for any loss: with the grouped loss (``mosx.group_cross_entropy``,
reduction "mean") b is in the units of the summed group loss, the sum over groups of batch means.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

# UMAP's layers (and the op) live in mosx.masking; re-exported here, where they were always importable
from .masking import (  # noqa: F401
    LayerSelector,
    MaskedConv2d,
    MaskedLinear,
    WeightMask,
    apply_masks,
    dense_weight,
    fold_masks,
    keep_count,
    mask_scores,
    masked_layers,
    masked_weight,
    select_layers,
)

__all__ = [
    "flood",
    "estimate_flood_level",
    "random_weight_masks",
    "randomly_masked",
    "changed_samples",
    "MaskedConv2d",
    "MaskedLinear",
    "WeightMask",
    "apply_masks",
    "fold_masks",
    "mask_scores",
    "masked_layers",
    "gate_samples",
]


# ------------------------------------------------------------------------------ flooding
def flood(loss: torch.Tensor, b: float | torch.Tensor) -> torch.Tensor:
    """Flooding: ``|loss - b| + b``. Same value as the loss when loss >= b; below b the
    gradient flips sign, so the optimiser pushes the loss back up towards b."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"flood: loss must be a tensor, got {type(loss).__name__}")
    if not isinstance(b, torch.Tensor):
        b = float(b)
        if not math.isfinite(b):
            raise ValueError(f"flood: the flood level b must be a finite number, got {b}")
    return (loss - b).abs() + b


# ------------------------------------------------------------------------------ flood level
def random_weight_masks(model: nn.Module, keep: float = 0.965, *, seed: int = 0, layers: LayerSelector = None) -> dict:
    """{layer name: bool mask} keeping exactly keep_count(n, keep) weights of each chosen layer,
    chosen uniformly at random (CPU generator seeded with `seed`, so the masks do not depend on
    the device). Layers are visited in `model.named_modules()` order."""
    if not (math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise ValueError(f"random_weight_masks: keep must be a fraction in (0, 1], got {keep}")
    gen = torch.Generator().manual_seed(int(seed))
    masks = {}
    for name, module in select_layers(model, layers, "random_weight_masks"):
        w = dense_weight(module)
        n = w.numel()
        drop = torch.randperm(n, generator=gen)[: n - keep_count(n, keep)]
        mask = torch.ones(n, dtype=torch.bool)
        mask[drop] = False
        masks[name] = mask.view(w.shape)
    return masks


def _batch_parts(batch):
    if isinstance(batch, dict):
        return batch["input"], batch["target"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError("estimate_flood_level: batches must be (inputs, targets, ...) or {'input': ..., 'target': ...}")


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


@contextlib.contextmanager
def randomly_masked(model: nn.Module, keep: float = 0.965, *, seed: int = 0, layers: LayerSelector = None):
    """Context manager: inside, the chosen layers' weights are multiplied by
    random_weight_masks(model, keep, seed, layers) (yielded); on exit every weight is restored bit
    for bit, also after an exception."""
    masks = random_weight_masks(model, keep, seed=seed, layers=layers)
    modules = dict(model.named_modules())
    weights = [dense_weight(modules[name]) for name in masks]
    saved = [w.detach().clone() for w in weights]
    try:
        with torch.no_grad():
            for w, mask in zip(weights, masks.values()):
                w.masked_fill_(~mask.to(w.device), 0)
        yield masks
    finally:
        with torch.no_grad():
            for w, orig in zip(weights, saved):
                w.copy_(orig)


def estimate_flood_level(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable,
    keep: float = 0.965,
    *,
    seed: int = 0,
    layers: LayerSelector = None,
    max_batches: int | None = None,
    device=None,
) -> float:
    """The UM flood level b: mean training loss of `model` under a random weight mask.

    Every chosen conv/linear layer (default: all) keeps a random `keep` fraction of its weights
    (exactly keep_count(n, keep) of n, see `random_weight_masks`); the model runs in eval mode
    without gradients over `loader` (batches (inputs, targets, ...)), at most `max_batches`
    batches. loss_fn(outputs, targets) returns a batch-mean loss (weighted by the batch size) or
    per-sample losses [N]; b is the mean over all samples. Weights and train/eval modes are
    restored exactly afterwards, also when an exception interrupts the loop.
    """
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        with randomly_masked(model, keep, seed=seed, layers=layers), torch.no_grad():
            model.eval()
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = _batch_parts(batch)
                x, y = _to(x, device), _to(y, device)
                loss = loss_fn(model(x), y)
                if loss.dim() == 0:
                    n = len(y) if isinstance(y, torch.Tensor) else len(x)
                    total += loss.double() * n
                elif loss.dim() == 1:
                    n = loss.numel()
                    total += loss.double().sum()
                else:
                    raise ValueError(
                        f"estimate_flood_level: loss_fn must return a scalar or [N] "
                        f"per-sample losses, got shape {tuple(loss.shape)}"
                    )
                count += n
    finally:
        for m, mode in modes.items():
            m.training = mode
    if count == 0:
        raise ValueError("estimate_flood_level: the loader yielded no samples")
    return float(total / count)  # the one host sync


# ------------------------------------------------------------------------------ per-sample gate
def gate_samples(
    losses: torch.Tensor, drop: torch.Tensor | None = None, reverse: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample loss gate for research on UM variants.

    losses: [N] per-sample losses. drop / reverse: [N] bool masks (or index tensors) of samples.
    Dropped samples get value 0 and no gradient; reversed samples keep their value but their
    gradient is negated (gradient ascent on them). A sample may not be in both. Reduce the result
    as you like (e.g. .mean(), then flood()).
    """
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
        raise ValueError(
            f"gate_samples: losses must be a 1-D [N] tensor of per-sample losses, got "
            f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}"
        )
    n = losses.shape[0]

    def as_mask(sel, what):
        if sel is None:
            return torch.zeros(n, dtype=torch.bool, device=losses.device)
        sel = torch.as_tensor(sel, device=losses.device)
        if sel.dtype == torch.bool:
            if sel.shape != (n,):
                raise ValueError(f"gate_samples: {what} mask has shape {tuple(sel.shape)}, expected ({n},)")
            return sel
        if sel.is_floating_point():
            raise TypeError(f"gate_samples: {what} must be a bool mask or integer indices, got {sel.dtype}")
        m = torch.zeros(n, dtype=torch.bool, device=losses.device)
        m[sel.long()] = True
        return m

    d, r = as_mask(drop, "drop"), as_mask(reverse, "reverse")
    if bool((d & r).any()):
        raise ValueError("gate_samples: a sample cannot be both dropped and reversed")
    flipped = torch.where(r, 2 * losses.detach() - losses, losses)  # value kept, gradient negated
    return torch.where(d, torch.zeros_like(losses), flipped)


def changed_samples(logits: torch.Tensor, masked_logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """[N] bool: the `fraction` of samples whose softmax prediction moves most under a weight mask,
    by KL(p || p_masked) (ties to the lower index). The per-sample UM variant of the authors'
    history drops these (gate_samples(losses, drop=...)); it was never run in the paper. Compute
    masked_logits inside `randomly_masked(model, keep)`."""
    if logits.shape != masked_logits.shape or logits.dim() != 2:
        raise ValueError(
            f"changed_samples: logits {tuple(logits.shape)} and masked_logits "
            f"{tuple(masked_logits.shape)} must be the same [N, C] shape"
        )
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"changed_samples: fraction must be in [0, 1], got {fraction}")
    logp = torch.log_softmax(logits.detach().float(), 1)
    logq = torch.log_softmax(masked_logits.detach().float(), 1)
    kl = (logp.exp() * (logp - logq)).sum(1)
    n = kl.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool, device=kl.device)
    chosen[torch.sort(kl, descending=True, stable=True).indices[: round(fraction * n)]] = True
    return chosen
