"""Plain-PyTorch reference implementations, written as the MOS reference code's per-group loops.

These follow the public MOS code (cal_ood_score, calc_group_softmax_loss, calc_group_softmax_acc)
step by step: a Python loop over groups slicing the logits. They are slow on purpose: they are the
ground truth the fused kernels are tested against and the baseline the benchmarks report.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .groups import as_groups

__all__ = ["group_softmax", "group_log_softmax", "group_softmax_score", "group_predict", "group_cross_entropy"]


def _slices(groups):
    return as_groups(groups).slices.tolist()


def group_softmax(logits, groups, log=False):
    fn = F.log_softmax if log else F.softmax
    return torch.cat([fn(logits[:, a:b], dim=-1) for a, b in _slices(groups)], dim=1)


def group_log_softmax(logits, groups):
    return group_softmax(logits, groups, log=True)


def group_softmax_score(logits, groups):
    """cal_ood_score: max over groups of -softmax(group)[:, 0], i.e. -min_k p_others^k."""
    all_scores = []
    for a, b in _slices(groups):
        group_softmax = F.softmax(logits[:, a:b], dim=-1)
        all_scores.append(-group_softmax[:, 0])
    all_scores = torch.stack(all_scores, dim=1)
    score, _ = torch.max(all_scores, dim=1)
    return score


def group_predict(logits, groups):
    """calc_group_softmax_acc's prediction, mapped to global class ids: (class [N], prob [N], group [N])."""
    g = as_groups(groups)
    all_max_score, all_max_class = [], []
    for a, b in _slices(g):
        group_softmax = F.softmax(logits[:, a:b], dim=-1)[:, 1:]  # disregard others
        max_score, max_class = torch.max(group_softmax, dim=1)
        all_max_score.append(max_score)
        all_max_class.append(max_class)
    all_max_score = torch.stack(all_max_score, dim=1)
    all_max_class = torch.stack(all_max_class, dim=1)
    final_score, max_group = torch.max(all_max_score, dim=1)
    # NaN rule (docs/semantics.md): the first group whose softmax is NaN wins, at its first class.
    # torch.max propagates NaN but does not specify which NaN's index it returns, so both indices
    # are set here explicitly (a NaN group's probabilities are all NaN).
    nan = torch.isnan(all_max_score)
    all_max_class = torch.where(nan, 0, all_max_class)
    max_group = torch.where(nan.any(dim=1), nan.to(torch.uint8).argmax(dim=1), max_group)
    within = all_max_class[torch.arange(logits.shape[0], device=logits.device), max_group]
    t = g.tensors(logits.device)
    pos = t["offsets"][max_group] + 1 + within
    return t["logit_class"][pos], final_score, max_group


def group_cross_entropy(
    logits, targets, groups, reduction="mean", ignore_index=-100, mix_targets=None, mix_lambda=None
):
    """calc_group_softmax_loss: sum over groups of CrossEntropyLoss(group slice, group label).

    targets: [N] class ids (converted with Groups.group_labels) or [N, K] per-group labels.
    reduction "none" gives the per-sample sum over groups. Mixup as in the reference recipe:
    lambda * loss(targets) + (1 - lambda) * loss(mix_targets).
    """
    g = as_groups(groups)

    def labels_of(t):
        """Per-group labels and the ignore value they use. Class-id rows equal to ignore_index are
        ignored in every group (docs/semantics.md); their labels get -100, never a valid
        per-group label, because ignore_index itself may equal a real per-group label (e.g.
        ignore_index=3 and a class at within-group index 2) that must not be ignored."""
        t = torch.as_tensor(t, device=logits.device).long()
        if t.dim() != 1:
            return t, ignore_index
        ignored = t == ignore_index
        labels = g.group_labels(torch.where(ignored, 0, t))
        labels[ignored] = -100
        return labels, -100

    def loss_of(labels_and_ignore):
        labels, ignore = labels_and_ignore
        loss = 0
        for i, (a, b) in enumerate(_slices(g)):
            loss = loss + F.cross_entropy(logits[:, a:b], labels[:, i], ignore_index=ignore, reduction=reduction)
        return loss

    loss = loss_of(labels_of(targets))
    if mix_targets is not None:
        loss = mix_lambda * loss + (1 - mix_lambda) * loss_of(labels_of(mix_targets))
    return loss
