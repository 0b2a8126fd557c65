"""Unleashing Mask (Zhu et al., ICML 2023): the building blocks of UM and UMAP fine-tuning.

* ``flood(loss, b)``: the flooding objective ``|loss - b| + b``. Below b its gradient is the
  negated gradient of the loss (gradient ascent), above b it is the loss's own gradient.
* ``estimate_flood_level(model, loader, loss_fn, keep=0.965)``: b as the released method estimates
  it: the mean training loss of the model under a random weight mask that keeps a fraction `keep`
  of every masked layer's weights, in eval mode, without gradients. The weights are restored bit
  for bit afterwards.
* ``apply_masks(model, keep=0.8)``: UMAP's learned masks. Swaps a model's conv and linear layers
  for masked ones in one call (``MaskedConv2d``, ``MaskedLinear``; other conv/linear subclasses
  with their own forward, e.g. timm's weight-standardised ``StdConv2d``, get the same mask as a
  weight parametrization), each with a score tensor of the weight's shape trained straight-through
  by ``mosx.masked_weight``. ``fold_masks(model)`` turns them back into plain layers holding
  ``where(mask, w, 0)`` for deployment.
* ``gate_samples(losses, drop=, reverse=)``: a per-sample gate for research: drop samples (value
  and gradient 0) or reverse their gradient (value kept).

The flooding level works for any loss: with the grouped loss (``mosx.group_cross_entropy``,
reduction "mean") b is in the units of the summed group loss, the sum over groups of batch means.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from .masking import keep_count, masked_weight

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

LayerSelector = Union[None, Sequence[str], Callable[[str, nn.Module], bool]]


# ------------------------------------------------------------------------------ flooding
def flood(loss: torch.Tensor, b: Union[float, torch.Tensor]) -> torch.Tensor:
    """Flooding: ``|loss - b| + b``. Same value as the loss when loss >= b; below b the
    gradient flips sign, so the optimiser pushes the loss back up towards b."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"flood: loss must be a tensor, got {type(loss).__name__}")
    if not isinstance(b, torch.Tensor):
        b = float(b)
        if not math.isfinite(b):
            raise ValueError(f"flood: the flood level b must be a finite number, got {b}")
    return (loss - b).abs() + b


# ------------------------------------------------------------------------------ layer selection
def _is_maskable(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(
        getattr(module, "weight", None), (nn.Parameter, torch.Tensor))


def _select(model: nn.Module, layers: LayerSelector, fn: str):
    """(name, module) of the conv/linear layers chosen by `layers` (None: all of them; a list of
    qualified module names; or a predicate (name, module) -> bool)."""
    if layers is None:
        return [(n, m) for n, m in model.named_modules() if _is_maskable(m)]
    if callable(layers):
        return [(n, m) for n, m in model.named_modules() if _is_maskable(m) and layers(n, m)]
    if isinstance(layers, str):
        layers = [layers]
    modules = dict(model.named_modules())
    chosen = []
    for name in layers:
        if name not in modules:
            raise ValueError(f"{fn}: the model has no module named {name!r}")
        if not _is_maskable(modules[name]):
            raise ValueError(f"{fn}: {name!r} is a {type(modules[name]).__name__}, not a conv or linear layer")
        chosen.append((name, modules[name]))
    return chosen


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The stored (unmasked) weight parameter of a plain, masked or parametrized layer."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


# ------------------------------------------------------------------------------ flood level
def random_weight_masks(model: nn.Module, keep: float = 0.965, *, seed: int = 0,
                        layers: LayerSelector = None) -> dict:
    """{layer name: bool mask} keeping exactly keep_count(n, keep) weights of each chosen layer,
    chosen uniformly at random (CPU generator seeded with `seed`, so the masks do not depend on
    the device). Layers are visited in `model.named_modules()` order."""
    if not (math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise ValueError(f"random_weight_masks: keep must be a fraction in (0, 1], got {keep}")
    gen = torch.Generator().manual_seed(int(seed))
    masks = {}
    for name, module in _select(model, layers, "random_weight_masks"):
        w = _dense_weight(module)
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
    raise TypeError("estimate_flood_level: batches must be (inputs, targets, ...) or "
                    "{'input': ..., 'target': ...}")


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


@contextlib.contextmanager
def randomly_masked(model: nn.Module, keep: float = 0.965, *, seed: int = 0,
                    layers: LayerSelector = None):
    """Context manager: inside, the chosen layers' weights are multiplied by
    random_weight_masks(model, keep, seed, layers) (yielded); on exit every weight is restored bit
    for bit, also after an exception."""
    masks = random_weight_masks(model, keep, seed=seed, layers=layers)
    modules = dict(model.named_modules())
    weights = [_dense_weight(modules[name]) for name in masks]
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


def estimate_flood_level(model: nn.Module, loader: Iterable, loss_fn: Callable, keep: float = 0.965,
                         *, seed: int = 0, layers: LayerSelector = None,
                         max_batches: Optional[int] = None, device=None) -> float:
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
                    raise ValueError(f"estimate_flood_level: loss_fn must return a scalar or [N] "
                                     f"per-sample losses, got shape {tuple(loss.shape)}")
                count += n
    finally:
        for m, mode in modes.items():
            m.training = mode
    if count == 0:
        raise ValueError("estimate_flood_level: the loader yielded no samples")
    return float(total / count)  # the one host sync


# ------------------------------------------------------------------------------ UMAP layers
def _init_scores(weight: torch.Tensor, score_init: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    w = weight.detach()
    if score_init == "magnitude":
        # |w|: the initial mask is magnitude pruning of the trained weights. Weights that are
        # exactly 0 (a zero-initialised head) get small random scores below every nonzero |w|:
        # a zero score would get no straight-through gradient and never move.
        s = w.abs().clone()
        zero = s == 0
        if bool(zero.any()):
            nonzero = s[~zero]
            if nonzero.numel():
                top = float(nonzero.min()) * 0.5
            else:
                top = 1.0 / math.sqrt(w[0].numel() if w.dim() > 1 else max(w.numel(), 1))
            r = torch.rand(w.shape, generator=generator, dtype=torch.float32).to(device=w.device, dtype=w.dtype)
            s = torch.where(zero, (0.5 + 0.5 * r) * top, s)
        return s
    if score_init == "kaiming_uniform":
        # edge-popup's initialisation (bound of nn.init.kaiming_uniform_ with a = sqrt(5)).
        fan_in = w[0].numel() if w.dim() > 1 else w.numel()
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        s = torch.rand(w.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
        return s.to(device=w.device, dtype=w.dtype)
    raise ValueError(f"apply_masks: score_init must be 'magnitude' or 'kaiming_uniform', got {score_init!r}")


def _check_keep(keep, fn):
    keep = float(keep)
    if not (math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise ValueError(f"{fn}: keep must be a fraction in (0, 1], got {keep}")
    return keep


class _MaskedMixin:
    """Shared by MaskedConv2d / MaskedLinear: a `scores` parameter of the weight's shape and the
    keep fraction; the forward uses mosx.masked_weight(weight, scores, keep)."""

    keep: float
    scores: nn.Parameter

    @classmethod
    def from_module(cls, module: nn.Module, keep: float = 0.8, *, train_weights: bool = False,
                    score_init: str = "magnitude", generator: Optional[torch.Generator] = None):
        """Masked layer sharing `module`'s parameters, buffers, hooks and settings."""
        keep = _check_keep(keep, "apply_masks")
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new._parameters = type(module._parameters)(module._parameters)
        new._buffers = type(module._buffers)(module._buffers)
        new._modules = type(module._modules)(module._modules)
        new._unmasked_cls = type(module)
        new.keep = keep
        new.scores = nn.Parameter(_init_scores(module.weight, score_init, generator))
        _freeze(new, train_weights)
        return new

    def masked_weight(self) -> torch.Tensor:
        return masked_weight(self.weight, self.scores, self.keep)

    def mask(self) -> torch.Tensor:
        with torch.no_grad():
            return masked_weight(self.weight, self.scores, self.keep, return_mask=True)[1]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", keep={self.keep}"


def _freeze(module: nn.Module, train_weights: bool) -> None:
    # Frozen weights (the UMAP CIFAR-10 setting) freeze the layer's bias as well. Training them
    # leaves requires_grad as it was: a layer frozen before (e.g. a frozen backbone) stays frozen.
    if train_weights:
        return
    for name in ("weight", "bias"):
        p = module._parameters.get(name)
        if p is not None:
            p.requires_grad_(False)


class MaskedConv2d(_MaskedMixin, nn.Conv2d):
    """nn.Conv2d whose weight is masked by the top `keep` fraction of |scores| (UMAP)."""

    def __init__(self, *args, keep: float = 0.8, train_weights: bool = False,
                 score_init: str = "magnitude", **kwargs):
        super().__init__(*args, **kwargs)
        self._unmasked_cls = nn.Conv2d
        self.keep = _check_keep(keep, "MaskedConv2d")
        self.scores = nn.Parameter(_init_scores(self.weight, score_init, None))
        _freeze(self, train_weights)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.masked_weight(), self.bias)


class MaskedLinear(_MaskedMixin, nn.Linear):
    """nn.Linear whose weight is masked by the top `keep` fraction of |scores| (UMAP)."""

    def __init__(self, *args, keep: float = 0.8, train_weights: bool = False,
                 score_init: str = "magnitude", **kwargs):
        super().__init__(*args, **kwargs)
        self._unmasked_cls = nn.Linear
        self.keep = _check_keep(keep, "MaskedLinear")
        self.scores = nn.Parameter(_init_scores(self.weight, score_init, None))
        _freeze(self, train_weights)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(input, self.masked_weight(), self.bias)


class WeightMask(nn.Module):
    """The same learned mask as a weight parametrization, for layers whose class has its own
    forward (e.g. weight-standardised convs): module.weight becomes masked_weight(w, scores)."""

    def __init__(self, weight: torch.Tensor, keep: float = 0.8, score_init: str = "magnitude",
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.keep = _check_keep(keep, "WeightMask")
        self.scores = nn.Parameter(_init_scores(weight, score_init, generator))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return masked_weight(weight, self.scores, self.keep)

    def extra_repr(self) -> str:
        return f"keep={self.keep}"


def _swap_class(module: nn.Module):
    """The masked class that can replace `module` without changing its forward, or None."""
    for base, masked in ((nn.Conv2d, MaskedConv2d), (nn.Linear, MaskedLinear)):
        if isinstance(module, base):
            t = type(module)
            same = t.forward is base.forward and getattr(t, "_conv_forward", None) is getattr(base, "_conv_forward", None)
            return masked if same else None
    return None


def _is_masked(module: nn.Module) -> bool:
    return isinstance(module, _MaskedMixin) or (
        parametrize.is_parametrized(module, "weight")
        and any(isinstance(p, WeightMask) for p in module.parametrizations.weight))


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_masks(model: nn.Module, keep: float = 0.8, layers: LayerSelector = None, *,
                train_weights: bool = False, score_init: str = "magnitude",
                seed: Optional[int] = None) -> list:
    """Give every chosen conv/linear layer a learned UMAP mask, in place; returns their names.

    layers: None (every conv and linear layer), qualified module names, or a predicate
    (name, module) -> bool. nn.Conv2d / nn.Linear (and subclasses that keep their forward) become
    MaskedConv2d / MaskedLinear sharing the original parameters; other conv/linear classes get a
    WeightMask parametrization. train_weights=False freezes the masked layers' weights and
    biases (only the scores train); True leaves their requires_grad as it was. Other parameters
    are left as they are. score_init: "magnitude" (|w|, the
    initial mask is magnitude pruning; exact zeros get small random scores below every nonzero
    |w|) or "kaiming_uniform" (edge-popup's; drawn from a CPU
    generator seeded with `seed`). Layers already masked are skipped.
    """
    keep = _check_keep(keep, "apply_masks")
    if model is None or not isinstance(model, nn.Module):
        raise TypeError(f"apply_masks: model must be an nn.Module, got {type(model).__name__}")
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    names = []
    for name, module in _select(model, layers, "apply_masks"):
        if _is_masked(module):
            continue
        if name == "":
            raise ValueError("apply_masks: the model itself is a single layer; wrap it in a container "
                             "or use MaskedConv2d.from_module / MaskedLinear.from_module")
        cls = _swap_class(module)
        if cls is not None:
            _set_submodule(model, name, cls.from_module(module, keep, train_weights=train_weights,
                                                          score_init=score_init, generator=gen))
        else:
            parametrize.register_parametrization(
                module, "weight", WeightMask(module.weight, keep, score_init, gen), unsafe=True)
            _freeze_parametrized(module, train_weights)
        names.append(name)
    return names


def _freeze_parametrized(module: nn.Module, train_weights: bool) -> None:
    if train_weights:
        return
    module.parametrizations.weight.original.requires_grad_(False)
    if isinstance(getattr(module, "bias", None), nn.Parameter):
        module.bias.requires_grad_(False)


def masked_layers(model: nn.Module) -> list:
    """(name, module) of every layer carrying a learned mask."""
    return [(n, m) for n, m in model.named_modules() if _is_masked(m)]


def mask_scores(model: nn.Module) -> list:
    """The score parameters of all masked layers (what the UMAP optimiser trains)."""
    out = []
    for _, m in masked_layers(model):
        if isinstance(m, _MaskedMixin):
            out.append(m.scores)
        else:
            out.extend(p.scores for p in m.parametrizations.weight if isinstance(p, WeightMask))
    return out


def fold_masks(model: nn.Module) -> list:
    """Turn every masked layer back into a plain layer holding where(mask, w, 0), in place.

    MaskedConv2d / MaskedLinear become the class they were made from (the weight Parameter object
    is kept, its values replaced); parametrized layers lose the parametrization. The weights'
    requires_grad is left as it was. Returns the names of the folded layers.
    """
    names = []
    for name, module in masked_layers(model):
        with torch.no_grad():
            if isinstance(module, _MaskedMixin):
                folded = module.masked_weight().detach()
                cls = module._unmasked_cls
                plain = cls.__new__(cls)
                plain.__dict__.update(module.__dict__)
                for attr in ("keep", "_unmasked_cls"):
                    plain.__dict__.pop(attr, None)
                plain._parameters = type(module._parameters)(
                    (k, v) for k, v in module._parameters.items() if k != "scores")
                plain.weight.copy_(folded)
                if name == "":
                    raise ValueError("fold_masks: the model itself is a masked layer; fold its parent")
                _set_submodule(model, name, plain)
            else:
                _unparametrize_weight(module)
        names.append(name)
    return names


def _unparametrize_weight(module: nn.Module) -> None:
    """Fold a WeightMask parametrization into the stored weight.

    torch's remove_parametrizations deletes the weight property from the module's generated class,
    which deep copies of the module share (copy.deepcopy keeps the class), so folding a copy would
    break the original. When the weight's mask is the module's only parametrization, undo it by
    hand instead: restore the base class and re-register the original Parameter."""
    plist = module.parametrizations.weight
    only_mask = len(module.parametrizations) == 1 and len(plist) == 1 and isinstance(plist[0], WeightMask)
    if not only_mask:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return
    folded = module.weight.detach()
    original = plist.original
    original.copy_(folded)
    base = type(module).__bases__[0]
    del module._modules["parametrizations"]
    module.__class__ = base
    rest = list(module._parameters.items())  # weight first again, as in the plain layer
    module._parameters = type(module._parameters)([("weight", original)] + rest)


# ------------------------------------------------------------------------------ per-sample gate
def gate_samples(losses: torch.Tensor, drop: Optional[torch.Tensor] = None,
                 reverse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample loss gate for research on UM variants.

    losses: [N] per-sample losses. drop / reverse: [N] bool masks (or index tensors) of samples.
    Dropped samples get value 0 and no gradient; reversed samples keep their value but their
    gradient is negated (gradient ascent on them). A sample may not be in both. Reduce the result
    as you like (e.g. .mean(), then flood()).
    """
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
        raise ValueError(f"gate_samples: losses must be a 1-D [N] tensor of per-sample losses, got "
                         f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}")
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
        raise ValueError(f"changed_samples: logits {tuple(logits.shape)} and masked_logits "
                         f"{tuple(masked_logits.shape)} must be the same [N, C] shape")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"changed_samples: fraction must be in [0, 1], got {fraction}")
    logp = torch.log_softmax(logits.detach().float(), 1)
    logq = torch.log_softmax(masked_logits.detach().float(), 1)
    kl = (logp.exp() * (logp - logq)).sum(1)
    n = kl.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool, device=kl.device)
    chosen[torch.sort(kl, descending=True, stable=True).indices[: round(fraction * n)]] = True
    return chosen
