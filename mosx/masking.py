"""Learned weight masks (UMAP, the pruning variant of Unleashing Mask): the masked-weight op
(``masked_weight``, ``keep_count``) and the layers built on it (``MaskedConv2d``, ``MaskedLinear``,
the ``WeightMask`` parametrization; ``apply_masks`` / ``fold_masks`` swap a model's conv and linear
layers to masked ones and back, ``masked_layers`` / ``mask_scores`` list them). The UM procedures
(flooding, the flood level, sample gates) live in mosx.unleash, which imports this module.

``masked_weight(weight, scores, keep)`` returns ``where(mask, weight, 0)`` where ``mask`` keeps the
``k = clamp(round(keep * n), 1, n)`` entries of the layer (``n = weight.numel()``) with the largest
``|scores|``. Rules, identical on CPU and CUDA:

* |score| is ranked by value; NaN ranks above +inf. Ties are broken by the flat row-major index of
  the logical shape: among equal |score| the lower index is kept, so exactly k entries are kept.
  ``round`` rounds halves up.
* The threshold is found by one k-th value selection on the device (no sort, no host sync).
* Backward is straight-through, as in edge-popup where the mask is computed from ``scores.abs()``:
  ``grad_scores = grad * weight * sign(scores)`` (sign(0) = 0; the sign is the derivative of the
  |.| that the ranking applies), for every entry, kept or not, so pruned weights can come back;
  ``grad_weight = where(mask, grad, 0)``. A score that is exactly 0 gets no gradient (as with
  edge-popup's autograd through ``abs``): initialise scores away from 0 (apply_masks's
  "magnitude" init gives 0 to weights that are exactly 0, e.g. a zero-initialised head).

The numerical derivative w.r.t. the scores is zero almost everywhere (the mask is piecewise
constant), so only the weight path can be checked with finite differences; the score path is the
gradient of the surrogate ``sum(grad * weight * |scores|)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import _C  # noqa: F401  (loads the op library and registers torch.ops.mosx.*)
from ._dtypes import FLOAT_DTYPES
from .ops import _fake_devices

__all__ = [
    "masked_weight",
    "keep_count",
    "MaskedConv2d",
    "MaskedLinear",
    "WeightMask",
    "apply_masks",
    "fold_masks",
    "mask_scores",
    "masked_layers",
    "LayerSelector",
]

_ops = torch.ops.mosx

LayerSelector = Union[None, Sequence[str], Callable[[str, nn.Module], bool]]


def keep_count(numel: int, keep: float) -> int:
    """How many of `numel` entries a mask with keep fraction `keep` keeps (the op's rule)."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.floor(keep * numel + 0.5)))


def _check_keep(keep, fn):
    keep = float(keep)
    if not (math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise ValueError(f"{fn}: keep must be a fraction in (0, 1], got {keep}")
    return keep


# ------------------------------------------------------------------------------ fake kernels
@torch.library.register_fake("mosx::masked_weight")
def _(weight, scores, keep):
    _fake_devices("masked_weight", weight, "weight", scores=scores)
    return (
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(weight, dtype=torch.bool, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("mosx::masked_weight_backward")
def _(grad, weight, scores, mask, scores_grad, weight_grad):
    _fake_devices("masked_weight_backward", weight, "weight", grad=grad, scores=scores, mask=mask)
    return [
        torch.empty_like(weight, memory_format=torch.contiguous_format)
        for wanted in (scores_grad, weight_grad)
        if wanted
    ]


# ------------------------------------------------------------------------------ autograd
def _setup(ctx, inputs, output):
    weight, scores, _keep = inputs
    _, mask = output
    ctx.mark_non_differentiable(mask)
    ctx.save_for_backward(weight, scores, mask)


def _backward(ctx, grad, _grad_mask):
    weight, scores, mask = ctx.saved_tensors
    need_w, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_w or need_s):
        return None, None, None
    grads = _ops.masked_weight_backward(grad.contiguous(), weight, scores, mask, need_s, need_w)
    grad_s = grads.pop(0) if need_s else None
    grad_w = grads.pop(0) if need_w else None
    return grad_w, grad_s, None


torch.library.register_autograd("mosx::masked_weight", _backward, setup_context=_setup)


# ------------------------------------------------------------------------------ public API
def masked_weight(weight: torch.Tensor, scores: torch.Tensor, keep: float, *, return_mask: bool = False):
    """``where(mask, weight, 0)`` with mask = the top `keep` fraction of ``|scores|`` in the layer.

    weight, scores: tensors of the same shape, dtype (float64/32/16/bfloat16) and device.
    keep: fraction in (0, 1]. Differentiable w.r.t. both (straight-through for the scores; see the
    module docstring). With return_mask=True returns (w_eff, mask bool).
    """
    for name, t in (("weight", weight), ("scores", scores)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"masked_weight: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"masked_weight: {name} must be float64/float32/float16/bfloat16, got {t.dtype}")
    if scores.dtype != weight.dtype:
        raise TypeError(f"masked_weight: scores ({scores.dtype}) must have the weight's dtype ({weight.dtype})")
    if scores.shape != weight.shape:
        raise ValueError(
            f"masked_weight: scores have shape {tuple(scores.shape)} but the weight has "
            f"shape {tuple(weight.shape)}; they must match"
        )
    if scores.device != weight.device:
        raise ValueError(f"masked_weight: scores are on {scores.device} but the weight is on {weight.device}")
    keep = _check_keep(keep, "masked_weight")
    w_eff, mask = _ops.masked_weight(weight, scores, keep)
    return (w_eff, mask) if return_mask else w_eff


# ------------------------------------------------------------------------------ layer selection
def _is_maskable(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(
        getattr(module, "weight", None), (nn.Parameter, torch.Tensor)
    )


def select_layers(model: nn.Module, layers: LayerSelector, fn: str):
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


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The stored (unmasked) weight parameter of a plain, masked or parametrized layer."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


# ------------------------------------------------------------------------------ UMAP layers
def _init_scores(weight: torch.Tensor, score_init: str, generator: torch.Generator | None) -> torch.Tensor:
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


class _MaskedMixin:
    """Shared by MaskedConv2d / MaskedLinear: a `scores` parameter of the weight's shape and the
    keep fraction; the forward uses mosx.masked_weight(weight, scores, keep)."""

    keep: float
    scores: nn.Parameter

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        keep: float = 0.8,
        *,
        train_weights: bool = False,
        score_init: str = "magnitude",
        generator: torch.Generator | None = None,
    ):
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

    def __init__(self, *args, keep: float = 0.8, train_weights: bool = False, score_init: str = "magnitude", **kwargs):
        super().__init__(*args, **kwargs)
        self._unmasked_cls = nn.Conv2d
        self.keep = _check_keep(keep, "MaskedConv2d")
        self.scores = nn.Parameter(_init_scores(self.weight, score_init, None))
        _freeze(self, train_weights)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.masked_weight(), self.bias)


class MaskedLinear(_MaskedMixin, nn.Linear):
    """nn.Linear whose weight is masked by the top `keep` fraction of |scores| (UMAP)."""

    def __init__(self, *args, keep: float = 0.8, train_weights: bool = False, score_init: str = "magnitude", **kwargs):
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

    def __init__(
        self,
        weight: torch.Tensor,
        keep: float = 0.8,
        score_init: str = "magnitude",
        generator: torch.Generator | None = None,
    ):
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
            same = t.forward is base.forward and getattr(t, "_conv_forward", None) is getattr(
                base, "_conv_forward", None
            )
            return masked if same else None
    return None


def _is_masked(module: nn.Module) -> bool:
    return isinstance(module, _MaskedMixin) or (
        parametrize.is_parametrized(module, "weight")
        and any(isinstance(p, WeightMask) for p in module.parametrizations.weight)
    )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_masks(
    model: nn.Module,
    keep: float = 0.8,
    layers: LayerSelector = None,
    *,
    train_weights: bool = False,
    score_init: str = "magnitude",
    seed: int | None = None,
) -> list:
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
    for name, module in select_layers(model, layers, "apply_masks"):
        if _is_masked(module):
            continue
        if name == "":
            raise ValueError(
                "apply_masks: the model itself is a single layer; wrap it in a container "
                "or use MaskedConv2d.from_module / MaskedLinear.from_module"
            )
        cls = _swap_class(module)
        if cls is not None:
            _set_submodule(
                model,
                name,
                cls.from_module(module, keep, train_weights=train_weights, score_init=score_init, generator=gen),
            )
        else:
            parametrize.register_parametrization(
                module, "weight", WeightMask(module.weight, keep, score_init, gen), unsafe=True
            )
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
                    (k, v) for k, v in module._parameters.items() if k != "scores"
                )
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
