"""Learned weight masks (UMAP, the pruning variant of Unleashing Mask): the masked-weight op.

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
  edge-popup's autograd through ``abs``): initialise scores away from 0 (mosx.unleash's
  "magnitude" init gives 0 to weights that are exactly 0, e.g. a zero-initialised head).

The numerical derivative w.r.t. the scores is zero almost everywhere (the mask is piecewise
constant), so only the weight path can be checked with finite differences; the score path is the
gradient of the surrogate ``sum(grad * weight * |scores|)``.
"""

from __future__ import annotations

import math

import torch

from . import _C  # noqa: F401  (loads the op library and registers torch.ops.mosx.*)

__all__ = ["masked_weight", "keep_count"]

_ops = torch.ops.mosx
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def keep_count(numel: int, keep: float) -> int:
    """How many of `numel` entries a mask with keep fraction `keep` keeps (the op's rule)."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.floor(keep * numel + 0.5)))


# ------------------------------------------------------------------------------ fake kernels
@torch.library.register_fake("mosx::masked_weight")
def _(weight, scores, keep):
    return (torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(weight, dtype=torch.bool, memory_format=torch.contiguous_format))


@torch.library.register_fake("mosx::masked_weight_backward")
def _(grad, weight, scores, mask, scores_grad, weight_grad):
    return [torch.empty_like(weight, memory_format=torch.contiguous_format)
            for wanted in (scores_grad, weight_grad) if wanted]


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
        if t.dtype not in _FLOATS:
            raise TypeError(f"masked_weight: {name} must be float64/float32/float16/bfloat16, got {t.dtype}")
    if scores.dtype != weight.dtype:
        raise TypeError(f"masked_weight: scores ({scores.dtype}) must have the weight's dtype ({weight.dtype})")
    if scores.shape != weight.shape:
        raise ValueError(f"masked_weight: scores have shape {tuple(scores.shape)} but the weight has "
                         f"shape {tuple(weight.shape)}; they must match")
    if scores.device != weight.device:
        raise ValueError(f"masked_weight: scores are on {scores.device} but the weight is on {weight.device}")
    keep = float(keep)
    if not (math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise ValueError(f"masked_weight: keep must be a fraction in (0, 1], got {keep}")
    w_eff, mask = _ops.masked_weight(weight, scores, keep)
    return (w_eff, mask) if return_mask else w_eff


# The layer-level API lives in mosx.unleash (it imports this module); reachable from here too.
_UNLEASH_NAMES = ("apply_masks", "fold_masks", "mask_scores", "masked_layers", "MaskedConv2d",
                  "MaskedLinear", "WeightMask")


def __getattr__(name):
    if name in _UNLEASH_NAMES:
        from . import unleash

        return getattr(unleash, name)
    raise AttributeError(f"module 'mosx.masking' has no attribute {name!r}")
