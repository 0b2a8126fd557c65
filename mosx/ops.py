"""The fused group-softmax ops: Python API over torch.ops.mosx, with autograd and fake kernels.

Every function takes `groups` as a :class:`mosx.Groups`, a sequence of group sizes, or the
reference code's [K, 2] `group_slices`, and logits as a torch tensor, a NumPy array or a CuPy
array (the result comes back as the same array type, without copies through DLPack).
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the op library and registers torch.ops.mosx.*)
from ._interop import from_array, to_array
from .groups import Groups, as_groups

__all__ = [
    "group_softmax",
    "group_log_softmax",
    "group_softmax_score",
    "group_predict",
    "group_cross_entropy",
    "cuda_built",
]

_ops = torch.ops.mosx
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def cuda_built() -> bool:
    """Whether the CUDA kernels were compiled into this build of mosx."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("mosx::group_softmax_score", "CUDA")


# ------------------------------------------------------------------------------ checks
def _check_logits(logits: torch.Tensor, groups, fn: str) -> Groups:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fn}: logits must be a tensor or array, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{fn}: logits must be 2-D [N, L], got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOATS:
        raise TypeError(f"{fn}: logits must be float64/float32/float16/bfloat16, got {logits.dtype}")
    groups = as_groups(groups, logits.shape[1], fn)  # sizes are checked against the width before building
    if logits.shape[1] != groups.num_logits:
        raise ValueError(
            f"{fn}: logits have {logits.shape[1]} columns but the groups need "
            f"{groups.num_logits} (= {groups.num_classes} classes + {groups.num_groups} others slots)"
        )
    return groups


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------ fake kernels
# Shapes and dtypes only, so the ops trace under torch.compile / FakeTensor without graph breaks.
# They also run when real tensors are mixed with meta tensors (the dispatcher picks the Meta
# kernel for the whole call): the device check keeps that from returning uninitialised memory.
def _fake_devices(op: str, first, first_name: str = "logits", **others) -> None:
    def verb(name):
        return "are" if name.endswith("s") else "is"

    for name, t in others.items():
        if t.device != first.device:
            raise RuntimeError(
                f"mosx.{op}: {name} {verb(name)} on {t.device} but {first_name} {verb(first_name)} on {first.device}"
            )


@torch.library.register_fake("mosx::group_softmax")
def _(logits, offsets, log):
    _fake_devices("group_softmax", logits, offsets=offsets)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("mosx::group_softmax_backward")
def _(grad_out, out, offsets, log):
    _fake_devices("group_softmax_backward", out, "out", offsets=offsets, grad_out=grad_out)
    return torch.empty_like(out, memory_format=torch.contiguous_format)


@torch.library.register_fake("mosx::group_softmax_score")
def _(logits, offsets):
    _fake_devices("group_softmax_score", logits, offsets=offsets)
    n, acc = logits.shape[0], _acc_dtype(logits.dtype)
    return (
        logits.new_empty((n,), dtype=acc),
        logits.new_empty((n,), dtype=torch.int64),
        logits.new_empty((n,), dtype=acc),
    )


@torch.library.register_fake("mosx::group_softmax_score_backward")
def _(grad_score, logits, offsets, min_group, min_lse):
    _fake_devices(
        "group_softmax_score_backward",
        logits,
        offsets=offsets,
        grad_score=grad_score,
        min_group=min_group,
        min_lse=min_lse,
    )
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("mosx::group_predict")
def _(logits, offsets, logit_class):
    _fake_devices("group_predict", logits, offsets=offsets, logit_class=logit_class)
    n = logits.shape[0]
    return (
        logits.new_empty((n,), dtype=torch.int64),
        logits.new_empty((n,), dtype=_acc_dtype(logits.dtype)),
        logits.new_empty((n,), dtype=torch.int64),
    )


@torch.library.register_fake("mosx::group_cross_entropy")
def _(logits, offsets, targets, class_logit, ignore_index):
    _fake_devices("group_cross_entropy", logits, offsets=offsets, targets=targets, class_logit=class_logit)
    n, k, m = logits.shape[0], offsets.shape[0] - 1, targets.shape[0]
    acc = _acc_dtype(logits.dtype)
    return logits.new_empty((m, n, k), dtype=acc), logits.new_empty((n, k), dtype=acc)


@torch.library.register_fake("mosx::group_cross_entropy_backward")
def _(grad_losses, logits, offsets, targets, class_logit, lse, ignore_index):
    _fake_devices(
        "group_cross_entropy_backward",
        logits,
        offsets=offsets,
        targets=targets,
        class_logit=class_logit,
        grad_losses=grad_losses,
        lse=lse,
    )
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------ autograd
# Each backward runs the fused backward kernel, except under create_graph=True (grad mode on in
# the backward): then it evaluates the same gradient with differentiable torch formulas, so that
# second (and higher) derivatives are exact instead of silently zero.
def _segments(offsets: torch.Tensor, num_logits: int) -> torch.Tensor:
    """Group index of every logit position, [L] int64 (no device sync: the output size is given)."""
    k = offsets.numel() - 1
    return torch.repeat_interleave(torch.arange(k, device=offsets.device), offsets.diff(), output_size=num_logits)


def _group_sums(a: torch.Tensor, seg: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-group sums of an [N, L] tensor, [N, K] (differentiable)."""
    return a.new_zeros(a.shape[0], num_groups).index_add(1, seg, a)


def _softmax_setup(ctx, inputs, output):
    _, offsets, log = inputs
    ctx.log = log
    ctx.save_for_backward(output, offsets)


def _softmax_backward(ctx, grad):
    out, offsets = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: differentiable in grad and (through out) logits
        seg, k = _segments(offsets, out.shape[1]), offsets.numel() - 1
        if ctx.log:
            gx = grad - out.exp() * _group_sums(grad, seg, k)[:, seg]
        else:
            gx = out * (grad - _group_sums(grad * out, seg, k)[:, seg])
        return gx, None, None
    return _ops.group_softmax_backward(grad.contiguous(), out, offsets, ctx.log), None, None


torch.library.register_autograd("mosx::group_softmax", _softmax_backward, setup_context=_softmax_setup)


def _score_setup(ctx, inputs, output):
    logits, offsets = inputs
    _, min_group, min_lse = output
    ctx.mark_non_differentiable(min_group, min_lse)
    ctx.save_for_backward(logits, offsets, min_group, min_lse)


def _score_backward(ctx, grad_score, _grad_group, _grad_lse):
    logits, offsets, min_group, min_lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: d(-p0)/dx = p0 * (p - onehot(others)) on slice k*
        seg = _segments(offsets, logits.shape[1])
        p = _ops.group_softmax(logits, offsets, False)
        others = offsets[min_group].unsqueeze(1)
        p0 = p.gather(1, others)
        onehot = torch.zeros_like(p).scatter(1, others, 1.0)
        in_slice = seg.unsqueeze(0) == min_group.unsqueeze(1)
        gx = (grad_score.to(p.dtype).unsqueeze(1) * p0) * (p - onehot)
        return torch.where(in_slice, gx, torch.zeros_like(gx)), None
    return _ops.group_softmax_score_backward(grad_score, logits, offsets, min_group, min_lse), None


torch.library.register_autograd("mosx::group_softmax_score", _score_backward, setup_context=_score_setup)


def _ce_setup(ctx, inputs, output):
    logits, offsets, targets, class_logit, ignore_index = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.ignore_index = ignore_index
    # The backward recomputes softmax from the logits and the per-group lse: no [N, L] buffer.
    ctx.save_for_backward(logits, offsets, targets, class_logit, lse)


def _ce_slots(offsets, targets, class_logit, ignore_index, seg):
    """Logit position of the target of every (target set m, row n, group k), [M, N, K], and
    whether it counts (not ignored), as the kernels' TargetSlots (the forward validated them)."""
    starts = offsets[:-1]
    valid = targets != ignore_index
    if targets.dim() == 3:  # per-group labels
        return starts + torch.where(valid, targets, 0), valid
    pos = class_logit[torch.where(valid, targets, 0)]  # [M, N]
    own = seg[pos].unsqueeze(-1) == torch.arange(starts.numel(), device=seg.device)
    slots = torch.where(own, pos.unsqueeze(-1), starts)
    return slots, valid.unsqueeze(-1).expand_as(slots)


def _ce_backward(ctx, grad_losses, _grad_lse):
    logits, offsets, targets, class_logit, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: sum_m coef_mk * (softmax_k - onehot(slot_mk))
        seg = _segments(offsets, logits.shape[1])
        p = _ops.group_softmax(logits, offsets, False)
        slots, valid = _ce_slots(offsets, targets, class_logit, ctx.ignore_index, seg)
        coef = torch.where(valid, grad_losses.to(p.dtype), torch.zeros((), dtype=p.dtype, device=p.device))
        gx = coef.sum(0)[:, seg] * p
        for m in range(coef.shape[0]):
            gx = gx - torch.zeros_like(p).scatter_add(1, slots[m], coef[m])
        return gx, None, None, None, None
    grad = _ops.group_cross_entropy_backward(
        grad_losses.contiguous(), logits, offsets, targets, class_logit, lse, ctx.ignore_index
    )
    return grad, None, None, None, None


torch.library.register_autograd("mosx::group_cross_entropy", _ce_backward, setup_context=_ce_setup)


def _not_differentiable(op: str, forward: str) -> None:
    """The raw backward ops have no derivative of their own (their saved lse inputs are constants):
    differentiating one raises instead of silently giving zeros."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"mosx.{op} is not differentiable; for second derivatives differentiate mosx.{forward} "
            f"(or torch.ops.mosx.{forward}) with torch.autograd.grad(..., create_graph=True)"
        )

    torch.library.register_autograd(f"mosx::{op}", backward, setup_context=lambda ctx, inputs, output: None)


_not_differentiable("group_softmax_backward", "group_softmax")
_not_differentiable("group_softmax_score_backward", "group_softmax_score")
_not_differentiable("group_cross_entropy_backward", "group_cross_entropy")


# ------------------------------------------------------------------------------ public API
def group_softmax(logits, groups, *, log: bool = False):
    """Softmax within every group's slice (others slot included). [N, L] -> [N, L], same dtype."""
    x, kind = from_array(logits)
    g = _check_logits(x, groups, "group_log_softmax" if log else "group_softmax")
    out = _ops.group_softmax(x, g.tensors(x.device)["offsets"], log)
    return to_array(out, kind)


def group_log_softmax(logits, groups):
    """Log-softmax within every group's slice. [N, L] -> [N, L], same dtype."""
    return group_softmax(logits, groups, log=True)


def group_softmax_score(logits, groups):
    """MOS score: -min over groups of the "others" probability. Higher = more in-distribution.

    Drop-in for the reference `cal_ood_score` loop. Returns [N] in float32 for float32/half inputs
    (float64 for float64), computed in one pass without materialising probabilities.
    Differentiable.
    """
    x, kind = from_array(logits)
    g = _check_logits(x, groups, "group_softmax_score")
    score, _, _ = _ops.group_softmax_score(x, g.tensors(x.device)["offsets"])
    return to_array(score, kind)


def group_predict(logits, groups, *, return_group: bool = False):
    """Group-softmax prediction: (global class id [N] int64, its probability [N]).

    In every group the most probable non-others class; the group with the highest such
    probability wins. The probability is the within-group softmax probability (others included in
    the denominator) in float32 (float64 for float64 inputs). With return_group=True the winning
    group index [N] is returned too. Not differentiable.
    """
    x, kind = from_array(logits)
    g = _check_logits(x, groups, "group_predict")
    t = g.tensors(x.device)
    cls, prob, group = _ops.group_predict(x.detach(), t["offsets"], t["logit_class"])
    out = (cls, prob, group) if return_group else (cls, prob)
    return tuple(to_array(o, kind) for o in out)


def _as_targets(targets, groups: Groups, n: int, device, name: str) -> torch.Tensor:
    t, _ = from_array(targets)
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"group_cross_entropy: {name} must be integer class ids or per-group labels, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"group_cross_entropy: {name} are on {t.device} but logits are on {device}")
    if t.dim() == 1:
        if t.shape[0] != n:
            raise ValueError(f"group_cross_entropy: {name} has {t.shape[0]} entries but logits have {n} rows")
    elif t.dim() == 2:
        if tuple(t.shape) != (n, groups.num_groups):
            raise ValueError(
                f"group_cross_entropy: per-group {name} must be [N, K] = [{n}, {groups.num_groups}], "
                f"got {tuple(t.shape)}"
            )
    else:
        raise ValueError(
            f"group_cross_entropy: {name} must be [N] class ids or [N, K] per-group labels, got shape {tuple(t.shape)}"
        )
    return t.long()


def _check_mix_lambda(lam):
    """A number or a one-element floating tensor in [0, 1] (NaN rejected); a tensor comes back 0-d.
    A CUDA tensor's value is not read (that would synchronise), nor one under torch.compile."""
    if isinstance(lam, torch.Tensor):
        if lam.numel() != 1 or not lam.is_floating_point():
            raise ValueError(
                "group_cross_entropy: a tensor mix_lambda must hold one floating value, "
                f"got shape {tuple(lam.shape)} {lam.dtype}"
            )
        lam = lam.reshape(())
        if lam.device.type != "cpu" or torch.compiler.is_compiling():
            return lam
        value = float(lam.detach())
    else:
        if isinstance(lam, (str, bytes, bool)):
            raise TypeError(f"group_cross_entropy: mix_lambda must be a number or a tensor, got {type(lam).__name__}")
        try:
            value = float(lam)
        except (TypeError, ValueError):
            raise TypeError(
                f"group_cross_entropy: mix_lambda must be a number or a tensor, got {type(lam).__name__}"
            ) from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"group_cross_entropy: mix_lambda must be in [0, 1], got {value}")
    return lam


def group_cross_entropy(
    logits,
    targets,
    groups,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    mix_targets=None,
    mix_lambda: float | None = None,
):
    """Group-softmax cross-entropy: sum over groups of the cross-entropy of each group's slice.

    targets: [N] global class ids (rows equal to ignore_index count for nothing) or the reference
    code's [N, K] per-group labels (0 = others, j+1 = the group's class j).
    reduction: "mean" (sum over groups of batch means over the non-ignored entries, as the
    reference), "sum", or "none" (per-sample sum over groups, [N]).
    Mixup: mix_targets (same form as targets) and mix_lambda give
    lambda * loss(targets) + (1 - lambda) * loss(mix_targets) in one pass over the logits.
    Returns float32 for float32/half inputs (float64 for float64). Differentiable w.r.t. logits.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"group_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    x, kind = from_array(logits)
    g = _check_logits(x, groups, "group_cross_entropy")
    n = x.shape[0]
    ta = _as_targets(targets, g, n, x.device, "targets")
    if (mix_targets is None) != (mix_lambda is None):
        raise ValueError("group_cross_entropy: give both mix_targets and mix_lambda for mixup, or neither")
    if mix_targets is not None:
        tb = _as_targets(mix_targets, g, n, x.device, "mix_targets")
        if tb.dim() != ta.dim():
            raise ValueError("group_cross_entropy: targets and mix_targets must have the same form ([N] or [N, K])")
        mix_lambda = _check_mix_lambda(mix_lambda)
        stacked = torch.stack([ta, tb])
        weights = [mix_lambda, 1.0 - mix_lambda]
    else:
        stacked = ta.unsqueeze(0)
        weights = [1.0]
    t = g.tensors(x.device)
    losses, _ = _ops.group_cross_entropy(x, t["offsets"], stacked, t["class_logit"], int(ignore_index))
    total = None
    for m, w in enumerate(weights):
        lm = losses[m]
        if reduction == "none":
            part = lm.sum(1)
        elif reduction == "sum":
            part = lm.sum()
        elif stacked.dim() == 2:  # class ids: every group averages over the same non-ignored rows
            part = lm.sum() / (stacked[m] != ignore_index).sum()
        else:  # per-group labels: each group averages over its own non-ignored entries
            part = (lm.sum(0) / (stacked[m] != ignore_index).sum(0)).sum()
        part = part if len(weights) == 1 else w * part
        total = part if total is None else total + part
    return to_array(total, kind)
